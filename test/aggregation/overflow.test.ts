/**
 * Issue 14, item 1, at the aggregation layer: one site's huge but finite values (3e38) must not overflow the
 * weighted sum, are refused by the default plan before they count, and a finished aggregate is checked as a
 * whole. Also the cap on one site's share of a round's weight (maxWeightShare) and its water-filling.
 */
import { describe, expect, it } from 'vitest';
import { WeightedMeanAggregator } from '../../coordinator/aggregation/fedavg.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { aggregateProblem } from '../../coordinator/aggregation/validate.ts';
import { cappedWeights } from '../../coordinator/aggregation/weight-share.ts';
import { DEFAULT_MAX_NORM_FACTOR, PlanSchema } from '../../shared/plan/schema.ts';
import { SPECS, SIZE, aggregationPlan, flatBundle, flatOf, honestUpdates } from './helpers.ts';

const base = Array.from({ length: SIZE }, (_, i) => 0.1 * Math.sin(i));
const poisoned = () => base.map((v, i) => (i === 3 ? 3e38 : v));

describe('float64 accumulation', () => {
  for (const simd of [true, false]) {
    it(`a weighted sum of 3e38 values stays finite (${simd ? 'wasm SIMD' : 'plain JS'} fold)`, () => {
      const agg = new WeightedMeanAggregator(SPECS, { simd });
      expect(agg.kernel).toBe(simd ? 'wasm-simd' : 'js');
      // In float32, 4 × 3e38 alone is +Inf; the mean of the two is 1.5e38, which float32 holds.
      agg.add(flatBundle(poisoned()), { site: 'evil', numSamples: 4 });
      agg.add(flatBundle(base), { site: 'honest', numSamples: 4 });
      const out = flatOf(agg.finish());
      expect(out.every(Number.isFinite)).toBe(true);
      expect(out[3]).toBeCloseTo(1.5e38 + 0.05 * Math.sin(3), -32);
      expect(out[7]).toBeCloseTo(base[7], 6);
    });
  }
});

describe('the default plan bounds magnitudes', () => {
  it('defaults: maxValue 1e6, relative norm bound on (off with secure aggregation or 0), maxWeightShare 0.5', () => {
    const a = PlanSchema.parse({}).aggregation;
    expect(a.validation.maxValue).toBe(1e6);
    expect(a.validation.maxNormFactor).toBe(DEFAULT_MAX_NORM_FACTOR);
    expect(a.maxWeightShare).toBe(0.5);
    expect(aggregationPlan({ validation: { maxNormFactor: 0 } }).validation.maxNormFactor).toBeUndefined();
    expect(aggregationPlan({ validation: { maxNormFactor: 3 } }).validation.maxNormFactor).toBe(3);
    // Secure aggregation cannot see single updates: the default does not make such a plan invalid.
    const sa = PlanSchema.parse({ aggregation: { secureAggregation: { enabled: true } } }).aggregation;
    expect(sa.validation.maxNormFactor).toBeUndefined();
    expect(() => PlanSchema.parse({ aggregation: { secureAggregation: { enabled: true }, validation: { maxNormFactor: 4 } } })).toThrow(/secureAggregation cannot check/);
  });

  it('refuses a 3e38 update from the very first update of the very first round, naming the bound', () => {
    const s = new ComposedStrategy(aggregationPlan({}));
    const round = s.begin(flatBundle(base), SPECS);
    const v = round.check(flatBundle(poisoned()), { site: 'evil', numSamples: 4 });
    expect(v.problem).toMatch(/proposes weight 3\.000e\+38 in tensor "a\.weight" at index 3, beyond the plan's bound ±1000000 \(aggregation\.validation\.maxValue\)/);
    // Honest updates pass, and take no extra pass over their values (the norm already bounds them).
    for (const u of honestUpdates(base, 3)) expect(round.check(flatBundle(u), { site: 'a', numSamples: 4 }).problem).toBeUndefined();
  });

  it('bounds the weights a delta-encoded update proposes (base + Δ), not only Δ', () => {
    const s = new ComposedStrategy(aggregationPlan({ validation: { maxValue: 10 } }));
    const round = s.begin(flatBundle(base.map(() => 9)), SPECS, { deltaUpdates: true });
    expect(round.check(flatBundle(base.map(() => 0.5)), { site: 'a', numSamples: 1, isDelta: true }).problem).toBeUndefined();
    expect(round.check(flatBundle(base.map((_, i) => (i === 5 ? 2 : 0.5))), { site: 'a', numSamples: 1, isDelta: true }).problem).toMatch(/weight 11\.00 .* index 5/);
  });

  it('aggregateProblem names a non-finite or out-of-bound aggregate and passes a sane one', () => {
    expect(aggregateProblem(flatBundle(base), 1e6)).toBeUndefined();
    expect(aggregateProblem(flatBundle(base.map((v, i) => (i === 33 ? Infinity : v))), 1e6)).toBe('the aggregate holds +Inf in tensor "b.bias" at index 1');
    expect(aggregateProblem(flatBundle(base.map((v, i) => (i === 0 ? Number.NaN : v))))).toMatch(/NaN in tensor "a\.weight" at index 0/);
    expect(aggregateProblem(flatBundle(base.map((v, i) => (i === 2 ? -2e6 : v))), 1e6)).toMatch(/-2\.000e\+6 .* beyond ±1000000/);
  });
});

describe('maxWeightShare', () => {
  it('water-fills: the largest weights are lowered until none exceeds the share', () => {
    expect(cappedWeights([4, 4, 1_000_000], 0.5)).toEqual([4, 4, 8]);
    expect(cappedWeights([10, 20, 30], 0.5)).toEqual([10, 20, 30]); // nothing to do
    const w = cappedWeights([1, 1, 1, 100, 50], 0.4);
    const total = w.reduce((a, b) => a + b, 0);
    expect(Math.max(...w) / total).toBeCloseTo(0.4, 9);
    expect(w.slice(0, 3)).toEqual([1, 1, 1]);
    // Two sites at 0.5, or a share below 1/n: no weighting is possible that satisfies it, so all get the smallest.
    expect(cappedWeights([4, 1_000_000], 0.5)).toEqual([4, 4]);
    expect(cappedWeights([5, 6, 7, 8], 0.2)).toEqual([5, 5, 5, 5]);
    expect(cappedWeights([3, 1_000_000], 1)).toEqual([3, 1_000_000]);
  });

  it('reweight after the fact gives the mean folding with the capped weight would have given (composed, clipped too)', () => {
    const ups = honestUpdates(base, 3, 7);
    for (const cfg of [{}, { clipNorm: 0.05 }]) {
      const s = new ComposedStrategy(aggregationPlan(cfg));
      const r = s.begin(flatBundle(base), SPECS);
      ups.forEach((u, i) => r.add(flatBundle(u), { site: `s${i}`, numSamples: [4, 4, 1_000_000][i] }));
      r.reweight!(flatBundle(ups[2]), { site: 's2', numSamples: 1_000_000 }, 8);
      const got = flatOf(r.finish());
      const ref = new ComposedStrategy(aggregationPlan(cfg)).begin(flatBundle(base), SPECS);
      ups.forEach((u, i) => ref.add(flatBundle(u), { site: `s${i}`, numSamples: [4, 4, 8][i] }));
      const want = flatOf(ref.finish());
      for (let j = 0; j < SIZE; j++) expect(got[j]).toBeCloseTo(want[j], 6);
    }
  });
});
