/**
 * A round whose updates all take the checked fold reads the base model only in the fold's own pass (begin() does
 * not read it for max |base|: only check() uses that), and a round that does call check() still refuses an
 * out-of-bound weight as before.
 */
import { describe, expect, it } from 'vitest';
import type { TensorReader } from '../../coordinator/aggregation/base-blocks.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { foldFixture } from '../helpers/fold-fixture.ts';

const fixture = foldFixture([5, 1000, 8193, 20003]);
const { specs, total, update, baseModel, bundleOf } = fixture;

/** The base through the reader interface, counting the values read. */
function countingReader(): { reader: TensorReader; read: () => number } {
  const base = bundleOf(baseModel(3));
  let read = 0;
  const reader: TensorReader = {
    size: (name) => base.get(name)?.data.length,
    read: (name, from, out) => {
      out.set(base.get(name)!.data.subarray(from, from + out.length));
      read += out.length;
    },
    close: () => undefined,
  };
  return { reader, read: () => read };
}

describe('the round base read for max |base|', () => {
  it('is not read by begin(); a checked-fold round reads it once per fold pass', () => {
    const { reader, read } = countingReader();
    const s = new ComposedStrategy(PlanSchema.parse({ aggregation: {} }).aggregation);
    const agg = s.begin(reader, specs, { expected: 2 });
    expect(read()).toBe(0);
    const v = agg.checkAndAddBatch!([0, 1].map((k) => ({ update: update(10 + k), info: { site: `s${k}`, numSamples: 5 } })));
    expect(v?.every((x) => !x.problem)).toBe(true);
    expect(read()).toBe(total);
  });

  it('is read when check() needs it, and still refuses a weight beyond maxValue', () => {
    const { reader, read } = countingReader();
    const s = new ComposedStrategy(PlanSchema.parse({ aggregation: { validation: { maxValue: 10 } } }).aggregation);
    const agg = s.begin(reader, specs, { expected: 2 });
    const bad = update(20);
    bad.get('t2')!.data[77] = 11;
    expect(agg.check(bad, { site: 's0', numSamples: 5 }).problem).toMatch(/maxValue|beyond/);
    expect(read()).toBeGreaterThanOrEqual(total);
    expect(agg.check(update(21), { site: 's1', numSamples: 5 }).problem).toBeUndefined();
  });
});
