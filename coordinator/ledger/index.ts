/**
 * Opening the coordinator's contribution ledger: JetStream when NATS is configured, else `ledger.jsonl`
 * in the coordinator directory.
 */
import type { KeyObject } from 'node:crypto';
import { join } from 'node:path';
import type { Logger } from '../../shared/util/log.ts';
import { ContributionLedger, FileLedgerBackend, JetStreamLedgerBackend, LEDGER_FILE, type LedgerBackend } from './ledger.ts';

export { ContributionLedger } from './ledger.ts';
export { verifyChain, type LedgerEntry, type ChainReport } from './chain.ts';

export async function openLedger(o: { dir: string; natsUrl?: string; federation: string; signingKey: KeyObject; log?: Logger }): Promise<ContributionLedger> {
  let backend: LedgerBackend = new FileLedgerBackend(join(o.dir, LEDGER_FILE));
  if (o.natsUrl) {
    try {
      backend = await JetStreamLedgerBackend.connect(o.natsUrl, o.federation);
    } catch (e) {
      o.log?.warn({ reason: (e as Error).message, ledger: backend.describe() }, 'contribution ledger falls back to the local file');
    }
  }
  const ledger = await ContributionLedger.open(backend, { federation: o.federation, signingKey: o.signingKey, log: o.log });
  o.log?.info({ ledger: ledger.describe(), entries: ledger.headSeq }, 'contribution ledger open');
  return ledger;
}

/** The plan's aggregation as one name for the ledger, e.g. "fedavg", "trimmed-mean+fedyogi", "fedavg+dp". */
export function strategyName(plan: unknown): string {
  const agg = (plan as { aggregation?: { strategy?: string; serverOptimizer?: { type?: string }; dp?: unknown } }).aggregation;
  const parts = [agg?.strategy ?? 'fedavg'];
  if (agg?.serverOptimizer?.type && agg.serverOptimizer.type !== 'none') parts.push(agg.serverOptimizer.type);
  if (agg?.dp) parts.push('dp');
  return parts.join('+');
}
