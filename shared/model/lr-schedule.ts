/**
 * Learning-rate schedule over the whole federation, not one round: a site's k-th update of the federation is
 * update (round − 1)·steps + step (step counted from 1), of rounds·steps in all, so late rounds take small steps
 * and the last round, whose model is the result, is the calmest. A restart per round would undo that.
 *
 *   constant  factor 1 (after any warm-up)
 *   cosine    minFactor + (1 − minFactor)·½(1 + cos(π·progress))
 *   poly      minFactor + (1 − minFactor)·(1 − progress)^0.9 (nnU-Net's exponent)
 *
 * progress runs from 0 after the warm-up to 1 at the federation's last update, which gets exactly minFactor.
 * Warm-up: the first warmupSteps updates of the federation ramp linearly from 1/warmupSteps to 1.
 */
import { z } from 'zod';

export const LrScheduleSchema = z
  .object({
    type: z.enum(['constant', 'cosine', 'poly']).default('constant'),
    /** Updates of the federation (round 1 first) that ramp the learning rate up linearly. */
    warmupSteps: z.number().int().min(0).default(0),
    /** The factor at the federation's last update (cosine, poly). */
    minFactor: z.number().min(0).max(1).default(0.01),
  })
  .strict();

export type LrSchedule = z.infer<typeof LrScheduleSchema>;

const POLY_EXPONENT = 0.9;

/** Factor on the base learning rate for update `k` (1-based) of `total` updates. */
export function scheduleFactor(s: LrSchedule, k: number, total: number): number {
  if (!(total >= 1) || !(k >= 1)) throw new RangeError(`schedule: update ${k} of ${total} (both count from 1)`);
  const warm = s.warmupSteps > 0 && k <= s.warmupSteps ? k / s.warmupSteps : 1;
  if (s.type === 'constant') return warm;
  const span = total - s.warmupSteps;
  // Past the planned end (an extra or repeated round) the schedule stays at its end.
  const progress = span <= 0 ? 1 : Math.min(1, Math.max(0, (k - s.warmupSteps) / span));
  const shape = s.type === 'cosine' ? 0.5 * (1 + Math.cos(Math.PI * progress)) : Math.pow(1 - progress, POLY_EXPONENT);
  return warm * (s.minFactor + (1 - s.minFactor) * shape);
}

/**
 * The factor for each step (0-based) of round `round` (1-based) of `rounds`, each round `steps` updates: what a
 * trainer multiplies its learning rate by.
 */
export function federationSchedule(s: LrSchedule, at: { round: number; rounds: number; steps: number }): (step: number) => number {
  const { round, rounds, steps } = at;
  if (!(Number.isInteger(round) && round >= 1 && Number.isInteger(rounds) && rounds >= 1 && Number.isInteger(steps) && steps >= 1)) {
    throw new RangeError(`schedule: round ${round} of ${rounds} with ${steps} steps (integers, ≥ 1)`);
  }
  const before = (round - 1) * steps;
  return (step) => scheduleFactor(s, before + step + 1, rounds * steps);
}
