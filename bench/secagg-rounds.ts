/**
 * Secure aggregation in real rounds vs plain FedAvg: two federations of separate processes (coordinator + 3
 * sites, TLS + tokens) on the demo-sized model (tiny3d, width 8), same seeds and data, R rounds each.
 * Reports per round the wall time (round opened → closed, from the store) and per site the bytes it sent for
 * its contribution (plain: the safetensors upload; SecAgg: keys, sealed shares, masked vector, unmask shares).
 *
 *   node --import tsx bench/secagg-rounds.ts [--rounds 3]
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { makeFederation, exited } from '../test/helpers/federation.ts';
import type { AuditedCall } from '../site-agent/transport/wire-audit.ts';

const log = pino({ name: 'bench-secagg-rounds' });
const rounds = Number(process.argv[process.argv.indexOf('--rounds') + 1] ?? 3) || 3;

const plan = (secagg: boolean) =>
  [
    'name: bench-secagg-rounds',
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 8, seed: 7 }',
    `rounds: ${rounds}`,
    'minSites: 3',
    'roundDeadlineSeconds: 300',
    'waitForSitesSeconds: 60',
    'gatherSeconds: 10',
    'local: { steps: 3, batchSize: 2, learningRate: 0.005 }',
    'share: { parts: [encoder] }',
    ...(secagg ? ['aggregation: { secureAggregation: { enabled: true, threshold: 2, clip: 1 } }'] : []),
    '',
  ].join('\n');

async function run(secagg: boolean): Promise<{ roundSeconds: number[]; bytesPerSite: number[] }> {
  const fed = await makeFederation({ sites: 3, plan: plan(secagg) });
  try {
    await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 600_000)));
    if (codes.some((c) => c !== 0)) throw new Error(`a site exited with ${codes.join(', ')}; logs in ${fed.work}/logs`);
    const rows = fed.store().listRounds().filter((r) => r.state === 'closed');
    const roundSeconds = rows.map((r) => (r.closedAt! - r.openedAt) / 1000);
    const bytesPerSite = fed.sites.map((s) => {
      if (secagg) {
        const done = readFileSync(fed.logPath(s), 'utf8').split('\n').filter((l) => l.includes('secure aggregation: done')).map((l) => (JSON.parse(l) as { bytesSent: number }).bytesSent);
        return done.reduce((a, b) => a + b, 0) / done.length;
      }
      const calls = readFileSync(join(fed.work, 'logs', `${s}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      const ups = calls.filter((c) => c.method.endsWith('/UploadUpdate')).map((c) => c.payload?.bytes ?? 0);
      return ups.reduce((a, b) => a + b, 0) / ups.length;
    });
    return { roundSeconds, bytesPerSite };
  } finally {
    fed.killAll();
  }
}

const plain = await run(false);
const masked = await run(true);
const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
log.info({ rounds, plain, secagg: masked }, 'per-round seconds and mean bytes sent per site and round');
const table = [
  '| | plain FedAvg | secure aggregation | ratio |',
  '|---|---|---|---|',
  `| round time, median of ${rounds} (s) | ${med(plain.roundSeconds).toFixed(2)} | ${med(masked.roundSeconds).toFixed(2)} | ${(med(masked.roundSeconds) / med(plain.roundSeconds)).toFixed(2)} |`,
  `| bytes sent per site and round | ${Math.round(med(plain.bytesPerSite))} | ${Math.round(med(masked.bytesPerSite))} | ${(med(masked.bytesPerSite) / med(plain.bytesPerSite)).toFixed(3)} |`,
].join('\n');
process.stdout.write(table + '\n');
