/**
 * The round the engine is running, as its modules share it: the stored row, the running aggregate, who reported or
 * declined, and whether the round still takes input. Only the engine replaces the open round; its modules read it
 * and mark what they decide (reported, declined, closing).
 */
import type { RoundAggregator } from '../aggregation/strategy.ts';
import type { RoundRow } from '../store/store.ts';
import type { Stage } from './pretraining-stage.ts';
import type { RoundInput, RoundView } from './round-feature.ts';

export interface OpenRound {
  row: RoundRow;
  aggregator: RoundAggregator;
  reported: Set<string>;
  /** Selected sites that declined this round's task (their policy or head forbids it): not waited for. */
  declined?: Set<string>;
  timer?: NodeJS.Timeout;
  closing: boolean;
  /** The feature that collects the round's input instead of uploads (round-feature.ts RoundInput), if one does. */
  collector?: { feature: string; input: RoundInput };
  /** Pretraining or fine-tuning (plan.pretraining), fixed when the round opened. */
  stage: Stage;
  /**
   * Why the running aggregate may no longer be the fold of the round's stored updates (a fold or a take-out that
   * failed part-way): the close rebuilds it from them first (round-ending.ts), as a restart would.
   */
  staleAggregate?: string;
}

/** The round as features see it. */
export function roundView(open: OpenRound): RoundView {
  return { row: open.row, stage: open.stage, reported: open.reported, inputCollectedBy: open.collector?.feature };
}

/** Every selected site either reported or declined: nobody is left to wait for. */
export function allAccountedFor(open: OpenRound): boolean {
  return open.row.selected.every((s) => open.reported.has(s) || open.declined?.has(s));
}

/** What the strategy's aggregator needs to know of round `row` when it begins. */
export function aggregatorContext(row: RoundRow, deltaUpdates: boolean): { expected: number; deltaUpdates: boolean } {
  return { expected: row.selected.length, deltaUpdates };
}
