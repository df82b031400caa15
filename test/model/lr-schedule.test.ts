/**
 * The federation-wide learning-rate schedule: warm-up, cosine and poly shapes at known positions, the last
 * update of the last round at exactly minFactor, continuity across rounds, and the plan/task plumbing.
 */
import { describe, expect, it } from 'vitest';
import { federationSchedule, LrScheduleSchema, scheduleFactor } from '../../shared/model/lr-schedule.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';

const sched = (o: object) => LrScheduleSchema.parse(o);

describe('learning-rate schedule', () => {
  it('constant is 1, after a linear warm-up from 1/warmupSteps', () => {
    const s = sched({ type: 'constant', warmupSteps: 4 });
    expect([1, 2, 3, 4, 5, 100].map((k) => scheduleFactor(s, k, 100))).toEqual([0.25, 0.5, 0.75, 1, 1, 1]);
  });

  it('cosine: 1 at the start, halfway between 1 and minFactor in the middle, minFactor at the last update', () => {
    const s = sched({ type: 'cosine', minFactor: 0.1 });
    expect(scheduleFactor(s, 1, 1000)).toBeCloseTo(1, 4);
    expect(scheduleFactor(s, 500, 1000)).toBeCloseTo(0.55, 10);
    expect(scheduleFactor(s, 1000, 1000)).toBeCloseTo(0.1, 12);
    // Past the planned end (a repeated round) it stays at the end.
    expect(scheduleFactor(s, 1200, 1000)).toBeCloseTo(0.1, 12);
  });

  it('cosine with warm-up: the decay spans the updates after the warm-up', () => {
    const s = sched({ type: 'cosine', warmupSteps: 10, minFactor: 0 });
    expect(scheduleFactor(s, 5, 110)).toBeCloseTo(0.5, 12);
    expect(scheduleFactor(s, 10, 110)).toBeCloseTo(1, 12);
    expect(scheduleFactor(s, 60, 110)).toBeCloseTo(0.5, 12);
    expect(scheduleFactor(s, 110, 110)).toBeCloseTo(0, 12);
  });

  it('poly follows (1 − progress)^0.9 between 1 and minFactor', () => {
    const s = sched({ type: 'poly', minFactor: 0 });
    expect(scheduleFactor(s, 50, 100)).toBeCloseTo(Math.pow(0.5, 0.9), 12);
    expect(scheduleFactor(s, 100, 100)).toBe(0);
    const floor = sched({ type: 'poly', minFactor: 0.2 });
    expect(scheduleFactor(floor, 50, 100)).toBeCloseTo(0.2 + 0.8 * Math.pow(0.5, 0.9), 12);
  });

  it('runs over the whole federation: round r continues where round r − 1 stopped; the last round ends at minFactor', () => {
    const s = sched({ type: 'cosine', minFactor: 0.05 });
    const steps = 96;
    const rounds = 8;
    const all: number[] = [];
    for (let r = 1; r <= rounds; r++) {
      const f = federationSchedule(s, { round: r, rounds, steps });
      for (let k = 0; k < steps; k++) all.push(f(k));
    }
    expect(all).toHaveLength(rounds * steps);
    for (let i = 1; i < all.length; i++) expect(all[i]).toBeLessThanOrEqual(all[i - 1]);
    expect(all.at(-1)).toBeCloseTo(0.05, 12);
    // Round 5's first step is update 4·96 + 1 of 768, not a restart at 1.
    expect(federationSchedule(s, { round: 5, rounds, steps })(0)).toBeCloseTo(scheduleFactor(s, 4 * 96 + 1, 768), 12);
    expect(federationSchedule(s, { round: 5, rounds, steps })(0)).toBeLessThan(0.6);
    expect(() => federationSchedule(s, { round: 0, rounds, steps })).toThrow(RangeError);
  });

  it('is a plan option (local.schedule, absent by default) that travels in the task with totalRounds', () => {
    expect(defaultPlan({}).local.schedule).toBeUndefined();
    const plan = defaultPlan({ local: { schedule: { type: 'cosine', warmupSteps: 20 } } });
    expect(plan.local.schedule).toEqual({ type: 'cosine', warmupSteps: 20, minFactor: 0.01 });
    expect(() => defaultPlan({ local: { schedule: { type: 'step' } } } as never)).toThrow();
    const task = TaskSettingsSchema.parse({
      federation: 'f',
      model: { ...plan.model, pretrained: undefined, source2d: undefined },
      local: plan.local,
      share: plan.share,
      sharedTensors: [],
      totalRounds: plan.rounds,
    });
    expect(task.local.schedule).toEqual(plan.local.schedule);
    expect(task.totalRounds).toBe(3);
  });
});
