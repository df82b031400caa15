/**
 * The checked fold (checked-fold.ts): checking an update and folding it in one pass gives what the norm pass and
 * then the fold gave — the same norm and the same float64 sums bit for bit, native and JS, weights against a
 * base, delta uploads and no base, at lengths across the block edges — and a round through checkAndAdd() gives
 * check() + add()'s verdicts, norms and model. An update with a NaN, an Inf or a weight beyond maxValue anywhere
 * leaves nothing folded; one refused by the norm bound (known only after the last block) or retracted is taken
 * out again within float64 rounding. The native half fails with the loader's reason where the addon is not built.
 */
import { describe, expect, it } from 'vitest';
import { checkedFold, checkedFoldJs, type CheckedFold, type FoldTarget } from '../../coordinator/aggregation/checked-fold.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { WeightedMeanAggregator } from '../../coordinator/aggregation/fedavg.ts';
import { deltaNormJs } from '../../coordinator/aggregation/validate.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { foldFixture, maxUlpDiff, type RoundResult } from '../helpers/fold-fixture.ts';

// Past both block sizes (native 8192, JS 16384 floats), at every length mod 4.
const SIZES = [1, 3, 4, 5, 1000, 8191, 8193, 16385, 40003];
const fixture = foldFixture(SIZES);
const { specs, offsets, total, update, baseModel, bundleOf } = fixture;

function nativeFold(): CheckedFold {
  const addon = loadOneDnnKernels().kernels?.addon as { foldChecked?: unknown } | undefined;
  if (typeof addon?.foldChecked !== 'function') throw new Error('native foldChecked unavailable: build the addon (npm run build:native)');
  return checkedFold;
}

/** A fresh mean with a few updates already folded (so taking one out has non-zero sums to restore). */
function meanWith(simd: boolean, preload: number[]): { mean: WeightedMeanAggregator; target: FoldTarget } {
  const mean = new WeightedMeanAggregator(specs, { simd });
  for (const k of preload) mean.addWeighted(update(k), 7 + k);
  return { mean, target: { sums: mean.rawSums, foldBlock: (off, x, a) => mean.foldBlock(off, x, a) } };
}

/** Index of the first element that differs (Object.is: bit patterns of NaN aside), or -1; cheaper than toEqual on long arrays. */
function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}

const FOLDS: [string, () => CheckedFold][] = [['js', () => checkedFoldJs], ['native', nativeFold]];

describe.each(FOLDS)('checked fold (%s) against the norm pass + fold', (_, get) => {
  it('gives deltaNormJs bit for bit and the same sums as addWeighted, with and without a base, SIMD arena or not', () => {
    const fold = get();
    const base = baseModel(3);
    for (const simd of [true, false]) {
      for (const spread of [0, 6]) {
        const u = update(spread + 11, spread);
        for (const [isDelta, b] of [[false, base], [true, base], [false, undefined]] as const) {
          const ref = meanWith(simd, [1, 2]);
          ref.mean.addWeighted(u, 13);
          const got = meanWith(simd, [1, 2]);
          const r = fold(u, isDelta, b, offsets, got.target, 13, 1e30);
          expect(r.valuesOk).toBe(true);
          expect(r.norm).toBe(deltaNormJs(u, isDelta, b, offsets));
          expect(firstDifference(got.mean.rawSums, ref.mean.rawSums)).toBe(-1);
        }
      }
    }
  });

  it('folds nothing of an update with a NaN, ±Inf or a weight beyond maxValue, wherever it sits', () => {
    const fold = get();
    const base = baseModel(4);
    const ref = meanWith(true, [1, 2]);
    const before = Array.from(ref.mean.rawSums);
    // First value, inside a later block of a long tensor, the very last value.
    const spots: [string, number][] = [['t0', 0], ['t8', 20000], ['t8', 40002], ['t6', 8192]];
    for (const [name, at] of spots) {
      for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 2e6]) {
        for (const isDelta of [false, true]) {
          const u = update(21);
          u.get(name)!.data[at] = bad;
          const got = meanWith(true, [1, 2]);
          const r = fold(u, isDelta, base, offsets, got.target, 9, 1e6);
          expect(r.valuesOk).toBe(false);
          const sums = got.mean.rawSums;
          // Taken out again: within float64 rounding of |sum| + |a·x| (|a·x| ≤ 9 × 1.6 here).
          let worst = 0;
          for (let i = 0; i < total; i++) worst = Math.max(worst, Math.abs(sums[i] - before[i]) / (Math.abs(before[i]) + 15));
          expect(worst).toBeLessThanOrEqual(2 ** -51);
        }
      }
    }
  });

  it('refuses a delta upload whose base + Δ leaves ±maxValue even though Δ itself is small', () => {
    const fold = get();
    const base = baseModel(5);
    base[offsets.get('t7')!.off + 3] = 999_999.5;
    const u = update(22);
    u.get('t7')!.data[3] = 1;
    const got = meanWith(true, []);
    expect(fold(u, true, base, offsets, got.target, 1, 1e6).valuesOk).toBe(false);
    expect(got.mean.rawSums.every((v) => v === 0)).toBe(true);
    expect(fold(u, false, base, offsets, got.target, 1, 1e6).valuesOk).toBe(true); // as weights, 1 is fine
  });
});

/** One round of `ups`, each through checkAndAdd (fused) or check + add (the path before). */
function runRound(s: ComposedStrategy, base: TensorBundle, ups: TensorBundle[], fused: boolean, isDelta = false, weights = ups.map((_, k) => 10 + k)): RoundResult {
  const agg = s.begin(base, specs, { expected: ups.length, deltaUpdates: isDelta });
  const verdicts = ups.map((u, k) => {
    const info = { site: `s${k}`, numSamples: weights[k], isDelta };
    if (fused) {
      const v = agg.checkAndAdd!(u, info);
      if (!v) throw new Error('expected the fused path');
      return v;
    }
    const v = agg.check(u, info);
    if (!v.problem) agg.add(u, info, v);
    return v;
  });
  return fixture.finishRound(agg, verdicts);
}

describe.each(FOLDS)('checkAndAdd (%s) against check() + add()', (_, get) => {
  const plan = (aggregation: Record<string, unknown>) => PlanSchema.parse({ aggregation }).aggregation;

  it('the default checked round: the same verdicts, norms and model bit for bit', () => {
    const checkedFold = get();
    const base = bundleOf(baseModel(6));
    const ups = [1, 2, 3, 4, 5].map((k) => update(k, 2));
    for (const cfg of [plan({}), plan({ validation: { maxNorm: 1e9 } }), plan({ serverOptimizer: { type: 'fedadam' } }), plan({ validation: { maxNormFactor: 0 } })]) {
      const a = runRound(new ComposedStrategy(cfg), base, ups, false);
      const b = runRound(new ComposedStrategy(cfg, { checkedFold }), base, ups, true);
      expect(b.verdicts).toEqual(a.verdicts);
      expect(b.norms).toEqual(a.norms);
      expect(b.count).toBe(5);
      expect(firstDifference(b.out, a.out)).toBe(-1);
    }
  });

  it('delta uploads: the same verdicts and model bit for bit', () => {
    const checkedFold = get();
    const base = bundleOf(baseModel(7));
    const ups = [1, 2, 3].map((k) => update(k, 1, 0.01));
    const a = runRound(new ComposedStrategy(plan({})), base, ups, false, true);
    const b = runRound(new ComposedStrategy(plan({}), { checkedFold }), base, ups, true, true);
    expect(b.verdicts).toEqual(a.verdicts);
    expect(firstDifference(b.out, a.out)).toBe(-1);
  });

  it('refusals get check()\'s words, count nothing, and leave the model within a float32 ulp of the round without them', () => {
    const checkedFold = get();
    const cfg = plan({ validation: { maxNormFactor: 3 } });
    const { base, good, ups } = fixture.refusalRound();
    const a = runRound(new ComposedStrategy(cfg), base, ups, false);
    const b = runRound(new ComposedStrategy(cfg, { checkedFold }), base, ups, true);
    expect(b.verdicts.map((v) => v.problem)).toEqual(a.verdicts.map((v) => v.problem));
    expect(b.verdicts[3].problem).toMatch(/tensor "t8" holds NaN at index 30000/);
    expect(b.verdicts[4].problem).toMatch(/more than 3 × the median/);
    expect(b.verdicts[5].problem).toMatch(/beyond the plan's bound/);
    expect(b.norms).toEqual(a.norms);
    expect(b.count).toBe(4);
    const clean = runRound(new ComposedStrategy(cfg, { checkedFold }), base, good, true, false, [10, 11, 12, 16]);
    expect(maxUlpDiff(b.out, clean.out)).toBeLessThanOrEqual(1);
    expect(maxUlpDiff(b.out, a.out)).toBeLessThanOrEqual(1);
  });

  it('retract() after checkAndAdd() leaves the round as if the update never came', () => {
    const checkedFold = get();
    const cfg = plan({});
    const base = bundleOf(baseModel(9));
    const ups = [1, 2, 3].map((k) => update(k));
    const s = new ComposedStrategy(cfg, { checkedFold });
    const agg = s.begin(base, specs, { expected: 4 });
    for (const [k, u] of ups.entries()) agg.checkAndAdd!(u, { site: `s${k}`, numSamples: 10 + k });
    const extra = update(40);
    const info = { site: 'late', numSamples: 99 };
    const v = agg.checkAndAdd!(extra, info)!;
    expect(v.problem).toBeUndefined();
    agg.retract!(extra, info, v);
    expect(agg.count).toBe(3);
    const out = agg.finish();
    const got = new Float32Array(total);
    for (const sp of specs) got.set(out.get(sp.name)!.data, offsets.get(sp.name)!.off);
    const clean = runRound(new ComposedStrategy(cfg), base, ups, false);
    expect(maxUlpDiff(got, clean.out)).toBeLessThanOrEqual(1);
  });
});

describe('checkAndAdd where it cannot fold while checking', () => {
  it('says so (undefined) for clipping, DP and clipped robust rules, which then use check() + add()', () => {
    const base = bundleOf(baseModel(10));
    for (const aggregation of [{ clipNorm: 1 }, { dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } }, { strategy: 'median', clipNorm: 1 }, { strategy: 'trimmed-mean', trimFraction: 0.1, clipNorm: 1 }]) {
      const s = new ComposedStrategy(PlanSchema.parse({ aggregation }).aggregation);
      const agg = s.begin(base, specs, { expected: 2 });
      expect(agg.checkAndAdd!(update(1), { site: 'a', numSamples: 5 })).toBeUndefined();
      expect(agg.count).toBe(0);
      agg.discard?.();
    }
  });
});
