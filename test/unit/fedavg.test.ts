import { describe, expect, it } from 'vitest';
import { FedAvg, WeightedMeanAggregator, axpy } from '../../coordinator/aggregation/fedavg.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';

const specs = [
  { name: 'w', dtype: 'F32' as const, shape: [2, 3] },
  { name: 'b', dtype: 'F32' as const, shape: [5] },
];
const bundle = (w: number[], b: number[]) =>
  makeBundle([
    { name: 'w', dtype: 'F32', shape: [2, 3], data: Float32Array.from(w) },
    { name: 'b', dtype: 'F32', shape: [5], data: Float32Array.from(b) },
  ]);

describe('FedAvg', () => {
  it('is the sample-weighted mean of the updates', () => {
    const agg = new FedAvg().begin(bundle([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0]), specs);
    agg.add(bundle([1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1]), { site: 'a', numSamples: 1 });
    agg.add(bundle([4, 5, 6, 7, 8, 9], [4, 4, 4, 4, 4]), { site: 'b', numSamples: 3 });
    const out = agg.finish();
    expect([...out.get('w')!.data]).toEqual([3.25, 4.25, 5.25, 6.25, 7.25, 8.25]);
    expect([...out.get('b')!.data]).toEqual([3.25, 3.25, 3.25, 3.25, 3.25]);
    expect(agg.count).toBe(2);
  });

  it('does not keep references to the updates it folded (streaming, O(model) memory)', () => {
    const agg = new FedAvg().begin(bundle([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0]), specs);
    const u = bundle([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1]);
    agg.add(u, { site: 'a', numSamples: 2 });
    u.get('w')!.data.fill(100);
    expect([...agg.finish().get('w')!.data]).toEqual([1, 1, 1, 1, 1, 1]);
  });

  it('refuses an update without samples or with a missing tensor', () => {
    const agg = new FedAvg().begin(bundle([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0]), specs);
    expect(() => agg.add(bundle([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1]), { site: 'a', numSamples: 0 })).toThrow(/no samples/);
    expect(() => agg.add(makeBundle([{ name: 'w', dtype: 'F32', shape: [2, 3], data: new Float32Array(6) }]), { site: 'a', numSamples: 1 })).toThrow(/lacks tensor b/);
    expect(() => agg.finish()).toThrow(/no updates/);
  });

  it('axpy handles lengths that are not multiples of the unroll', () => {
    for (const n of [0, 1, 3, 4, 5, 17]) {
      const acc = new Float32Array(n).fill(1);
      axpy(acc, Float32Array.from({ length: n }, (_, i) => i), 2);
      expect([...acc]).toEqual(Array.from({ length: n }, (_, i) => 1 + 2 * i));
    }
  });
});

describe('FedAvg kernels', () => {
  it('uses WebAssembly SIMD here and agrees with the plain JS loop on odd-sized tensors', () => {
    const specs2 = [
      { name: 'a', dtype: 'F32' as const, shape: [1001] },
      { name: 'b', dtype: 'F32' as const, shape: [3, 7] },
    ];
    const rnd = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(seed * 1000 + i * 0.37) * 3);
    const upd = (seed: number) =>
      makeBundle([
        { name: 'a', dtype: 'F32', shape: [1001], data: rnd(1001, seed) },
        { name: 'b', dtype: 'F32', shape: [3, 7], data: rnd(21, seed + 0.5) },
      ]);
    const simd = new WeightedMeanAggregator(specs2);
    const js = new WeightedMeanAggregator(specs2, { simd: false });
    expect(simd.kernel).toBe('wasm-simd');
    expect(js.kernel).toBe('js');
    for (const [seed, n] of [[1, 5], [2, 1], [3, 12]] as const) {
      simd.add(upd(seed), { site: `s${seed}`, numSamples: n });
      js.add(upd(seed), { site: `s${seed}`, numSamples: n });
    }
    const a = simd.finish();
    const b = js.finish();
    for (const name of ['a', 'b']) {
      const x = a.get(name)!.data;
      const y = b.get(name)!.data;
      let worst = 0;
      for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i] - y[i]));
      expect(worst).toBeLessThan(1e-5);
      // and the mean really is the weighted mean (spot check)
      const expected = (5 * upd(1).get(name)!.data[3] + 1 * upd(2).get(name)!.data[3] + 12 * upd(3).get(name)!.data[3]) / 18;
      expect(x[3]).toBeCloseTo(expected, 5);
    }
  });
});
