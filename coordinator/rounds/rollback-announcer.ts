/**
 * Rollbacks queued by `medfl coordinator rollback` (rollback.ts), as the running coordinator takes them: into the
 * outbox in the same transaction that takes them (a crash right after cannot lose the announcement or its ledger
 * entry), then announced on the bus with a warning each. The engine drops the round a rollback failed in between.
 */
import type { Logger } from '../../shared/util/log.ts';
import { outboxRows } from '../events/outbox.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { RoundEvents } from './round-events.ts';
import { type RollbackRecord, takePendingRollbacks } from './rollback.ts';

export class RollbackAnnouncer {
  constructor(
    private readonly store: CoordinatorStore,
    private readonly events: RoundEvents,
    private readonly log: Logger,
  ) {}

  /** Takes the queued rollbacks, their events committed to the outbox with the taking. */
  take(): RollbackRecord[] {
    return takePendingRollbacks(this.store, (rs) => outboxRows(...rs.map((r) => this.rolledBack(r))));
  }

  /** Publishes what take() returned, with a warning each. */
  announce(taken: readonly RollbackRecord[]): void {
    for (const r of taken) {
      this.events.publish(this.rolledBack(r));
      this.log.warn({ toRound: r.toRound, toModel: r.toModel.slice(0, 12), fromModel: r.fromModel.slice(0, 12), failedRound: r.failedRound, reason: r.reason || undefined }, 'federation rolled back by the operator');
    }
  }

  private rolledBack(r: RollbackRecord) {
    return this.events.event('model.rolled_back', { round: r.toRound, fromModel: r.fromModel, toModel: r.toModel, failedRound: r.failedRound, rollbackId: r.id, reason: r.reason, requestedAt: r.requestedAt });
  }
}
