/**
 * How a round ends and what follows: closed on what was folded, or failed durably with its `round.failed` event, then
 * the next round. Never throws (it runs from timers): a close whose result could not be stored is tried again later
 * from the stored updates, and a failure that could not be stored is written again later; meanwhile the round refuses
 * uploads. A round whose input a feature collected cannot be rebuilt, so a failed close fails it instead.
 */
import type { Logger } from '../../shared/util/log.ts';
import { describeStorageFault } from '../../shared/util/storage-fault.ts';
import { outboxRows } from '../events/outbox.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { FeatureHooks } from './feature-hooks.ts';
import type { FoldQueue } from './fold-queue.ts';
import { type OpenRound, roundView } from './open-round.ts';
import type { RoundClose } from './round-close.ts';
import type { RoundEvents } from './round-events.ts';
import type { RoundRecovery } from './round-recovery.ts';
import type { StorageRetries } from './storage-retries.ts';

export interface RoundEndingOptions {
  store: CoordinatorStore;
  log: Logger;
  events: RoundEvents;
  features: FeatureHooks;
  folds: FoldQueue;
  closing: RoundClose;
  recovery: RoundRecovery;
  retries: StorageRetries;
  /** Whether `open` is still the engine's open round (an operator's rollback may have dropped it). */
  isCurrent(open: OpenRound): boolean;
  /** The engine has no open round any more. */
  forget(): void;
  /** Opens the next round when it is time (never throws). */
  next(): void;
  /** Back to the aggregation state and feature state last committed. */
  resetAggregationState(): void;
  /** Announces a rollback that failed the round being closed. */
  checkRollbacks(): void;
}

export class RoundEnding {
  constructor(private readonly o: RoundEndingOptions) {}

  /** Closes the round; never throws: when storing its result fails (a full disk), the close is tried again later. */
  async close(open: OpenRound, why: string): Promise<void> {
    if (open.closing) return;
    try {
      await this.closeOnce(open, why);
    } catch (e) {
      this.closeFailed(open, why, e);
    }
  }

  /** Fails `open` durably with `note` (a warning), drops its aggregate and opens the next round. */
  failAndMoveOn(open: OpenRound, note: string): void {
    this.failDurably(open, note, () => {
      open.aggregator.discard?.();
      this.o.log.warn({ round: open.row.round }, note);
      this.moveOn();
    });
  }

  private moveOn(): void {
    this.o.forget();
    this.o.next();
  }

  /**
   * Marks `open` failed in the store with its `round.failed` event (reason `note`, plus `fields`), announces it, then
   * runs `after` (open the next round). On a storage failure the round stays in memory, closing (so uploads are
   * refused), and the store write is tried again later.
   */
  private failDurably(open: OpenRound, note: string, after: () => void, fields: Record<string, unknown> = {}): void {
    open.closing = true;
    if (open.timer) clearTimeout(open.timer);
    const attempt = (): void => {
      if (!this.o.isCurrent(open)) return; // an operator's rollback settled it meanwhile
      const failed = this.o.events.event('round.failed', { round: open.row.round, reason: note, ...fields });
      this.o.store.failRound(open.row.round, note, Date.now(), outboxRows(failed));
      this.o.events.publish(failed);
      this.o.features.notify('onRoundFailed', (f) => f.onRoundFailed?.(roundView(open), note));
      after();
    };
    try {
      attempt();
    } catch (e) {
      this.o.retries.later(`fail-${open.row.round}`, `failing round ${open.row.round}`, e, attempt);
    }
  }

  private async closeOnce(open: OpenRound, why: string): Promise<void> {
    open.closing = true;
    if (open.timer) clearTimeout(open.timer);
    await this.o.folds.drained();
    if (!this.o.isCurrent(open)) return; // rolled back by the operator meanwhile (checkRollbacks dropped it)
    if (open.staleAggregate) {
      await this.rebuild(open);
      if (!this.o.isCurrent(open)) return; // rolled back by the operator while the updates were read again
    }
    const outcome = this.o.closing.commit(open, why, () => this.o.forget());
    if ('problem' in outcome) {
      this.failUnpublished(open, outcome.problem);
      return;
    }
    if ('rolledBack' in outcome) {
      // An operator's rollback failed this round between our check and the commit: its result is not published.
      this.o.log.warn({ round: open.row.round }, 'round was failed by a rollback while closing; its aggregate is not published');
      this.o.resetAggregationState();
      if (this.o.isCurrent(open)) this.o.forget();
      this.o.checkRollbacks();
    }
    this.o.next();
  }

  /**
   * The running aggregate of `open` replaced by the fold of its stored updates (a fold failed part-way earlier). A
   * failure here fails the close, which is tried again later from the stored updates (closeFailed).
   */
  private async rebuild(open: OpenRound): Promise<void> {
    const { aggregator, reported } = await this.o.recovery.refoldYielding(open.row);
    // The stale one is only dropped now (a failed refold leaves it to closeFailed, which discards it once). It may
    // share the strategy's sums arena with the new one, but nothing folds into it or finishes it any more.
    open.aggregator.discard?.();
    open.aggregator = aggregator;
    for (const s of reported) open.reported.add(s);
    this.o.log.warn({ round: open.row.round, updates: reported.size, because: open.staleAggregate }, "the round's aggregate was rebuilt from its stored updates before the close");
    open.staleAggregate = undefined;
  }

  /** The aggregate failed its final check: the round fails, naming the cause, and the federation stays on its model. */
  private failUnpublished(open: OpenRound, problem: string): void {
    const sites = [...open.reported].sort();
    const note = `aggregate not published: ${problem}; the federation stays on model ${open.row.baseModelHash.slice(0, 12)}… (updates from ${sites.join(', ')})`;
    this.o.resetAggregationState();
    const after = () => {
      this.o.log.error({ round: open.row.round, sites, problem }, 'round failed: its aggregate is not published');
      this.moveOn();
    };
    this.failDurably(open, note, after, { cause: 'aggregate', sites });
  }

  /**
   * Closing failed: the aggregator is spent and the server state moved on in memory, but nothing was committed
   * (the store transaction is all or nothing). Later, the aggregator is rebuilt from the stored updates and the
   * close tried again; the round refuses uploads meanwhile. An input a feature collected cannot be rebuilt: that
   * round fails (durably) instead.
   */
  private closeFailed(open: OpenRound, why: string, e: unknown): void {
    const round = open.row.round;
    try {
      open.aggregator.discard?.();
      this.o.resetAggregationState();
    } catch (e2) {
      this.o.log.error({ round, err: describeStorageFault(e2) }, 'could not reset the aggregation state after a failed close');
    }
    if (open.collector) {
      this.o.log.error({ round, feature: open.collector.feature, err: describeStorageFault(e) }, "storing the round's result failed and its collected input cannot be rebuilt; the round fails");
      const note = open.collector.input.lostResultNote(describeStorageFault(e));
      this.failDurably(open, note, () => this.moveOn());
      return;
    }
    this.o.retries.later(`close-${round}`, `closing round ${round}`, e, async () => {
      if (!this.o.isCurrent(open)) return;
      if (this.o.store.getRound(round)?.state !== 'open') {
        // Settled after all (the failure came after the commit): only what follows a close is left to do.
        this.moveOn();
        return;
      }
      const { aggregator, reported } = await this.o.recovery.refoldYielding(open.row);
      if (!this.o.isCurrent(open)) {
        aggregator.discard?.(); // rolled back by the operator while the updates were read again
        return;
      }
      open.aggregator = aggregator;
      open.staleAggregate = undefined; // rebuilt from the stored updates just now
      for (const s of reported) open.reported.add(s);
      open.closing = false;
      return this.close(open, why);
    });
  }
}
