/**
 * Uploads as the open round takes them: whether one may be stored at all, the strategy's check of its tensors, the
 * fold of a stored update into the running aggregate, and the refusal events and warnings. The upload handler runs
 * the check and the fold in the engine's fold queue (fold-queue.ts).
 */
import type { FederationEvent } from '../../shared/events/bus.ts';
import { pick } from '../../shared/model/sharing.ts';
import type { ParamInfo } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import type { BatchItem, Verdict } from '../aggregation/strategy.ts';
import { updateRejectionReason } from '../events/reasons.ts';
import type { RefusalWarnings } from '../events/refusal-warnings.ts';
import type { CoordinatorStore, UpdateRow } from '../store/store.ts';
import type { OpenRound } from './open-round.ts';
import type { RoundEvents } from './round-events.ts';

export interface UploadIntakeOptions {
  store: CoordinatorStore;
  shared: ParamInfo[];
  events: RoundEvents;
  refusals: RefusalWarnings;
  /** The aggregation strategy's name, for the one error that names it. */
  strategyName: string;
  /** The open round, if any. */
  open(): OpenRound | undefined;
  /** Whether the federation has run all its rounds. */
  finished(): boolean;
}

export class UploadIntake {
  constructor(private readonly o: UploadIntakeOptions) {}

  /** Whether an update for `round` from `site` may be stored at all (before the bytes are kept): a reason to refuse, or undefined. */
  admissionProblem(site: string, round: number, baseModelHash: string): string | undefined {
    const open = this.o.open();
    if (!open) return `no round is open (the federation is ${this.o.finished() ? 'finished' : 'between rounds'}); wait for the next task`;
    if (round !== open.row.round) return `round ${round} is not the open round ${open.row.round}; drop this update and take the current task`;
    if (!open.row.selected.includes(site)) return `site '${site}' was not selected for round ${round}`;
    if (open.collector) return open.collector.input.uploadRefusal(site);
    // The store too: an update is stored and acknowledged a moment before it is folded into `reported`.
    if (open.reported.has(site) || this.o.store.updateFor(round, site)) return `site '${site}' already reported an update for round ${round}`;
    if (baseModelHash !== open.row.baseModelHash) return `update was trained from model ${baseModelHash.slice(0, 12)}…, but round ${round} starts from ${open.row.baseModelHash.slice(0, 12)}…`;
    if (open.closing) return `round ${round} is closing`;
    return undefined;
  }

  /** The open round's validation filter (names, dtypes, shapes, finite values, norm bound, sample count); changes nothing. */
  check(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): Verdict {
    const open = this.o.open();
    if (!open || open.row.round !== round) return { problem: `round ${round} is not open any more` };
    return open.aggregator.check(update, { site, numSamples, isDelta });
  }

  /** check() and, where the strategy can, the fold in the same pass (round-engine.ts checkAndFold says how to finish). */
  checkAndFold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): { verdict: Verdict; folded: boolean } {
    const open = this.o.open();
    if (!open || open.row.round !== round) return { verdict: { problem: `round ${round} is not open any more` }, folded: false };
    const info = { site, numSamples, isDelta };
    const fused = open.aggregator.checkAndAdd?.(update, info);
    if (fused) return { verdict: fused, folded: !fused.problem };
    return { verdict: open.aggregator.check(update, info), folded: false };
  }

  /**
   * Several stored updates of `round` checked and folded in one pass (the strategy's checkAndAddBatch): their
   * verdicts in order, those without a problem counted. Undefined when the round is not open or its strategy
   * cannot (median, trimmed mean): nothing was counted, so take them one at a time (checkAndFold).
   */
  checkAndFoldBatch(round: number, items: readonly BatchItem[]): Verdict[] | undefined {
    const open = this.o.open();
    if (!open || open.row.round !== round || !open.aggregator.retractItem) return undefined;
    return open.aggregator.checkAndAddBatch?.(items);
  }

  /** Takes out an update that checkAndFoldBatch() counted but that could not be stored. */
  unfoldItem(round: number, item: BatchItem, verdict: Verdict): void {
    const open = this.o.open();
    if (!open || open.row.round !== round) return;
    if (!open.aggregator.retractItem) throw new Error(`strategy ${this.o.strategyName} counted an update it cannot take out`);
    open.aggregator.retractItem(item, verdict);
  }

  /** Takes out an update that checkAndFold() counted but that could not be stored. */
  unfold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean, verdict: Verdict): void {
    const open = this.o.open();
    if (!open || open.row.round !== round) return;
    if (!open.aggregator.retract) throw new Error(`strategy ${this.o.strategyName} counted an update it cannot take out`);
    open.aggregator.retract(update, { site, numSamples, isDelta }, verdict);
  }

  /** Folds a validated, durably stored update into the open round's aggregate; false when its round is not open. */
  fold(row: UpdateRow, update: TensorBundle, opts: { isDelta?: boolean; verdict?: Verdict; folded?: boolean }): boolean {
    const open = this.o.open();
    if (!open || open.row.round !== row.round) return false;
    // checkAndFold() already counted it: only the bookkeeping is left.
    if (!opts.folded) open.aggregator.add(pick(update, this.o.shared), { site: row.site, numSamples: row.numSamples, isDelta: opts.isDelta }, opts.verdict);
    open.reported.add(row.site);
    return true;
  }

  /** Records a stored update that checkAndFoldBatch() already counted; false when its round is not open. */
  folded(row: UpdateRow): boolean {
    const open = this.o.open();
    if (!open || open.row.round !== row.round) return false;
    open.reported.add(row.site);
    return true;
  }

  /** The update's `update.accepted` event; the upload handler commits it (and its ledger entry) with the update's row. */
  acceptedEvent(row: UpdateRow): FederationEvent {
    return this.o.events.event('update.accepted', { round: row.round, site: row.site, samples: row.numSamples, updateHash: row.sha256 });
  }

  /** Every refusal is an event (the metrics count them all); its warn line is collapsed with the same site's like refusals. */
  rejected(site: string, round: number, reason: string): void {
    this.o.events.emit('update.rejected', { site, round, reason });
    this.o.refusals.refused(site, updateRejectionReason(reason), reason, { site, round, reason }, 'update rejected');
  }
}
