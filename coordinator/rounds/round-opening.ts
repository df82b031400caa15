/**
 * Opening a round with the sites chosen for it: its row and stage (the fine-tuning stage drops the pretraining
 * stage's aggregation state), the features' onRoundOpening, the aggregator, then the row stored as open with its
 * `round.started` event in one transaction. The engine takes the round over and announces it.
 */
import type { FederationEvent } from '../../shared/events/bus.ts';
import { outboxRows } from '../events/outbox.ts';
import type { RoundRow } from '../store/store.ts';
import type { AggregationState } from './aggregation-state.ts';
import { aggregatorContext, type OpenRound } from './open-round.ts';
import { pretrainingRounds, type Stage, stageAfter } from './pretraining-stage.ts';
import type { RoundParts } from './round-parts.ts';

/** Above this many selected sites the `round started` line gives the count and leaves the names to debug. */
const MAX_NAMES_AT_INFO = 50;

export interface RoundOpeningOptions extends RoundParts {
  aggregationState: AggregationState;
}

export class RoundOpening {
  constructor(private readonly o: RoundOpeningOptions) {}

  /** The next round from `baseModelHash` with `selected`, stored as open; its `round.started` event is not yet published. Throws what storing threw (nothing is then open). */
  begin(selected: string[], baseModelHash: string): { opened: OpenRound; started: FederationEvent } {
    const { store, plan } = this.o;
    const now = Date.now();
    const row: RoundRow = { round: store.lastRoundNumber() + 1, state: 'open', baseModelHash, selected, openedAt: now, deadlineAt: now + plan.roundDeadlineSeconds * 1000, closedAt: null, resultModelHash: null, note: null };
    const stage = stageAfter(plan, store.closedRoundCount());
    if (stage.kind === 'fine-tuning' && stage.index === 1 && pretrainingRounds(plan) > 0) this.o.aggregationState.forgetPretraining();
    this.o.features.onRoundOpening(row.round, stage);
    // The aggregator first: the store says a round is open only once it can run here too.
    const aggregator = this.o.strategy.begin(this.o.models.reader(row.baseModelHash), this.o.shared, aggregatorContext(row, plan.compression.delta));
    const started = this.o.events.event('round.started', { round: row.round, selected, model: row.baseModelHash, ...this.stageFields(stage) });
    try {
      store.openRound(row, outboxRows(started));
    } catch (e) {
      aggregator.discard?.();
      throw e;
    }
    return { opened: { row, aggregator, reported: new Set(), closing: false, stage }, started };
  }

  /** Publishes the round's `round.started` event and logs it. */
  announce(opened: OpenRound, started: FederationEvent): void {
    const { row } = opened;
    this.o.events.publish(started);
    // Names at info only for a small federation: at 1,000 sites one line would carry 1,000 names (debug has them all).
    const names = row.selected.length <= MAX_NAMES_AT_INFO ? { selected: row.selected } : {};
    this.o.log.info({ round: row.round, sites: row.selected.length, ...names, model: row.baseModelHash.slice(0, 12), ...this.stageFields(opened.stage) }, 'round started');
    if (row.selected.length > MAX_NAMES_AT_INFO) this.o.log.debug({ round: row.round, selected: row.selected }, 'round started: selected sites');
  }

  /** With a pretraining stage in the plan, events and logs say which stage a round is in. */
  private stageFields(stage: Stage): Record<string, unknown> {
    return pretrainingRounds(this.o.plan) > 0 ? { stage: stage.kind, stageRound: stage.index } : {};
  }
}
