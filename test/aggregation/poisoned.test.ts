/**
 * A poisoned site among honest ones, at the strategy level: validation refuses what is malformed (NaN,
 * wrong shape, implausible sample count, norm beyond the bound) without touching the round, and the
 * robust combine rules hold where FedAvg is pulled away by scaled or sign-flipped updates.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { SPECS, SIZE, aggregationPlan, dist, flatBundle, flatOf, honestUpdates } from './helpers.ts';

const base = Array.from({ length: SIZE }, (_, i) => Math.cos(i) * 0.5);
const spill = () => mkdtempSync(join(tmpdir(), 'medfl-poison-'));
const honest = honestUpdates(base, 6, 42);
const honestMean = base.map((_, j) => honest.reduce((s, u) => s + u[j], 0) / honest.length);

function aggregate(cfg: Record<string, unknown>, updates: number[][], samples: number[]) {
  const agg = new ComposedStrategy(aggregationPlan(cfg), { spillDir: spill() }).begin(flatBundle(base), SPECS);
  updates.forEach((u, i) => agg.add(flatBundle(u), { site: `s${i}`, numSamples: samples[i] }));
  return flatOf(agg.finish());
}

const attacks: Record<string, (u: number[]) => number[]> = {
  'scaled ×50': (u) => u.map((v, j) => base[j] + 50 * (v - base[j])),
  'sign-flipped ×10': (u) => u.map((v, j) => base[j] - 10 * (v - base[j])),
};

describe('a poisoned site among six honest ones', () => {
  for (const [attack, poison] of Object.entries(attacks)) {
    it(`${attack}: FedAvg is pulled away, median and trimmed mean hold`, () => {
      const ups = [...honest, poison(honest[0])];
      const samples = [10, 10, 10, 10, 10, 10, 10];
      const honestStep = dist(honestMean, base);
      const fedavg = dist(aggregate({}, ups, samples), honestMean);
      const med = dist(aggregate({ strategy: 'median' }, ups, samples), honestMean);
      const tm = dist(aggregate({ strategy: 'trimmed-mean', trimFraction: 0.2 }, ups, samples), honestMean);
      expect(fedavg).toBeGreaterThan(honestStep); // worse than not moving at all
      expect(med).toBeLessThan(0.15 * honestStep);
      expect(tm).toBeLessThan(0.15 * honestStep);
      expect(fedavg).toBeGreaterThan(10 * Math.max(med, tm));
    });
  }

  it('a norm bound (k × the median of accepted norms) refuses the scaled update before it counts', () => {
    const s = new ComposedStrategy(aggregationPlan({ validation: { maxNormFactor: 3, normReference: 3 } }), { spillDir: spill() });
    const agg = s.begin(flatBundle(base), SPECS);
    for (const [i, u] of honest.slice(0, 3).entries()) {
      const v = agg.check(flatBundle(u), { site: `s${i}`, numSamples: 10 });
      expect(v.problem).toBeUndefined();
      agg.add(flatBundle(u), { site: `s${i}`, numSamples: 10 }, v);
    }
    const bad = agg.check(flatBundle(attacks['scaled ×50'](honest[3])), { site: 'evil', numSamples: 10 });
    expect(bad.problem).toMatch(/more than 3 × the median .*validation.maxNormFactor/);
    expect(agg.count).toBe(3);
    // The refused update was never added: the result is the mean of the three honest ones.
    const out = flatOf(agg.finish());
    for (let j = 0; j < SIZE; j++) expect(out[j]).toBeCloseTo((honest[0][j] + honest[1][j] + honest[2][j]) / 3, 5);
  });

  it('the next round uses the last round\'s norms, so the first updates of a round are checked too', () => {
    const s = new ComposedStrategy(aggregationPlan({ validation: { maxNormFactor: 3 } }), { spillDir: spill() });
    const r1 = s.begin(flatBundle(base), SPECS);
    for (const [i, u] of honest.slice(0, 3).entries()) r1.add(flatBundle(u), { site: `s${i}`, numSamples: 10 });
    r1.finish();
    const r2 = s.begin(flatBundle(base), SPECS);
    expect(r2.check(flatBundle(attacks['scaled ×50'](honest[4])), { site: 'evil', numSamples: 10 }).problem).toMatch(/maxNormFactor/);
    expect(r2.check(flatBundle(honest[4]), { site: 'ok', numSamples: 10 }).problem).toBeUndefined();
  });

  it('an absolute norm bound refuses, naming the plan key', () => {
    const agg = new ComposedStrategy(aggregationPlan({ validation: { maxNorm: 1 } }), { spillDir: spill() }).begin(flatBundle(base), SPECS);
    expect(agg.check(flatBundle(attacks['scaled ×50'](honest[0])), { site: 'evil', numSamples: 1 }).problem).toMatch(/above the plan's bound 1 \(aggregation.validation.maxNorm\)/);
    expect(agg.check(flatBundle(honest[0]), { site: 'ok', numSamples: 1 }).problem).toBeUndefined();
  });

  it('NaN, wrong shape, unknown tensor and implausible sample counts are refused with a reason; the round is untouched', () => {
    for (const cfg of [{}, { strategy: 'median' }, { strategy: 'fedavg', serverOptimizer: { type: 'fedadam' } }]) {
      const agg = new ComposedStrategy(aggregationPlan({ ...cfg, validation: { maxSamples: 1000 } }), { spillDir: spill() }).begin(flatBundle(base), SPECS);
      const nan = honest[0].slice();
      nan[35] = Number.NaN;
      expect(agg.check(flatBundle(nan), { site: 'x', numSamples: 1 }).problem).toMatch(/non-finite values: tensor "b.bias" holds NaN at index 3/);
      const inf = honest[0].slice();
      inf[2] = Number.POSITIVE_INFINITY;
      expect(agg.check(flatBundle(inf), { site: 'x', numSamples: 1 }).problem).toMatch(/\+Inf at index 2/);
      const wrongShape = makeBundle([
        { name: 'a.weight', dtype: 'F32', shape: [8, 4], data: new Float32Array(32) },
        { name: 'b.bias', dtype: 'F32', shape: [8], data: new Float32Array(8) },
      ]);
      expect(agg.check(wrongShape, { site: 'x', numSamples: 1 }).problem).toMatch(/"a.weight": shape \[8,4\], expected \[4,8\]/);
      const extra = makeBundle([...flatBundle(honest[0]).values(), { name: 'head.weight', dtype: 'F32', shape: [1], data: new Float32Array(1) }]);
      expect(agg.check(extra, { site: 'x', numSamples: 1 }).problem).toMatch(/unknown tensor name\(s\): head.weight/);
      expect(agg.check(flatBundle(honest[0]), { site: 'x', numSamples: 0 }).problem).toMatch(/at least 1/);
      expect(agg.check(flatBundle(honest[0]), { site: 'x', numSamples: 5000 }).problem).toMatch(/plausible maximum 1000/);
      expect(agg.count).toBe(0);
      agg.add(flatBundle(honest[1]), { site: 'ok', numSamples: 3 });
      const out = flatOf(agg.finish());
      if (!('serverOptimizer' in cfg)) for (let j = 0; j < SIZE; j++) expect(out[j]).toBeCloseTo(honest[1][j], 6);
    }
  });
});
