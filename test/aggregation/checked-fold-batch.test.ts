/**
 * The batched checked fold (checked-fold.ts CheckedFoldBatch, fold.cc fold_checked_batch): k waiting updates checked
 * and folded in one pass over the sums give what k one-by-one checked folds give — the same norms and the same
 * float64 sums byte for byte, native and JS, against a base, delta uploads and no base, at lengths across the block
 * edges, however the updates are batched. A round through checkAndAddBatch() gives checkAndAdd()'s verdicts, norms
 * and model byte for byte, from decoded bundles or from the update files read a block at a time; an update with a
 * NaN or a weight beyond maxValue is refused alone, the rest of its batch kept. The native half fails with the
 * loader's reason where the addon is not built.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { baseBlocks } from '../../coordinator/aggregation/base-blocks.ts';
import { checkedFold, checkedFoldBatch, checkedFoldBatchJs, checkedFoldJs, type CheckedFold, type CheckedFoldBatch, type FoldTarget } from '../../coordinator/aggregation/checked-fold.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { WeightedMeanAggregator } from '../../coordinator/aggregation/fedavg.ts';
import type { BatchItem, } from '../../coordinator/aggregation/strategy.ts';
import { openModelReader } from '../../coordinator/models/model-reader.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { foldFixture, maxUlpDiff, type RoundResult } from '../helpers/fold-fixture.ts';

// Past both block sizes (native 8192 in 65,536-float chunks, JS 16384), at every length mod 4.
const SIZES = [1, 3, 4, 5, 1000, 8191, 8193, 16385, 70003];
const fixture = foldFixture(SIZES);
const { specs, offsets, total, update, baseModel, bundleOf } = fixture;
const dir = mkdtempSync(join(tmpdir(), 'medfl-fold-batch-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function nativeOnly(): void {
  const addon = loadOneDnnKernels().kernels?.addon as { foldChecked?: unknown; foldCheckedBatch?: unknown } | undefined;
  if (typeof addon?.foldChecked !== 'function' || typeof addon?.foldCheckedBatch !== 'function') throw new Error('native foldCheckedBatch unavailable: build the addon (npm run build:native)');
}

/** The one-by-one fold and the batch fold of one kind (the native pair, or the JS twins). */
const KINDS: [string, () => { one: CheckedFold; batch: CheckedFoldBatch }][] = [
  ['js', () => ({ one: checkedFoldJs, batch: checkedFoldBatchJs })],
  ['native', () => (nativeOnly(), { one: checkedFold, batch: checkedFoldBatch })],
];

/** Updates folded in before a test's own (made once: building them is most of a test's time on a busy machine). */
const preloaded = new Map<number, TensorBundle>();

function meanWith(simd: boolean, preload: number[]): { mean: WeightedMeanAggregator; target: FoldTarget } {
  const mean = new WeightedMeanAggregator(specs, { simd });
  for (const k of preload) {
    if (!preloaded.has(k)) preloaded.set(k, update(k));
    mean.addWeighted(preloaded.get(k)!, 7 + k);
  }
  return { mean, target: { sums: mean.rawSums, foldBlock: (off, x, a) => mean.foldBlock(off, x, a) } };
}

/** The two arrays' bytes equal (Float64 sums compared as bit patterns), or the first index where they differ. */
function firstByteDifference(a: Float64Array | Float32Array, b: Float64Array | Float32Array): number {
  const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  if (x.length !== y.length) return Math.min(x.length, y.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return -1;
}

/** Splits 0…n-1 into consecutive batches of the given sizes. */
function batches(sizes: number[]): number[][] {
  let at = 0;
  return sizes.map((k) => Array.from({ length: k }, () => at++));
}

describe.each(KINDS)('batched checked fold (%s) against one-by-one checked folds', (_, get) => {
  it('the same sums byte for byte and the same norms, whatever the batching, with and without a base, SIMD arena or not', { timeout: 600_000 }, () => {
    const { one, batch } = get();
    const base = baseModel(3);
    const ups = [11, 12, 13, 14, 15].map((k, j) => update(k, j % 2 ? 6 : 1));
    // Fractional coefficients: a·x then has a full float64 mantissa, so the sums round and their order shows.
    const w = ups.map((_, j) => 1 / (3 + 5 * j));
    for (const simd of [true, false]) {
      for (const [isDelta, b] of [[false, base], [true, base], [false, undefined]] as const) {
        const ref = meanWith(simd, [1, 2]);
        const refNorms = ups.map((u, j) => {
          const r = one(u, isDelta, b, offsets, ref.target, w[j], 1e30);
          expect(r.valuesOk).toBe(true);
          return r.norm;
        });
        for (const sizes of [[5], [2, 3]]) {
          const got = meanWith(simd, [1, 2]);
          const norms = batches(sizes).flatMap((js) => {
            const rs = batch(js.map((j) => ({ values: baseBlocks(ups[j], offsets), a: w[j] })), isDelta, b, offsets, got.target, 1e30);
            expect(rs.every((r) => r.valuesOk)).toBe(true);
            return rs.map((r) => r.norm);
          });
          expect(norms).toEqual(refNorms);
          expect(firstByteDifference(got.mean.rawSums, ref.mean.rawSums)).toBe(-1);
        }
      }
    }
  });

  it('equals the JS one-by-one fold, the reference, byte for byte', () => {
    const { batch } = get();
    const base = baseModel(4);
    const ups = [21, 22, 23, 24, 25].map((k) => update(k, 3));
    const ref = meanWith(false, [1]);
    for (const [j, u] of ups.entries()) checkedFoldJs(u, false, base, offsets, ref.target, 1 / (10 + j), 1e30);
    const got = meanWith(false, [1]);
    batch(ups.map((u, j) => ({ values: baseBlocks(u, offsets), a: 1 / (10 + j) })), false, base, offsets, got.target, 1e30);
    expect(firstByteDifference(got.mean.rawSums, ref.mean.rawSums)).toBe(-1);
  });

  it('refuses only the update with a NaN or a weight beyond maxValue; the sums within float64 rounding of the others alone', () => {
    const { batch } = get();
    const base = baseModel(5);
    for (const [tensor, index, value] of [['t0', 0, Number.NaN], ['t8', 69999, Number.POSITIVE_INFINITY], ['t5', 4000, 3e38]] as const) {
      const bad = update(40);
      bad.get(tensor)!.data[index] = value;
      const ups = [update(41), update(42), bad, update(43)];
      const got = meanWith(true, [1]);
      const rs = batch(ups.map((u, j) => ({ values: baseBlocks(u, offsets), a: 2 + j })), false, base, offsets, got.target, 1e6);
      expect(rs.map((r) => r.valuesOk)).toEqual([true, true, false, true]);
      expect(Number.isNaN(rs[2].norm)).toBe(true);
      const clean = meanWith(true, [1]);
      for (const j of [0, 1, 3]) checkedFoldJs(ups[j], false, base, offsets, clean.target, 2 + j, 1e6);
      let worst = 0;
      for (let i = 0; i < total; i++) worst = Math.max(worst, Math.abs(got.mean.rawSums[i] - clean.mean.rawSums[i]) / (Math.abs(clean.mean.rawSums[i]) + 100));
      expect(worst).toBeLessThanOrEqual(1e-12);
    }
  });
});

const plan = (aggregation: Record<string, unknown>) => PlanSchema.parse({ aggregation }).aggregation;
const weights = [10, 11, 12, 13, 14, 15, 16];

const finishRound = fixture.finishRound;

/** A round with checkAndAdd() one update at a time (the reference). */
function oneByOne(s: ComposedStrategy, base: TensorBundle, ups: TensorBundle[], isDelta = false): RoundResult {
  const agg = s.begin(base, specs, { expected: ups.length, deltaUpdates: isDelta });
  const verdicts = ups.map((u, k) => agg.checkAndAdd!(u, { site: `s${k}`, numSamples: weights[k], isDelta })!);
  return finishRound(agg, verdicts);
}

/** The same round through checkAndAddBatch() in batches of `sizes`; `item` makes each batch item. */
function batched(s: ComposedStrategy, base: TensorBundle, ups: TensorBundle[], sizes: number[], isDelta = false, item?: (k: number) => BatchItem): RoundResult {
  const agg = s.begin(base, specs, { expected: ups.length, deltaUpdates: isDelta });
  const make = item ?? ((k: number): BatchItem => ({ update: ups[k], info: { site: `s${k}`, numSamples: weights[k], isDelta } }));
  const verdicts = batches(sizes).flatMap((ks) => {
    const v = agg.checkAndAddBatch!(ks.map(make));
    if (!v) throw new Error('expected the batched path');
    return v;
  });
  return finishRound(agg, verdicts);
}

describe.each(KINDS)('checkAndAddBatch (%s) against checkAndAdd one at a time', (_, get) => {
  it('the default checked round and its variants: the same verdicts, norms and model byte for byte, however batched', () => {
    const { one, batch } = get();
    const base = bundleOf(baseModel(6));
    const ups = [1, 2, 3, 4, 5].map((k) => update(k, 2));
    for (const cfg of [plan({}), plan({ validation: { maxNorm: 1e9 } }), plan({ serverOptimizer: { type: 'fedadam' } }), plan({ validation: { maxNormFactor: 0 } })]) {
      const a = oneByOne(new ComposedStrategy(cfg, { checkedFold: one }), base, ups);
      for (const sizes of [[5], [2, 3], [1, 4]]) {
        const b = batched(new ComposedStrategy(cfg, { checkedFoldBatch: batch }), base, ups, sizes);
        expect(b.verdicts).toEqual(a.verdicts);
        expect(b.norms).toEqual(a.norms);
        expect(b.count).toBe(5);
        expect(firstByteDifference(b.out, a.out)).toBe(-1);
      }
    }
  });

  it('delta uploads: the same verdicts and model byte for byte', () => {
    const { one, batch } = get();
    const base = bundleOf(baseModel(7));
    const ups = [1, 2, 3].map((k) => update(k, 1, 0.01));
    const a = oneByOne(new ComposedStrategy(plan({}), { checkedFold: one }), base, ups, true);
    const b = batched(new ComposedStrategy(plan({}), { checkedFoldBatch: batch }), base, ups, [3], true);
    expect(b.verdicts).toEqual(a.verdicts);
    expect(firstByteDifference(b.out, a.out)).toBe(-1);
  });

  it('from the update files, read a block at a time: the same model byte for byte', () => {
    const { one, batch } = get();
    const base = bundleOf(baseModel(8));
    const ups = [1, 2, 3, 4].map((k) => update(k, 2));
    const files = ups.map((u, k) => {
      const f = join(dir, `u${k}.safetensors`);
      writeFileSync(f, encodeSafetensors(u));
      return f;
    });
    const a = oneByOne(new ComposedStrategy(plan({}), { checkedFold: one }), base, ups);
    const b = batched(new ComposedStrategy(plan({}), { checkedFoldBatch: batch }), base, ups, [4], false, (k) => ({ reader: openModelReader(files[k]), info: { site: `s${k}`, numSamples: weights[k] } }));
    expect(b.verdicts).toEqual(a.verdicts);
    expect(firstByteDifference(b.out, a.out)).toBe(-1);
    // A file without one of the shared tensors is refused for its layout; the rest of the batch is folded.
    const short = join(dir, 'short.safetensors');
    writeFileSync(short, encodeSafetensors(makeBundle([...ups[0].values()].filter((t) => t.name !== 't3'))));
    const s = new ComposedStrategy(plan({}), { checkedFoldBatch: batch });
    const agg = s.begin(base, specs, { expected: 2 });
    const v = agg.checkAndAddBatch!([{ reader: openModelReader(short), info: { site: 'x', numSamples: 10 } }, { reader: openModelReader(files[1]), info: { site: 'y', numSamples: 10 } }])!;
    expect(v[0].problem).toMatch(/tensor "t3" is missing/);
    expect(v[1].problem).toBeUndefined();
    expect(agg.count).toBe(1);
    agg.discard?.();
  });

  it('refusals get checkAndAdd()\'s words and count nothing; the model within a float32 ulp of the one-by-one round', () => {
    const { one, batch } = get();
    const cfg = plan({ validation: { maxNormFactor: 3 } });
    const { base, ups } = fixture.refusalRound();
    const a = oneByOne(new ComposedStrategy(cfg, { checkedFold: one }), base, ups);
    for (const sizes of [[7], [3, 4], [4, 3]]) {
      const b = batched(new ComposedStrategy(cfg, { checkedFoldBatch: batch }), base, ups, sizes);
      expect(b.verdicts.map((v) => v.problem)).toEqual(a.verdicts.map((v) => v.problem));
      expect(b.verdicts[3].problem).toMatch(/tensor "t8" holds NaN at index 30000/);
      expect(b.verdicts[4].problem).toMatch(/more than 3 × the median/);
      expect(b.verdicts[5].problem).toMatch(/beyond the plan's bound/);
      expect(b.norms).toEqual(a.norms);
      expect(b.count).toBe(4);
      expect(maxUlpDiff(b.out, a.out)).toBeLessThanOrEqual(1);
    }
  });
});

describe('checkAndAddBatch in clipped and DP rounds (check, then fold, each from the blocks)', () => {
  /** The same N(0, 1) stream for both rounds: DP's noise must not tell them apart. */
  const fixedGaussian = () => {
    const rng = mulberry32(7);
    return (out: Float32Array) => {
      for (let i = 0; i < out.length; i++) out[i] = rng() - 0.5;
    };
  };

  it('the verdicts, norms and model of check() then add() byte for byte, from bundles and from files', () => {
    const base = bundleOf(baseModel(11));
    const ups = [1, 2, 3, 4].map((k) => update(k, 2));
    const files = ups.map((u, k) => {
      const f = join(dir, `clip${k}.safetensors`);
      writeFileSync(f, encodeSafetensors(u));
      return f;
    });
    const nan = update(50);
    nan.get('t2')!.data[1] = Number.NaN;
    const all = [ups[0], ups[1], nan, ups[2], ups[3]];
    for (const aggregation of [{ clipNorm: 1 }, { dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } }, { clipNorm: 5, validation: { maxNormFactor: 1.5 } }]) {
      const cfg = plan(aggregation);
      const ref = new ComposedStrategy(cfg, { gaussian: fixedGaussian() }).begin(base, specs, { expected: all.length });
      const refVerdicts = all.map((u, k) => {
        const info = { site: `s${k}`, numSamples: weights[k] };
        const v = ref.check(u, info);
        if (!v.problem) ref.add(u, info, v);
        return v;
      });
      const a = finishRound(ref, refVerdicts);
      const fromBundles = batched(new ComposedStrategy(cfg, { gaussian: fixedGaussian() }), base, all, [5]);
      expect(fromBundles.verdicts).toEqual(a.verdicts);
      expect(fromBundles.verdicts[2].problem).toMatch(/tensor "t2" holds NaN at index 1/);
      expect(fromBundles.norms).toEqual(a.norms);
      expect(firstByteDifference(fromBundles.out, a.out)).toBe(-1);
      const clean = [ups[0], ups[1], ups[2], ups[3]];
      const refClean = new ComposedStrategy(cfg, { gaussian: fixedGaussian() }).begin(base, specs, { expected: 4 });
      const cleanVerdicts = clean.map((u, k) => {
        const info = { site: `s${k}`, numSamples: weights[k] };
        const v = refClean.check(u, info);
        if (!v.problem) refClean.add(u, info, v);
        return v;
      });
      const c = finishRound(refClean, cleanVerdicts);
      const fromFiles = batched(new ComposedStrategy(cfg, { gaussian: fixedGaussian() }), base, clean, [2, 2], false, (k) => ({ reader: openModelReader(files[k]), info: { site: `s${k}`, numSamples: weights[k] } }));
      expect(fromFiles.verdicts).toEqual(c.verdicts);
      expect(firstByteDifference(fromFiles.out, c.out)).toBe(-1);
    }
  });
});

describe('checkAndAddBatch where it cannot fold while checking', () => {
  it('says so (undefined) for the robust rules, and counts nothing', () => {
    const base = bundleOf(baseModel(10));
    for (const aggregation of [{ strategy: 'median' }, { strategy: 'trimmed-mean', trimFraction: 0.1 }]) {
      const s = new ComposedStrategy(PlanSchema.parse({ aggregation }).aggregation);
      const agg = s.begin(base, specs, { expected: 2 });
      expect(agg.checkAndAddBatch!([{ update: update(1), info: { site: 'a', numSamples: 5 } }])).toBeUndefined();
      expect(agg.count).toBe(0);
      agg.discard?.();
    }
  });
});
