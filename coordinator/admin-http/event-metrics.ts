/**
 * Moves the coordinator's counters from its event stream (shared/events/bus.ts): the round engine already
 * announces every round, update and decline there, so metrics need no calls of their own in the engine.
 */
import type { EventBus, FederationEvent } from '../../shared/events/bus.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { CoordinatorMetrics } from './metrics.ts';
import { roundFailureCause, updateRejectionReason } from '../events/reasons.ts';

/** Subscribes `metrics` to `bus`; returns the unsubscribe function. */
export function feedMetricsFromEvents(bus: EventBus, metrics: CoordinatorMetrics, store: Pick<CoordinatorStore, 'getRound'>): () => void {
  return bus.subscribe((e) => observe(e, metrics, store));
}

function observe(e: FederationEvent, m: CoordinatorMetrics, store: Pick<CoordinatorStore, 'getRound'>): void {
  const site = typeof e.site === 'string' ? e.site : '';
  switch (e.type) {
    case 'round.started':
      m.roundsOpened.inc();
      break;
    case 'round.closed':
      m.roundsClosed.inc();
      observeDuration(e, m, store, 'closed');
      break;
    case 'round.failed':
      m.roundsFailed.inc({ cause: roundFailureCause(e) });
      observeDuration(e, m, store, 'failed');
      break;
    case 'update.accepted':
      m.updatesAccepted.inc({ site });
      break;
    case 'update.rejected':
      m.updatesRejected.inc({ site, reason: updateRejectionReason(typeof e.reason === 'string' ? e.reason : '') });
      break;
    case 'update.flagged':
      m.updatesFlagged.inc({ site });
      break;
    case 'task.declined':
      m.tasksDeclined.inc({ site });
      break;
    case 'task.withheld':
      m.tasksWithheld.inc({ site });
      break;
    case 'model.rolled_back':
      m.rollbacks.inc();
      break;
    default:
      break;
  }
}

/** Opening time from the store, not from round.started: a round resumed after a restart has no start event here. */
function observeDuration(e: FederationEvent, m: CoordinatorMetrics, store: Pick<CoordinatorStore, 'getRound'>, outcome: 'closed' | 'failed'): void {
  if (typeof e.round !== 'number') return;
  const row = store.getRound(e.round);
  const at = Date.parse(e.at);
  if (!row || !Number.isFinite(at)) return;
  m.roundDuration.observe({ outcome }, Math.max(0, (at - row.openedAt) / 1000));
}
