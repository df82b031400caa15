/**
 * Secure aggregation's part of a round (plan aggregation.secureAggregation): the session a round runs instead of
 * uploads (coordinator/secagg/session.ts), what each site's task must say to take part, and the unmasked sum as
 * tensors. The engine keeps the round's side of it — no uploads, no re-offers, the deadline aborts the session, a
 * failed close fails the round — because a session cannot be rebuilt from the store the way uploads can.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { ParamInfo } from '../../../shared/model/types.ts';
import type { Plan } from '../../../shared/plan/schema.ts';
import { decodeRoundSum } from '../../../shared/privacy/secagg/wire.ts';
import type { TaskSettings } from '../../../shared/protocol/task.ts';
import { makeBundle, type NamedTensor, type TensorBundle } from '../../../shared/tensors/bundle.ts';
import { writeFileAtomic } from '../../../shared/util/fs-atomic.ts';
import type { Logger } from '../../../shared/util/log.ts';
import { SecAggRound, type SecAggResult } from '../../secagg/session.ts';
import type { RoundRow } from '../../store/store.ts';

export interface SecureAggregationOptions {
  plan: Plan;
  federationId: string;
  log: Logger;
  /** The plan's shared tensors, in the order of the masked vector. */
  shared: readonly ParamInfo[];
  /** Where the masked vectors received are kept (round-N/masked-SITE.u32), for audit; none when absent. */
  maskedDir?: string;
}

export class SecureAggregation {
  /** Shared values plus one slot for the weight. */
  readonly vectorLength: number;

  constructor(private readonly o: SecureAggregationOptions) {
    this.vectorLength = o.shared.reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0) + 1;
  }

  get enabled(): boolean {
    return this.o.plan.aggregation.secureAggregation.enabled;
  }

  /** Under DP every site puts in weight 1 (uniform DP-FedAvg), so no resolution is spent on larger weights. */
  get maxWeight(): number {
    return this.o.plan.aggregation.dp ? 1 : this.o.plan.aggregation.secureAggregation.maxWeight;
  }

  /** A session for the round `row`: `onResult` gets the unmasked sum, `onFailure` why the session ended without one. */
  session(row: RoundRow, handlers: { onResult(r: SecAggResult): void; onFailure(reason: string): void }): SecAggRound {
    const sa = this.o.plan.aggregation.secureAggregation;
    const dir = this.o.maskedDir ? join(this.o.maskedDir, `round-${row.round}`) : undefined;
    return new SecAggRound({
      round: row.round,
      sites: row.selected,
      threshold: sa.threshold,
      neighbours: sa.neighbours,
      vectorLength: this.vectorLength,
      phaseMs: sa.phaseSeconds * 1000,
      session: `${this.o.federationId}/round-${row.round}/${randomUUID()}`,
      log: this.o.log,
      onMasked: dir
        ? (site, y) => {
            mkdirSync(dir, { recursive: true });
            writeFileAtomic(join(dir, `masked-${site}.u32`), Buffer.from(y.buffer, y.byteOffset, y.byteLength));
          }
        : undefined,
      onResult: handlers.onResult,
      onFailure: handlers.onFailure,
    });
  }

  /** The unmasked Σ wᵢΔᵢ as the shared tensors, and Σ wᵢ. */
  decodeSum(row: RoundRow, r: SecAggResult): { sum: TensorBundle; weight: number } {
    const sa = this.o.plan.aggregation.secureAggregation;
    const { weightedDelta, weight } = decodeRoundSum(r.sum, { clip: sa.clip, sites: row.selected.length, maxWeight: this.maxWeight });
    const tensors: NamedTensor[] = [];
    let off = 0;
    for (const p of this.o.shared) {
      const n = p.shape.reduce((a, b) => a * b, 1);
      tensors.push({ name: p.name, dtype: 'F32', shape: [...p.shape], data: weightedDelta.subarray(off, off + n) });
      off += n;
    }
    return { sum: makeBundle(tensors), weight };
  }

  /** What `site` needs to take part in `row`'s session: its id, t, k, the quantiser and the vector length. */
  siteSettings(row: RoundRow, session: SecAggRound | undefined, site: string): Pick<TaskSettings, 'secureAggregation'> {
    const id = session?.ids.get(site);
    if (!session || id === undefined) return {};
    const sa = this.o.plan.aggregation.secureAggregation;
    const neighbours = sa.neighbours !== undefined && sa.neighbours < row.selected.length ? { neighbours: sa.neighbours } : {};
    return { secureAggregation: { id, threshold: sa.threshold, ...neighbours, clip: sa.clip, maxWeight: this.maxWeight, sites: row.selected.length, vectorLength: this.vectorLength } };
  }
}
