import { describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { FedAvg } from '../../coordinator/aggregation/fedavg.ts';
import { medianInPlace, trimmedMeanInPlace, trimCount } from '../../coordinator/aggregation/robust.ts';
import { strategyFromPlan } from '../../coordinator/aggregation/index.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { SPECS, SIZE, aggregationPlan, dist, flatBundle, flatOf, honestUpdates, rng } from './helpers.ts';

const spill = () => mkdtempSync(join(tmpdir(), 'medfl-spill-test-'));
const base = Array.from({ length: SIZE }, (_, i) => Math.sin(i));

function run(cfg: Record<string, unknown>, updates: number[][], samples?: number[], opts: ConstructorParameters<typeof ComposedStrategy>[1] = {}) {
  const s = new ComposedStrategy(aggregationPlan(cfg), { spillDir: spill(), ...opts });
  const agg = s.begin(flatBundle(base), SPECS, { expected: updates.length });
  updates.forEach((u, i) => {
    const info = { site: `s${i}`, numSamples: samples?.[i] ?? 1 };
    const v = agg.check(flatBundle(u), info);
    expect(v.problem).toBeUndefined();
    agg.add(flatBundle(u), info, v);
  });
  return { s, out: flatOf(agg.finish()) };
}

describe('order statistics', () => {
  it('median and trimmed mean of small columns match a sort', () => {
    const r = rng(7);
    for (let n = 1; n <= 60; n++) {
      for (let rep = 0; rep < 5; rep++) {
        const xs = Array.from({ length: n }, () => Math.round(r() * 5)); // ties on purpose
        const sorted = [...xs].sort((a, b) => a - b);
        const med = n % 2 ? sorted[n >> 1] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
        expect(medianInPlace(Float64Array.from(xs), n)).toBeCloseTo(med, 12);
        const k = trimCount(n, 0.2);
        const kept = sorted.slice(k, n - k);
        expect(trimmedMeanInPlace(Float64Array.from(xs), n, k)).toBeCloseTo(kept.reduce((a, b) => a + b, 0) / kept.length, 12);
      }
    }
  });
});

describe('the SIMD fold', () => {
  it('stages large tensors block by block and matches the plain-JS fold', () => {
    const specs = [{ name: 'big', dtype: 'F32' as const, shape: [600_001] }];
    const r = rng(3);
    const ups = [0, 1, 2].map(() => Float32Array.from({ length: 600_001 }, () => r()));
    const out = (simd: boolean) => {
      // No norm bound (maxNormFactor: 0), so no base model is needed for this fold-only check.
      const agg = new ComposedStrategy(aggregationPlan({ validation: { maxNormFactor: 0 } }), { simd }).begin(new Map(), specs);
      ups.forEach((d, i) => agg.add(new Map([['big', { name: 'big', dtype: 'F32' as const, shape: [600_001], data: d }]]), { site: `s${i}`, numSamples: i + 1 }));
      return agg.finish().get('big')!.data.slice();
    };
    const simd = out(true);
    const js = out(false);
    expect(simd.length).toBe(600_001);
    let maxDiff = 0;
    for (let i = 0; i < js.length; i++) maxDiff = Math.max(maxDiff, Math.abs(simd[i] - js[i]));
    expect(maxDiff).toBeLessThan(1e-6);
    expect(simd[600_000]).toBeCloseTo((ups[0][600_000] + 2 * ups[1][600_000] + 3 * ups[2][600_000]) / 6, 6);
  });
});

describe('composed strategies', () => {
  it('default plan = the streaming FedAvg, bit for bit; without the default norm bound it keeps no base model', () => {
    const ups = honestUpdates(base, 3);
    const samples = [5, 1, 9];
    const { s, out } = run({}, ups, samples);
    expect(s.name).toBe('fedavg');
    // The default relative norm bound (maxNormFactor 10) measures deltas, so it keeps the base; turned off, none is kept.
    expect(s.needsBase()).toBe(true);
    expect(new ComposedStrategy(aggregationPlan({ validation: { maxNormFactor: 0 } })).needsBase()).toBe(false);
    const ref = new FedAvg().begin(flatBundle(base), SPECS);
    ups.forEach((u, i) => ref.add(flatBundle(u), { site: `s${i}`, numSamples: samples[i] }));
    expect(out).toEqual(flatOf(ref.finish()));
  });

  it('median and trimmed mean give the coordinate-wise statistics (block size smaller than the model)', () => {
    const ups = honestUpdates(base, 7, 3);
    const med = run({ strategy: 'median' }, ups, undefined, { blockBytes: 7 * 4 * 3 }).out; // forces the 1024-float minimum block
    const tm = run({ strategy: 'trimmed-mean', trimFraction: 0.2 }, ups).out;
    for (let j = 0; j < SIZE; j++) {
      const col = ups.map((u) => u[j] - base[j]).sort((a, b) => a - b);
      expect(med[j]).toBeCloseTo(base[j] + col[3], 5);
      expect(tm[j]).toBeCloseTo(base[j] + (col[1] + col[2] + col[3] + col[4] + col[5]) / 5, 5);
    }
  });

  it('deletes its spill files when the round finishes or is dropped', () => {
    const dir = spill();
    const s = new ComposedStrategy(aggregationPlan({ strategy: 'median' }), { spillDir: dir });
    const agg = s.begin(flatBundle(base), SPECS);
    agg.add(flatBundle(base), { site: 'a', numSamples: 1 });
    expect(readdirSync(dir)).toHaveLength(1);
    agg.finish();
    expect(readdirSync(dir)).toHaveLength(0);
    const agg2 = s.begin(flatBundle(base), SPECS);
    agg2.add(flatBundle(base), { site: 'a', numSamples: 1 });
    agg2.discard!();
    expect(readdirSync(dir)).toHaveLength(0);
  });

  it('FedAvgM carries the last rounds\' direction on (m = β₁m + Δ, x = base + η·m) over three rounds', () => {
    const cfg = aggregationPlan({ serverOptimizer: { type: 'fedavgm', lr: 1, beta1: 0.5 } });
    const s = new ComposedStrategy(cfg, { spillDir: spill() });
    let x = base.slice();
    const m = new Array(SIZE).fill(0);
    for (let round = 0; round < 3; round++) {
      const target = x.map((b, i) => b + 0.2 * Math.sin(i + round));
      const agg = s.begin(flatBundle(x), SPECS);
      agg.add(flatBundle(target), { site: 'a', numSamples: 1 });
      const got = flatOf(agg.finish());
      const want = x.map((b, i) => {
        m[i] = 0.5 * m[i] + (Math.fround(target[i]) - Math.fround(b));
        return b + m[i];
      });
      for (let i = 0; i < SIZE; i++) expect(got[i]).toBeCloseTo(want[i], 4);
      x = got;
    }
    expect(s.optimizerStep).toBe(3);
  });

  it('FedAvgM stores only its momentum, and a strategy restored from it continues exactly', () => {
    const cfg = aggregationPlan({ serverOptimizer: { type: 'fedavgm', lr: 1, beta1: 0.5 } });
    const roundOf = (s: ComposedStrategy, x: number[], round: number) => {
      const agg = s.begin(flatBundle(x), SPECS);
      agg.add(flatBundle(x.map((b, i) => b + 0.2 * Math.sin(i + round))), { site: 'a', numSamples: 1 });
      return flatOf(agg.finish());
    };
    const straight = new ComposedStrategy(cfg, { spillDir: spill() });
    const r1 = roundOf(straight, base.slice(), 0);
    const exported = straight.exportState()!;
    expect([...exported.tensors!.keys()].every((n) => n.startsWith('m/'))).toBe(true);
    // Exported tensors are views of the live moments (the coordinator writes them at once): copy, as the file does.
    const state = { json: exported.json, tensors: makeBundle([...exported.tensors!.values()].map((t) => ({ ...t, data: t.data.slice() }))) };
    const want = roundOf(straight, r1, 1);
    const restored = new ComposedStrategy(cfg, { spillDir: spill() });
    restored.restoreState(state);
    expect(roundOf(restored, r1, 1)).toEqual(want);
  });

  it('server optimisers follow Reddi et al. (FedAdam, FedYogi, FedAdagrad) over two rounds', () => {
    for (const type of ['fedadam', 'fedyogi', 'fedadagrad'] as const) {
      const cfg = aggregationPlan({ serverOptimizer: { type, lr: 0.5, beta1: 0.9, beta2: 0.99, tau: 0.01 } });
      const s = new ComposedStrategy(cfg, { spillDir: spill() });
      let x = base.slice();
      const m = new Array(SIZE).fill(0);
      const v = new Array(SIZE).fill(0.01 * 0.01);
      for (let round = 0; round < 2; round++) {
        const target = x.map((b, i) => b + 0.3 * Math.cos(i + round));
        const agg = s.begin(flatBundle(x), SPECS);
        agg.add(flatBundle(target), { site: 'a', numSamples: 1 });
        const got = flatOf(agg.finish());
        const want = x.map((b, i) => {
          const d = Math.fround(target[i]) - Math.fround(b);
          m[i] = 0.9 * m[i] + 0.1 * d;
          if (type === 'fedadagrad') v[i] += d * d;
          else if (type === 'fedadam') v[i] = 0.99 * v[i] + 0.01 * d * d;
          else v[i] = v[i] - 0.01 * d * d * Math.sign(v[i] - d * d);
          return b + (0.5 * m[i]) / (Math.sqrt(v[i]) + 0.01);
        });
        for (let i = 0; i < SIZE; i++) expect(got[i]).toBeCloseTo(want[i], 4);
        x = got;
      }
      expect(s.optimizerStep).toBe(2);
    }
  });

  it('an exported optimiser state continues exactly in a new strategy (what a coordinator restart does)', () => {
    const cfg = aggregationPlan({ strategy: 'trimmed-mean', serverOptimizer: { type: 'fedyogi' } });
    const ups = (x: number[], r: number) => honestUpdates(x, 5, 10 + r);
    const a = new ComposedStrategy(cfg, { spillDir: spill() });
    const roundOf = (s: ComposedStrategy, x: number[], r: number) => {
      const agg = s.begin(flatBundle(x), SPECS);
      for (const [i, u] of ups(x, r).entries()) agg.add(flatBundle(u), { site: `s${i}`, numSamples: 1 });
      return flatOf(agg.finish());
    };
    const x1 = roundOf(a, base, 1);
    const exported = a.exportState()!;
    // Copied now, as the coordinator writes it to disk now: the exported tensors view the live moments.
    const state = { json: exported.json, tensors: new Map([...exported.tensors!].map(([k, t]) => [k, { ...t, data: t.data.slice() }])) };
    const x2a = roundOf(a, x1, 2);
    const b = new ComposedStrategy(cfg, { spillDir: spill() });
    b.restoreState(state);
    const x2b = roundOf(b, x1, 2);
    expect(x2b).toEqual(x2a);
    const fresh = roundOf(new ComposedStrategy(cfg, { spillDir: spill() }), x1, 2);
    expect(fresh).not.toEqual(x2a); // the state matters: without it the step differs
  });

  it('composes trimmed mean + FedYogi + FedBN + clipping from the plan, with no class per combination', () => {
    const plan = PlanSchema.parse({ share: { keepLocal: ['norm'] }, aggregation: { strategy: 'trimmed-mean', trimFraction: 0.2, clipNorm: 1, serverOptimizer: { type: 'fedyogi' } } });
    const s = strategyFromPlan(plan, { spillDir: spill() });
    expect(s.name).toBe('trimmed-mean(β=0.2)+fedyogi(η=0.1)+clip(1)');
    const agg = s.begin(flatBundle(base), SPECS);
    for (const [i, u] of honestUpdates(base, 5).entries()) agg.add(flatBundle(u), { site: `s${i}`, numSamples: 2 });
    const out = flatOf(agg.finish());
    expect(out.every(Number.isFinite)).toBe(true);
    expect(dist(out, base)).toBeGreaterThan(0);
  });

  it('clipping bounds each delta to S before the mean', () => {
    const far = base.map((b, i) => b + (i === 0 ? 100 : 0));
    const { out } = run({ clipNorm: 2 }, [far, base], [1, 1]);
    expect(out[0] - base[0]).toBeCloseTo(1, 5); // (2 + 0) / 2
  });

  it('DP-FedAvg: clipped sum plus N(0, (zS)²), divided by the sites asked', () => {
    const ups = [base.map((b) => b + 10), base.map((b) => b - 0.001), base];
    const zeros = run({ dp: { clipNorm: 1, noiseMultiplier: 1.2, delta: 1e-5 } }, ups, [50, 1, 1], { gaussian: (o) => o.fill(0) }).out;
    // Uniform weights: site 0's 50 samples buy it nothing; its delta is clipped to norm 1.
    const d0 = 1 / Math.sqrt(SIZE);
    const d1 = -0.001;
    for (let j = 0; j < SIZE; j++) expect(zeros[j]).toBeCloseTo(base[j] + (d0 + d1) / 3, 5);
    const ones = run({ dp: { clipNorm: 1, noiseMultiplier: 1.2, delta: 1e-5 } }, ups, [50, 1, 1], { gaussian: (o) => o.fill(1) }).out;
    for (let j = 0; j < SIZE; j++) expect(ones[j] - zeros[j]).toBeCloseTo(1.2 / 3, 5);
    const noisy = run({ dp: { clipNorm: 1, noiseMultiplier: 1.2, delta: 1e-5 } }, ups).out;
    const noise = noisy.map((v, j) => (v - zeros[j]) * 3);
    const sd = Math.sqrt(noise.reduce((s, x) => s + x * x, 0) / SIZE);
    expect(sd).toBeGreaterThan(0.6);
    expect(sd).toBeLessThan(2);
  });

  it('the plan refuses DP with a robust combine rule', () => {
    expect(PlanSchema.safeParse({ aggregation: { strategy: 'median', dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } } }).success).toBe(false);
  });

  it('leaves no spill directory behind in the OS temp dir when given its own', () => {
    const dir = spill();
    run({ strategy: 'median' }, honestUpdates(base, 3), undefined, { spillDir: dir });
    expect(existsSync(dir)).toBe(true);
    expect(readdirSync(dir)).toEqual([]);
  });
});
