/**
 * The Med3D trainer end to end on small volumes: it learns, it is deterministic, FedProx, freezing and
 * per-group learning rates do what they say, the optimisers follow PyTorch's update rules, and memory
 * stays flat over 50 steps.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { beforeAll, describe, expect, it } from 'vitest';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { createMed3dTrainer, poolTargets } from '../../shared/model/med3d-trainer.ts';
import { upsampleLinear } from '../../shared/model/window-probs.ts';
import { Optimizer, OptimizerSpecSchema, optimizerKernelsOf, resolveGroups } from '../../shared/model/optim.ts';
import type { ParamInfo, VolumeCase } from '../../shared/model/types.ts';
import { checkAgainstSpecs } from '../../shared/tensors/bundle.ts';
import { sphereCase } from '../helpers/volumes.ts';

let kernels: ConvKernels;
beforeAll(async () => {
  kernels = (await selectConvKernels()).kernels;
});

const seg2 = { kind: 'segmentation', numClasses: 2 } as const;

describe('Med3D trainer', () => {
  const trainCases = Array.from({ length: 8 }, (_, i) => sphereCase(i + 1, 24, 0.5));

  it('learns a ball segmentation: loss halves, validation Dice rises well above the untrained model', async () => {
    // Balls of radius 5–9 in 32³: MedicalNet's head predicts on a ¼ grid (8³ here), so smaller balls would
    // be sub-voxel there.
    const train = Array.from({ length: 8 }, (_, i) => sphereCase(i + 1, 32, 0.5, [5, 9]));
    const val = Array.from({ length: 4 }, (_, i) => sphereCase(1000 + i, 32, 0.5, [5, 9]));
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: seg2, patch: [32, 32, 32] });
    const trainer = createMed3dTrainer(arch, kernels);
    expect(trainer.engine).toBe(kernels.name);
    const w0 = arch.init(1);
    const pre = await trainer.evaluate(w0, val);
    const steps: number[] = [];
    const result = await trainer.train({ weights: w0, cases: train, steps: 50, batchSize: 2, learningRate: 0.02, seed: 3, onStep: (s) => steps.push(s) });
    expect(steps).toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(checkAgainstSpecs(result.weights, arch.params())).toBeUndefined();
    // Measured (JS kernels): loss 1.04 → 0.35, Dice 0.68.
    expect(result.loss).toBeLessThan(0.5 * result.firstLoss);
    const post = await trainer.evaluate(result.weights, val);
    expect(post.cases).toBe(4);
    expect(post.meanDice).toBeGreaterThan(0.5);
    expect(post.meanDice).toBeGreaterThan(pre.meanDice + 0.3);
    // Running statistics moved away from their init (train-mode BatchNorm updated them).
    expect(result.weights.get('encoder.bn1.running_var')!.data.some((v) => Math.abs(v - 1) > 1e-3)).toBe(true);
  });

  it('is deterministic in the seed; FedProx keeps weights nearer the start; frozen groups do not move', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 0.0625, head: seg2, patch: [16, 16, 16] });
    const trainer = createMed3dTrainer(arch, kernels);
    const w0 = arch.init(2);
    const cases = trainCases.slice(0, 3);
    const base = { weights: w0, cases, steps: 4, batchSize: 2, learningRate: 0.01, seed: 9 };
    const a = await trainer.train(base);
    const b = await trainer.train(base);
    for (const [name, t] of a.weights) expect(Buffer.from(t.data.buffer).equals(Buffer.from(b.weights.get(name)!.data.buffer)), name).toBe(true);

    const dist = (w: typeof a.weights) => {
      let s = 0;
      for (const p of arch.params()) if (p.trainable) for (let i = 0; i < w.get(p.name)!.data.length; i++) s += (w.get(p.name)!.data[i] - w0.get(p.name)!.data[i]) ** 2;
      return Math.sqrt(s);
    };
    const prox = await trainer.train({ ...base, proximalMu: 50 });
    expect(dist(prox.weights)).toBeLessThan(dist(a.weights));

    const frozen = await trainer.train({
      ...base,
      optimizer: OptimizerSpecSchema.parse({ kind: 'sgd', groups: [{ select: { stage: ['stem', 'layer1'] }, freeze: true }] }),
    });
    for (const p of arch.params()) {
      const same = Buffer.from(frozen.weights.get(p.name)!.data.buffer).equals(Buffer.from(w0.get(p.name)!.data.buffer));
      // Frozen parameters stay; their BatchNorm statistics still follow the data (as in PyTorch's train mode).
      if ((p.stage === 'stem' || p.stage === 'layer1') && p.trainable) expect(same, p.name).toBe(true);
      if (p.stage === 'layer4' && p.trainable && p.layerType === 'conv') expect(same, p.name).toBe(false);
    }
  });

  it('trains a classification head (global pool, dropout, dense) on case labels', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'classification', numClasses: 2, dropout: 0.2 }, patch: [16, 16, 16] });
    const trainer = createMed3dTrainer(arch, kernels);
    // Class 1: a ball is present; class 0: noise only.
    const withBall = (c: VolumeCase, cls: number): VolumeCase =>
      cls === 1 ? { ...c, label: undefined, classLabel: 1 } : { ...c, image: c.image.map((v, i) => (c.label![i] ? v - 1 : v)), label: undefined, classLabel: 0 };
    const cases = Array.from({ length: 8 }, (_, i) => withBall(sphereCase(50 + i, 16, 0.3), i % 2));
    const r = await trainer.train({ weights: arch.init(4), cases, steps: 30, batchSize: 4, learningRate: 0.003, seed: 1 });
    expect(r.loss).toBeLessThan(0.5 * r.firstLoss);
    const ev = await trainer.evaluate(r.weights, cases);
    expect(ev.accuracy).toBeGreaterThanOrEqual(0.75);
  });

  it('refuses bad requests with the reason', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: seg2, patch: [16, 16, 16] });
    const trainer = createMed3dTrainer(arch, kernels);
    const w = arch.init(1);
    await expect(trainer.train({ weights: w, cases: trainCases, steps: 1, batchSize: 1, learningRate: 0.01, seed: 1 })).rejects.toThrow(/batchSize ≥ 2/);
    await expect(trainer.train({ weights: w, cases: [], steps: 1, batchSize: 2, learningRate: 0.01, seed: 1 })).rejects.toThrow(/no voxel-labelled cases/);
    const broken = new Map(w);
    broken.delete('encoder.conv1.weight');
    await expect(trainer.train({ weights: broken, cases: trainCases, steps: 1, batchSize: 2, learningRate: 0.01, seed: 1 })).rejects.toThrow(/encoder.conv1.weight/);
    const bad = OptimizerSpecSchema.parse({ groups: [{ select: { stage: 'layer9' }, freeze: true }] });
    await expect(trainer.train({ weights: w, cases: trainCases, steps: 1, batchSize: 2, learningRate: 0.01, seed: 1, optimizer: bad })).rejects.toThrow(/selects no trainable parameter.*layer1/);
  });

  it('keeps memory flat over 50 training steps (no growth from activations, gradients or kernel caches)', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: seg2, patch: [16, 16, 16] });
    const trainer = createMed3dTrainer(arch, kernels);
    const samples: number[] = [];
    let weights = arch.init(1);
    for (let chunk = 0; chunk < 5; chunk++) {
      weights = (await trainer.train({ weights, cases: trainCases.slice(0, 4), steps: 10, batchSize: 2, learningRate: 0.001, seed: chunk })).weights;
      gc();
      gc();
      const m = process.memoryUsage();
      samples.push(m.heapUsed + m.arrayBuffers);
    }
    const model = [...weights.values()].reduce((a, t) => a + t.data.byteLength, 0);
    // After the first chunk (warm-up: kernel primitive caches, JIT) the footprint must not climb: less than
    // one model's size (~100 KB here) plus 2 MB of allocator slack across 40 further steps.
    const growth = Math.max(...samples.slice(1)) - samples[1];
    expect(growth).toBeLessThan(model + 2 * 2 ** 20);
  });
});

describe('Med3D segmentation grid helpers', () => {
  it('poolTargets averages one-hot labels onto the head grid (rows still sum to 1)', () => {
    const D = 8;
    const oneHot = new Float32Array(D ** 3 * 2);
    for (let v = 0; v < D ** 3; v++) oneHot[v * 2 + (v % 3 === 0 ? 1 : 0)] = 1;
    const pooled = poolTargets(oneHot, [1, D, D, D], 2, 4);
    expect(pooled.length).toBe(8 * 2);
    for (let i = 0; i < 8; i++) expect(pooled[2 * i] + pooled[2 * i + 1]).toBeCloseTo(1, 6);
    expect(() => poolTargets(oneHot, [1, 6, 8, 8], 2, 4)).toThrow(/divisible by 4/);
  });

  it('upsampleLinear reproduces a linear ramp exactly away from the borders (align_corners=False)', () => {
    const coarse = Float32Array.from({ length: 4 }, (_, i) => i); // a ramp along W, one channel
    const up = upsampleLinear(coarse, [1, 1, 1, 4, 1], 4);
    // D and H grow 1 → 4 too (constant along them): 4·4·16 values.
    expect(up.length).toBe(256);
    for (let row = 0; row < 16; row++) {
      const r = up.subarray(row * 16, row * 16 + 16);
      // Output voxel o samples input coordinate (o + 0.5)/4 − 0.5, clamped at the borders.
      for (let o = 2; o < 14; o++) expect(r[o]).toBeCloseTo((o + 0.5) / 4 - 0.5, 5);
      expect(r[0]).toBe(0);
      expect(r[15]).toBe(3);
    }
  });
});

describe('optimisers follow PyTorch (fixtures from scripts/make_optim_fixtures.py)', () => {
  const fx = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'fixtures', 'optim.json'), 'utf8')) as {
    w0: number[];
    grads: number[][];
    runs: { name: string; steps: number[][] }[];
  };
  const param: ParamInfo = { name: 'p.weight', shape: [6], dtype: 'F32', part: 'encoder', layerType: 'conv', stage: 'layer1', trainable: true };
  const specs: Record<string, object> = {
    sgd: { kind: 'sgd', momentum: 0.9, weightDecay: 0.01 },
    'sgd-plain': { kind: 'sgd', momentum: 0 },
    adam: { kind: 'adam', weightDecay: 0.01 },
  };
  const lr: Record<string, number> = { sgd: 0.1, 'sgd-plain': 0.1, adam: 0.01 };
  for (const run of fx.runs) {
    it(`${run.name}: four steps match torch.optim to float32 precision (JS loops and, when built, the native kernels)`, () => {
      const native = optimizerKernelsOf(kernels);
      for (const k of native ? [undefined, native] : [undefined]) {
        const w = Float32Array.from(fx.w0);
        const opt = new Optimizer(OptimizerSpecSchema.parse(specs[run.name]), lr[run.name], [param], new Map([[param.name, w]]), k);
        run.steps.forEach((want, i) => {
          opt.step(new Map([[param.name, Float32Array.from(fx.grads[i])]]));
          for (let j = 0; j < want.length; j++) expect(w[j]).toBeCloseTo(want[j], 5);
        });
      }
    });
  }

  it('native optimiser kernels agree with the JS loops on a large tensor (Adam and SGD, weight decay on)', () => {
    const native = optimizerKernelsOf(kernels);
    expect(native !== undefined).toBe(kernels.name === 'onednn');
    if (!native) return;
    const n = 100_003;
    const big: ParamInfo = { ...param, shape: [n] };
    for (const spec of [{ kind: 'adam', weightDecay: 0.01 }, { kind: 'sgd', momentum: 0.9, weightDecay: 0.01 }]) {
      const a = Float32Array.from({ length: n }, (_, i) => Math.sin(i));
      const b = a.slice();
      const oa = new Optimizer(OptimizerSpecSchema.parse(spec), 0.01, [big], new Map([[big.name, a]]));
      const ob = new Optimizer(OptimizerSpecSchema.parse(spec), 0.01, [big], new Map([[big.name, b]]), native);
      for (let t = 0; t < 3; t++) {
        const g = Float32Array.from({ length: n }, (_, i) => Math.cos(i * (t + 1)));
        oa.step(new Map([[big.name, g]]));
        ob.step(new Map([[big.name, g]]));
      }
      let d = 0;
      for (let i = 0; i < n; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
      expect(d, spec.kind).toBeLessThan(1e-6);
      expect(a.some((v, i) => v !== Math.sin(i))).toBe(true);
    }
  });

  it('per-group learning-rate scale: later rules override earlier ones', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: seg2, patch: [16, 16, 16] });
    const g = resolveGroups(arch.params(), [
      { select: { part: 'head' }, lrScale: 100 },
      { select: { part: 'head', layerType: 'norm' }, lrScale: 10 },
      { select: { stage: 'stem' }, freeze: true },
    ]);
    expect(g.get('head.conv_seg.3.weight')).toEqual({ lrScale: 100, frozen: false });
    expect(g.get('head.conv_seg.1.weight')).toEqual({ lrScale: 10, frozen: false });
    expect(g.get('encoder.conv1.weight')).toEqual({ lrScale: 1, frozen: true });
    expect(g.has('encoder.bn1.running_mean')).toBe(false);
  });
});
