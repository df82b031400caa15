/**
 * The addon's fold loops come in variants (checked-fold.ts NativeFoldVariant: the portable SSE2 build, and AVX2 and
 * AVX-512 loops chosen at run time by the CPU). Each one this machine runs, forced by name, gives the JS twins' bytes:
 * the same float64 sums and the same norms, one by one and batched (batches of 1 to 6: the checks run four updates
 * at a time, so every remainder shows), against a base, delta uploads and no base, at lengths around the vector
 * widths and the block edges; and the same verdicts where a value is non-finite or sits just past a maxValue that no
 * float32 equals (the wide loops test the bound on the float32 values); and the round's close of a plain mean
 * (mean-f32.ts) gives the JS loop's float32 bytes. Fails with the reason where the addon or its variants are not built.
 */
import { describe, expect, it } from 'vitest';
import { baseBlocks } from '../../coordinator/aggregation/base-blocks.ts';
import { checkedFoldBatchJs, checkedFoldJs, nativeCheckedFoldsWith, nativeFoldVariants, type NativeFoldVariant, type FoldTarget } from '../../coordinator/aggregation/checked-fold.ts';
import { WeightedMeanAggregator } from '../../coordinator/aggregation/fedavg.ts';
import { meanToF32, meanToF32Js, nativeMeanToF32With } from '../../coordinator/aggregation/mean-f32.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { foldFixture } from '../helpers/fold-fixture.ts';

// Around 4, 8, 16 and 32 values (the vector steps), and past the native block (8192) and the JS one (16384).
const SIZES = [1, 3, 4, 5, 7, 9, 15, 17, 31, 33, 1000, 8191, 8193, 16385, 20003];
const fixture = foldFixture(SIZES);
const { specs, offsets, update, baseModel } = fixture;

function variants(): { best: NativeFoldVariant; supported: NativeFoldVariant[] } {
  const v = nativeFoldVariants();
  if (!v) {
    const loaded = loadOneDnnKernels();
    throw new Error(`the addon's fold variants are unavailable: build the addon (npm run build:native)${loaded.kernels ? '' : `; ${loaded.reason}`}`);
  }
  return v;
}

function target(): { mean: WeightedMeanAggregator; target: FoldTarget } {
  const mean = new WeightedMeanAggregator(specs, { simd: false });
  mean.addWeighted(update(1), 7);
  return { mean, target: { sums: mean.rawSums, foldBlock: (off, x, a) => mean.foldBlock(off, x, a) } };
}

function sameBytes(a: Float64Array, b: Float64Array): boolean {
  return Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
}

describe('native fold variants', () => {
  it('names SSE2 and the widest variant this CPU runs, and refuses a variant it does not run', () => {
    const v = variants();
    expect(v.supported[0]).toBe('sse2');
    expect(v.supported).toContain(v.best);
    expect(v.supported.at(-1)).toBe(v.best);
    expect(() => nativeCheckedFoldsWith('avx1024' as NativeFoldVariant)).toThrow(/no avx1024 fold/);
    const addon = loadOneDnnKernels().kernels!.addon as unknown as { foldChecked(...args: unknown[]): number };
    const x = new Float32Array(8);
    expect(() => addon.foldChecked(x, null, false, new Float64Array(8), 1, 1, new Float64Array(4), 'avx1024')).toThrow(/variant must be/);
  });

  it.each(['sse2', 'avx2', 'avx512'] as const)('%s (where this CPU runs it): the JS twins\' sums and norms byte for byte', (name) => {
    if (!variants().supported.includes(name)) return; // not this CPU's: nothing to compare
    const { one, batch } = nativeCheckedFoldsWith(name);
    const base = baseModel(3);
    const ups = [11, 12, 13, 14, 15, 16].map((k, j) => update(k, j % 2 ? 6 : 1));
    // Fractional coefficients: a·x then has a full float64 mantissa, so the sums round and their order shows.
    const w = ups.map((_, j) => 1 / (3 + 5 * j));
    for (const [isDelta, b] of [[false, base], [true, base], [false, undefined]] as const) {
      const ref = target();
      const refNorms = ups.map((u, j) => checkedFoldJs(u, isDelta, b, offsets, ref.target, w[j], 1e30).norm);
      const single = target();
      expect(ups.map((u, j) => one(u, isDelta, b, offsets, single.target, w[j], 1e30).norm)).toEqual(refNorms);
      expect(sameBytes(single.mean.rawSums, ref.mean.rawSums)).toBe(true);
      for (const k of [1, 2, 3, 4, 5, 6]) {
        const js = target();
        const jsNorms = checkedFoldBatchJs(ups.slice(0, k).map((u, j) => ({ values: baseBlocks(u, offsets), a: w[j] })), isDelta, b, offsets, js.target, 1e30).map((r) => r.norm);
        const got = target();
        const norms = batch(ups.slice(0, k).map((u, j) => ({ values: baseBlocks(u, offsets), a: w[j] })), isDelta, b, offsets, got.target, 1e30).map((r) => r.norm);
        expect(norms).toEqual(jsNorms);
        expect(norms).toEqual(refNorms.slice(0, k));
        expect(sameBytes(got.mean.rawSums, js.mean.rawSums)).toBe(true);
      }
    }
  });

  it.each(['sse2', 'avx2', 'avx512'] as const)('%s (where this CPU runs it): the JS twins\' verdicts on bad values and on the bound\'s float32 edge', (name) => {
    if (!variants().supported.includes(name)) return;
    const { one, batch } = nativeCheckedFoldsWith(name);
    const base = baseModel(4);
    // 0.1 is no float32: fround(0.1) is just above it, the float32 below that just under it.
    const above = Math.fround(0.1);
    const below = new Float32Array(new Int32Array([new Int32Array(new Float32Array([above]).buffer)[0] - 1]).buffer)[0];
    expect(above > 0.1 && below < 0.1).toBe(true);
    const cases: [string, number, number][] = [['t0', 0, Number.NaN], ['t6', 9, Number.POSITIVE_INFINITY], ['t9', 17, -above], ['t13', 8192, above], ['t14', 20002, above], ['t12', 7, below], ['t10', 999, -below]];
    for (const [tensor, index, value] of cases) {
      for (const isDelta of [false, true]) {
        // Small values, and a delta upload over a zero base, so only the planted value can reach the bound.
        const u = update(40, 1, 0.01);
        u.get(tensor)!.data[index] = value;
        const b = isDelta ? new Float32Array(base.length) : base;
        const ref = target();
        const want = checkedFoldJs(u, isDelta, b, offsets, ref.target, 3, 0.1).valuesOk;
        expect(want).toBe(Math.abs(value) <= 0.1);
        const got = target();
        expect(one(u, isDelta, b, offsets, got.target, 3, 0.1).valuesOk).toBe(want);
        const ups = [update(41, 1, 0.01), update(42, 1, 0.01), update(43, 1, 0.01), update(44, 1, 0.01), u];
        const jsBatch = target();
        const gotBatch = target();
        const wantAll = checkedFoldBatchJs(ups.map((x, j) => ({ values: baseBlocks(x, offsets), a: 2 + j })), isDelta, b, offsets, jsBatch.target, 0.1).map((r) => r.valuesOk);
        expect(batch(ups.map((x, j) => ({ values: baseBlocks(x, offsets), a: 2 + j })), isDelta, b, offsets, gotBatch.target, 0.1).map((r) => r.valuesOk)).toEqual(wantAll);
        expect(wantAll).toEqual([true, true, true, true, want]);
      }
    }
  });

  it.each(['sse2', 'avx2', 'avx512'] as const)('%s (where this CPU runs it): the mean written over its own sums, the JS loop\'s bytes', (name) => {
    if (!variants().supported.includes(name)) return;
    const mean = nativeMeanToF32With(name);
    const rng = mulberry32(9);
    // Every length mod 16 around the vector steps, a long one; values that round, overflow float32 and underflow it.
    for (const n of [0, 1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 100_003]) {
      const sums = Float64Array.from({ length: n }, (_, i) => (rng() - 0.5) * 10 ** (i % 11 === 3 ? 41 : i % 13 === 5 ? -44 : 6 * (rng() - 0.5)));
      for (const inv of [1 / 7.3, 1, 3e-3]) {
        const want = meanToF32Js(sums.slice(), inv);
        const got = mean(sums.slice(), inv);
        expect(got.length).toBe(n);
        expect(Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.byteLength), Buffer.from(want.buffer, want.byteOffset, want.byteLength))).toBe(0);
        const dflt = meanToF32(sums.slice(), inv);
        expect(Buffer.compare(Buffer.from(dflt.buffer, dflt.byteOffset, dflt.byteLength), Buffer.from(want.buffer, want.byteOffset, want.byteLength))).toBe(0);
      }
    }
    // A view that starts inside its buffer: written over its own bytes only.
    const all = Float64Array.from({ length: 40 }, (_, i) => i + 0.5);
    const y = mean(all.subarray(8, 24), 0.5);
    expect(Array.from(y)).toEqual(Array.from({ length: 16 }, (_, i) => (i + 8.5) * 0.5));
    expect(all[7]).toBe(7.5);
    expect(all.subarray(24)).toEqual(Float64Array.from({ length: 16 }, (_, i) => i + 24.5));
  });
});
