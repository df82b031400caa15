/**
 * Server-optimiser moments in a file (moments.ts), updated block by block: every optimiser gives the weights and
 * the exported m / v of the in-memory moments bit for bit over several rounds, across blocks of any length, and
 * after a restore; the file is unlinked as soon as it is open, so nothing is left behind.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { fileMoments, memoryMoments } from '../../coordinator/aggregation/moments.ts';
import { ServerOptimizer, type ServerOptimizerType } from '../../coordinator/aggregation/server-optimizer.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';

const SIZES = [3, 1000, 2501];
const specs: TensorSpec[] = SIZES.map((n, i) => ({ name: `t${i}`, dtype: 'F32', shape: [n] }));
const offsets = new Map<string, { off: number; n: number }>();
SIZES.reduce((off, n, i) => (offsets.set(`t${i}`, { off, n }), off + n), 0);
const total = SIZES.reduce((a, b) => a + b, 0);

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-moments-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const random = (seed: number, n = total, scale = 1): Float32Array => {
  const rng = mulberry32(seed);
  return Float32Array.from({ length: n }, () => scale * (rng() - 0.5));
};
const cfgOf = (type: ServerOptimizerType) => PlanSchema.parse({ aggregation: { serverOptimizer: { type } } }).aggregation.serverOptimizer;
const flat = (b: TensorBundle): Record<string, number[]> => Object.fromEntries([...b].map(([k, t]) => [k, Array.from(t.data)]));

describe('server optimiser with file-backed moments', () => {
  for (const type of ['fedavgm', 'fedadagrad', 'fedadam', 'fedyogi'] as const) {
    it(`${type}: the same weights and moments as in memory, bit for bit, across blocks and a restore`, () => {
      const mem = new ServerOptimizer(cfgOf(type), memoryMoments);
      // 997 floats a block: blocks end inside tensors and the last one is short.
      const file = new ServerOptimizer(cfgOf(type), fileMoments(dir, 997));
      for (let round = 0; round < 3; round++) {
        const base = random(10 + round);
        const y = random(20 + round);
        for (let i = 0; i < total; i++) y[i] = base[i] + 0.01 * y[i];
        const ya = y.slice();
        const yb = y.slice();
        mem.apply(base, ya);
        file.apply(base, yb);
        expect(Array.from(yb)).toEqual(Array.from(ya));
      }
      const exported = file.exportTensors(specs, offsets)!;
      expect(flat(exported)).toEqual(flat(mem.exportTensors(specs, offsets)!));
      expect([...exported.keys()]).toEqual(type === 'fedavgm' ? ['m/t0', 'm/t1', 'm/t2'] : ['m/t0', 'm/t1', 'm/t2', 'v/t0', 'v/t1', 'v/t2']);
      // Unlinked once open: nothing is left behind, even by a process that dies.
      expect(readdirSync(dir)).toEqual([]);

      // A restarted coordinator restores them into a new file and goes on identically.
      const restored = new ServerOptimizer(cfgOf(type), fileMoments(dir, 997));
      restored.restoreTensors(makeBundle([...exported.values()].map((t) => ({ ...t, data: t.data.slice() }))), specs, offsets, total);
      const base = random(99);
      const y = base.map((b, i) => b + 0.01 * random(98)[i]);
      const ya = y.slice();
      const yb = y.slice();
      mem.apply(base, ya);
      restored.apply(base, yb);
      expect(Array.from(yb)).toEqual(Array.from(ya));

      file.dispose();
      restored.dispose();
    });
  }

  it('the composed strategy keeps them in a file under its spill dir (unlinked), with the in-memory results, also after reset()', () => {
    const cfg = PlanSchema.parse({ aggregation: { serverOptimizer: { type: 'fedadam' } } }).aggregation;
    const spill = join(dir, 'spill');
    mkdirSync(spill);
    const onDisk = new ComposedStrategy(cfg, { spillDir: spill });
    const inMemory = new ComposedStrategy(cfg, { moments: memoryMoments });
    const base = makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: random(s.shape[0], s.shape[0]) })));
    const round = (s: ComposedStrategy) => {
      const agg = s.begin(base, specs, { expected: 2 });
      for (const k of [1, 2]) {
        const u = makeBundle(specs.map((sp) => ({ name: sp.name, dtype: 'F32' as const, shape: [...sp.shape], data: base.get(sp.name)!.data.map((b, i) => b + 0.01 * Math.sin(i + k)) })));
        const info = { site: `s${k}`, numSamples: k };
        const v = agg.check(u, info);
        agg.add(u, info, v);
      }
      return flat(agg.finish());
    };
    expect(round(onDisk)).toEqual(round(inMemory));
    expect(flat(onDisk.exportState()!.tensors!)).toEqual(flat(inMemory.exportState()!.tensors!));
    expect(readdirSync(spill)).toEqual([]);
    // After reset() the optimiser starts again from zero moments, as the in-memory one does.
    onDisk.reset();
    inMemory.reset();
    expect(round(onDisk)).toEqual(round(inMemory));
  });
});
