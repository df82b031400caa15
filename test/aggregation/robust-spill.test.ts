/**
 * Median and trimmed mean check and spill an update in one read of it (composed.ts checkAndSpill, robust.ts
 * addMeasured): the norm measured chunk by chunk while each chunk is written equals deltaNorm bit for bit (native and
 * JS lanes), and a round through checkAndAdd() gives check() + add()'s verdicts, norms and model byte for byte. A
 * refused update leaves no spill file behind; retract() takes a spilled one out again.
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import type { RoundAggregator, Verdict } from '../../coordinator/aggregation/strategy.ts';
import { deltaNormJs, deltaSqLanes, deltaSqLanesJs, type DeltaSqLanes } from '../../coordinator/aggregation/validate.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';

// Past the spill chunk (65,536 floats), at every length mod 4.
const SIZES = [1, 3, 4, 5, 1000, 65537, 70003];
const specs: TensorSpec[] = SIZES.map((n, i) => ({ name: `t${i}`, dtype: 'F32', shape: [n] }));
const offsets = new Map<string, { off: number; n: number }>();
SIZES.reduce((off, n, i) => (offsets.set(`t${i}`, { off, n }), off + n), 0);
const total = SIZES.reduce((a, b) => a + b, 0);
const dir = mkdtempSync(join(tmpdir(), 'medfl-robust-spill-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function update(seed: number, scale = 1): TensorBundle {
  const rng = mulberry32(seed);
  return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, () => scale * (rng() - 0.5) * 10 ** (rng() - 0.5)) })));
}
const base = (() => {
  const rng = mulberry32(99);
  return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, () => rng() - 0.5) })));
})();

function nativeLanes(): DeltaSqLanes {
  const addon = loadOneDnnKernels().kernels?.addon as { deltaSqLanes?: unknown } | undefined;
  if (typeof addon?.deltaSqLanes !== 'function') throw new Error('native deltaSqLanes unavailable: build the addon (npm run build:native)');
  return deltaSqLanes;
}
const LANES: [string, () => DeltaSqLanes][] = [['js', () => deltaSqLanesJs], ['native', nativeLanes]];

const plan = (aggregation: Record<string, unknown>) => PlanSchema.parse({ aggregation }).aggregation;

function round(s: ComposedStrategy, ups: TensorBundle[], fused: boolean, isDelta = false): { verdicts: Verdict[]; out: Float32Array; norms: number[]; count: number; files: number } {
  const agg = s.begin(base, specs, { expected: ups.length, deltaUpdates: isDelta });
  const verdicts = ups.map((u, k) => {
    const info = { site: `s${k}`, numSamples: 10 + k, isDelta };
    if (fused) {
      const v = agg.checkAndAdd!(u, info);
      if (!v) throw new Error('expected the one-pass path');
      return v;
    }
    const v = agg.check(u, info);
    if (!v.problem) agg.add(u, info, v);
    return v;
  });
  const count = agg.count;
  const files = readdirSync(dir, { recursive: true }).filter((f) => String(f).endsWith('.f32')).length;
  const norms = [...(agg as RoundAggregator & { acceptedNorms: readonly number[] }).acceptedNorms];
  const res = agg.finish();
  const out = new Float32Array(total);
  for (const sp of specs) out.set(res.get(sp.name)!.data, offsets.get(sp.name)!.off);
  return { verdicts, out, norms, count, files };
}

function firstByteDifference(a: Float32Array, b: Float32Array): number {
  const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return x.length === y.length ? -1 : x.length;
}

describe.each(LANES)('median and trimmed mean: check and spill in one read (%s lanes)', (_, get) => {
  it('the lanes over consecutive chunks give deltaNorm bit for bit, with and without a base', () => {
    const lanesOf = get();
    const u = update(5);
    for (const withBase of [true, false]) {
      let sq = 0;
      for (const [name, { n }] of offsets) {
        const lanes = new Float64Array(4);
        const x = u.get(name)!.data;
        const b = base.get(name)!.data;
        for (let at = 0; at < n; at += 1024) lanesOf(x.subarray(at, Math.min(n, at + 1024)), withBase ? b.subarray(at, Math.min(n, at + 1024)) : undefined, lanes);
        sq += lanes[0] + lanes[1] + lanes[2] + lanes[3];
      }
      const flat = new Float32Array(total);
      for (const [name, { off }] of offsets) flat.set(base.get(name)!.data, off);
      expect(Math.sqrt(sq)).toBe(deltaNormJs(u, false, withBase ? flat : undefined, offsets));
    }
  });

  for (const aggregation of [{ strategy: 'median' }, { strategy: 'trimmed-mean', trimFraction: 0.2 }]) {
    it(`${aggregation.strategy}: the same verdicts, norms and model byte for byte as check() + add(), refusals leaving no spill`, () => {
      const deltaSqLanes = get();
      const cfg = plan({ ...aggregation, validation: { maxNormFactor: 3, maxValue: 1e6 } });
      const good = [1, 2, 3, 4, 5].map((k) => update(k));
      const nan = update(30);
      nan.get('t6')!.data[69000] = Number.NaN;
      const huge = update(31);
      huge.get('t4')!.data[10] = 3e7;
      const outlier = update(32, 50);
      const ups = [good[0], good[1], good[2], nan, outlier, huge, good[3], good[4]];
      const a = round(new ComposedStrategy(cfg, { spillDir: dir }), ups, false);
      const b = round(new ComposedStrategy(cfg, { spillDir: dir, deltaSqLanes }), ups, true);
      expect(b.verdicts).toEqual(a.verdicts);
      expect(b.verdicts[3].problem).toMatch(/tensor "t6" holds NaN at index 69000/);
      expect(b.verdicts[4].problem).toMatch(/more than 3 × the median/);
      expect(b.verdicts[5].problem).toMatch(/beyond the plan's bound/);
      expect(b.norms).toEqual(a.norms);
      expect(b.count).toBe(5);
      expect(b.files).toBe(5);
      expect(firstByteDifference(b.out, a.out)).toBe(-1);
    });
  }

  it('delta uploads: the same model byte for byte', () => {
    const deltaSqLanes = get();
    const ups = [1, 2, 3].map((k) => update(k, 0.01));
    const a = round(new ComposedStrategy(plan({ strategy: 'median' }), { spillDir: dir }), ups, false, true);
    const b = round(new ComposedStrategy(plan({ strategy: 'median' }), { spillDir: dir, deltaSqLanes }), ups, true, true);
    expect(b.verdicts).toEqual(a.verdicts);
    expect(firstByteDifference(b.out, a.out)).toBe(-1);
  });

  it('retract() after checkAndAdd() deletes the spill: the round is as if the update never came', () => {
    const deltaSqLanes = get();
    const ups = [1, 2, 3].map((k) => update(k));
    const s = new ComposedStrategy(plan({ strategy: 'median' }), { spillDir: dir, deltaSqLanes });
    const agg = s.begin(base, specs, { expected: 4 });
    ups.forEach((u, k) => agg.checkAndAdd!(u, { site: `s${k}`, numSamples: 10 + k }));
    const late = { site: 'late', numSamples: 12 };
    const v = agg.checkAndAdd!(update(40), late)!;
    expect(v.problem).toBeUndefined();
    agg.retract!(update(40), late, v);
    expect(agg.count).toBe(3);
    expect(() => agg.retract!(update(40), late, v)).toThrow(/no update from late/);
    const res = agg.finish();
    const got = new Float32Array(total);
    for (const sp of specs) got.set(res.get(sp.name)!.data, offsets.get(sp.name)!.off);
    const clean = round(new ComposedStrategy(plan({ strategy: 'median' }), { spillDir: dir }), ups, false);
    expect(firstByteDifference(got, clean.out)).toBe(-1);
  });
});
