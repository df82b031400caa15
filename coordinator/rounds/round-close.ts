/**
 * A round's close, from the finished aggregate to the committed new version: the weight cap, the final check of the
 * aggregate, the model file, then one transaction with the close, the aggregation state, what the features add and
 * the events; after it, the announcement and the features' onRoundClosed. The engine decides when to close and what
 * follows (the next round, or a failed round when the aggregate is not published).
 */
import { readFileSync } from 'node:fs';
import { pick } from '../../shared/model/sharing.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import { decodeUpdate } from '../../shared/tensors/update-codec.ts';
import { aggregateProblem } from '../aggregation/validate.ts';
import { cappedWeights } from '../aggregation/weight-share.ts';
import { outboxRows } from '../events/outbox.ts';
import type { AggregationState } from './aggregation-state.ts';
import { type OpenRound, roundView } from './open-round.ts';
import type { RoundParts } from './round-parts.ts';

export interface RoundCloseOptions extends RoundParts {
  architecture: ModelArchitecture;
  aggregationState: AggregationState;
}

/**
 * How a close ended: committed; not published because the aggregate failed its check (`problem`); or not committed
 * because an operator's rollback failed the round meanwhile. A throw means nothing was committed (e.g. a full disk).
 */
export type CloseOutcome = { committed: true } | { problem: string } | { rolledBack: true };

export class RoundClose {
  constructor(private readonly o: RoundCloseOptions) {}

  /**
   * Finishes `open`'s aggregate and commits it as the next global version. `settled` runs right after the commit,
   * before anything is announced (the engine forgets the round there).
   */
  commit(open: OpenRound, why: string, settled: () => void): CloseOutcome {
    const { store, models, architecture, log } = this.o;
    this.applyWeightShare(open);
    const next = open.aggregator.finish();
    // Never publish what sites could not train from: whatever got past validation, the result is checked as a whole.
    const problem = aggregateProblem(next, this.o.plan.aggregation.validation.maxValue);
    if (problem) return { problem };
    const saved = models.save(next, { architecture: architecture.id, round: String(open.row.round), parent: open.row.baseModelHash });
    // Server-optimiser moments and the DP accountant move on with the model, in the same transaction:
    // a coordinator killed before it commits redoes this round from the previous state.
    const previousState = this.o.aggregationState.stored();
    const meta: Record<string, string> = this.o.aggregationState.exportMeta(open.row.round);
    // What the features add (DP accountant, teacher, …) moves on with the model, in the same transaction.
    const view = roundView(open);
    const version = { hash: saved.hash };
    const contributions = this.o.features.beforeCommit(view, version);
    const { added } = contributions;
    Object.assign(meta, added.meta);
    // Committed with the close, so the events cannot be lost to a crash or a NATS outage (events/outbox.ts).
    const closed = this.o.events.event('round.closed', { round: open.row.round, model: saved.hash, sites: [...open.reported].sort(), why, strategy: this.o.strategy.name, ...added.closedFields });
    const committed = store.closeRound(open.row.round, { hash: saved.hash, path: saved.path, round: open.row.round, sizeBytes: saved.sizeBytes, createdAt: Date.now() }, Date.now(), meta, outboxRows(closed, ...added.events));
    if (!committed) return { rolledBack: true };
    settled();
    try {
      // The previous round's optimiser state is superseded once this commit is durable (two models of disk each).
      this.o.aggregationState.pruneSuperseded(previousState, meta);
    } catch (e) {
      // Committed: only disk space is at stake, and the next close prunes again.
      log.warn({ round: open.row.round, err: (e as Error).message }, 'deleting superseded files after the round closed failed');
    }
    this.o.events.publish(closed);
    log.info({ round: open.row.round, model: saved.hash.slice(0, 12), sites: open.reported.size, why, ...added.logFields }, 'round closed');
    for (const e of added.events) this.o.events.publish(e);
    this.o.features.onRoundClosed(view, version, contributions);
    return { committed: true };
  }

  /**
   * plan aggregation.maxWeightShare: once every weight of the round is known, lowers the weights above the cap
   * (water-filling, weight-share.ts) by folding those updates again from the store with the difference. Only the
   * sample-weighted mean has weights to cap (not median / trimmed mean, not DP's uniform weights, not an input a
   * feature collected, such as secure aggregation's, where the coordinator never sees a single update).
   */
  private applyWeightShare(open: OpenRound): void {
    const { plan, store, log } = this.o;
    const share = plan.aggregation.maxWeightShare;
    const aggregator = open.aggregator;
    if (share >= 1 || !aggregator.reweight || open.collector || plan.aggregation.dp || plan.aggregation.strategy !== 'fedavg') return;
    const rows = store.updatesForRound(open.row.round).filter((u) => open.reported.has(u.site));
    const capped = cappedWeights(rows.map((u) => u.numSamples), share);
    const lowered: Record<string, { declared: number; used: number }> = {};
    rows.forEach((u, i) => {
      if (capped[i] >= u.numSamples) return;
      const d = decodeUpdate(readFileSync(u.path), { views: true });
      aggregator.reweight!(pick(d.bundle, this.o.shared), { site: u.site, numSamples: u.numSamples, isDelta: d.isDelta }, capped[i]);
      lowered[u.site] = { declared: u.numSamples, used: Number(capped[i].toPrecision(6)) };
    });
    if (Object.keys(lowered).length > 0) {
      log.warn({ round: open.row.round, share, lowered }, "lowered the weight of site(s) whose declared samples exceeded the plan's maxWeightShare");
    }
  }
}
