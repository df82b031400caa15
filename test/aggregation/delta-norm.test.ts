/**
 * The delta norm of the coordinator's check (validate.ts): the native loop (reads the update and the base in
 * place) equals the JS loop bit for bit — tensors of every length mod 4, values of very different magnitudes,
 * weights against a base and delta uploads, non-finite values — and a checked round gives the same verdicts and
 * the same result with either. When the addon is not built, the native half fails with the loader's reason.
 */
import { describe, expect, it } from 'vitest';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { deltaNorm, deltaNormJs } from '../../coordinator/aggregation/validate.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';

const SIZES = [1, 2, 3, 4, 5, 7, 1000, 4099, 70001];
const specs: TensorSpec[] = SIZES.map((n, i) => ({ name: `t${i}`, dtype: 'F32', shape: [n] }));
const offsets = new Map<string, { off: number; n: number }>();
SIZES.reduce((off, n, i) => (offsets.set(`t${i}`, { off, n }), off + n), 0);
const total = SIZES.reduce((a, b) => a + b, 0);

function update(seed: number, spread: number): TensorBundle {
  const rng = mulberry32(seed);
  return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, () => (rng() - 0.5) * 10 ** (spread * (rng() - 0.5))) })));
}

function hasNative(): void {
  const addon = loadOneDnnKernels().kernels?.addon as { deltaSqLanes?: unknown } | undefined;
  if (typeof addon?.deltaSqLanes !== 'function') throw new Error('native deltaSqLanes unavailable: build the addon (npm run build:native)');
}

describe('delta norm, native against JS', () => {
  it('is the same number bit for bit, with and without a base, at every length mod 4', () => {
    hasNative();
    const rng = mulberry32(3);
    const base = Float32Array.from({ length: total }, () => rng() - 0.5);
    for (const spread of [0, 6, 20]) {
      const u = update(spread + 1, spread);
      for (const [isDelta, b] of [[false, base], [true, base], [false, undefined]] as const) {
        const want = deltaNormJs(u, isDelta, b, offsets);
        expect(deltaNorm(u, isDelta, b, offsets)).toBe(want);
      }
    }
  });

  it('is non-finite when a value is, like the JS loop', () => {
    hasNative();
    const u = update(9, 2);
    u.get('t6')!.data[17] = Number.NaN;
    expect(deltaNorm(u, true, undefined, offsets)).toBeNaN();
    u.get('t6')!.data[17] = Number.POSITIVE_INFINITY;
    expect(deltaNorm(u, true, undefined, offsets)).toBe(Number.POSITIVE_INFINITY);
  });

  it('a checked and clipped round gives the same verdicts, norms and result with either', () => {
    hasNative();
    const cfg = PlanSchema.parse({ aggregation: { clipNorm: 5, validation: { maxNormFactor: 3 } } }).aggregation;
    const base = update(100, 1);
    const ups = [1, 2, 3, 4].map((k) => update(k, 1));
    // An outlier the relative bound refuses.
    ups.push(makeBundle([...ups[0].values()].map((t) => ({ ...t, data: t.data.map((v) => v * 50) }))));
    const run = (s: ComposedStrategy) => {
      const agg = s.begin(base, specs, { expected: ups.length });
      const verdicts = ups.map((u, k) => {
        const info = { site: `s${k}`, numSamples: 10 + k };
        const v = agg.check(u, info);
        if (!v.problem) agg.add(u, info, v);
        return v;
      });
      const out = agg.finish();
      return { verdicts, out: specs.map((sp) => Array.from(out.get(sp.name)!.data)) };
    };
    const a = run(new ComposedStrategy(cfg));
    const b = run(new ComposedStrategy(cfg, { deltaNorm: deltaNormJs }));
    expect(a.verdicts.at(-1)!.problem).toBeDefined();
    expect(a.verdicts).toEqual(b.verdicts);
    expect(a.out).toEqual(b.out);
  });
});
