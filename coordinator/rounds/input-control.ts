/**
 * What a feature that collects a round's input (round-feature.ts RoundInput) may do with that round: fold a sum in
 * the engine's fold queue, close or fail the round, ask whether it still takes input.
 */
import { acceptsSums } from '../aggregation/composed.ts';
import type { FoldQueue } from './fold-queue.ts';
import type { OpenRound } from './open-round.ts';
import type { RoundInputControl } from './round-feature.ts';
import type { RoundEnding } from './round-ending.ts';

export interface InputControlOptions {
  folds: FoldQueue;
  strategyName: string;
  /** Whether `open` is still the engine's open round. */
  isCurrent(open: OpenRound): boolean;
  /** Whether the engine was stopped. */
  stopped(): boolean;
  /** How the round ends (round-ending.ts). */
  ending: Pick<RoundEnding, 'close' | 'failAndMoveOn'>;
}

export function inputControl(open: OpenRound, o: InputControlOptions): RoundInputControl {
  const takesInput = () => o.isCurrent(open) && !open.closing;
  return {
    isAccepting: takesInput,
    foldSum: (make) =>
      o.folds.run(() => {
        if (!o.isCurrent(open) || open.closing) return false;
        const { sum, weight, sites } = make();
        if (!acceptsSums(open.aggregator)) throw new Error(`strategy ${o.strategyName} cannot take a sum of several sites' updates`);
        open.aggregator.addSum(sum, weight, sites.length);
        for (const s of sites) open.reported.add(s);
        return true;
      }),
    close: (why) => o.ending.close(open, why),
    fail: (note) => {
      if (!o.stopped() && takesInput()) o.ending.failAndMoveOn(open, note);
    },
  };
}
