import type * as TfModule from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { selectEngine, type EngineInfo } from '../../shared/engine/select.ts';
import { diceScores } from '../../shared/metrics/dice.ts';
import {
  conv3dBackward,
  conv3dForward,
  sameGeometry,
  upsample2xBackward,
  upsample2xForward,
} from '../../shared/model/conv3d-cpu.ts';
import {
  createTfjsOps,
  createTfjsTrainer,
  segmentationLoss,
  tiny3dForward,
  type TfjsOps,
} from '../../shared/model/tfjs-trainer.ts';
import { createTiny3d } from '../../shared/model/tiny3d.ts';
import type { VolumeCase } from '../../shared/model/types.ts';
import { checkAgainstSpecs, findNonFinite, makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { gaussian, mulberry32, randomInt } from '../../shared/util/random.ts';
import { sphereCase } from '../helpers/volumes.ts';
import { isInstalled } from '../helpers/modules.ts';

type Tensor = TfModule.Tensor;

let engine: EngineInfo;
let tf: typeof TfModule;
let ops: TfjsOps;

beforeAll(async () => {
  // Explicit "auto" so a MEDFL_ENGINE in the environment does not change what these tests check.
  // The pure-JS backend: tfjs's own cpu Conv3D kernels are the reference below (wasm's conv3d gradients are
  // wrong). Automatic selection is tested in engine-select.test.ts, in its own process.
  engine = await selectEngine({ force: 'cpu' });
  tf = engine.tf;
  ops = createTfjsOps(engine);
});


function randomArray(rng: () => number, n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = gaussian(rng) * scale;
  return a;
}

function maxRelErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let diff = 0;
  let mag = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    mag = Math.max(mag, Math.abs(b[i]));
  }
  return diff / mag;
}

/** A bright ball (class 1) of random centre and radius on Gaussian noise. */

function toTensorMap(bundle: TensorBundle): Map<string, Tensor> {
  return new Map([...bundle.values()].map((t) => [t.name, tf.tensor(new Float32Array(t.data), [...t.shape])]));
}

function disposeMap(m: Map<string, Tensor>): void {
  for (const t of m.values()) t.dispose();
}

describe('tiny3d architecture', () => {
  const arch = createTiny3d({ patch: [16, 16, 16], numClasses: 3, width: 4 });

  it('declares encoder and head conv parameters in tfjs layout', () => {
    const names = arch.params().map((p) => p.name);
    expect(names).toEqual([
      'encoder.stem.conv.weight',
      'encoder.stem.conv.bias',
      'encoder.down.conv.weight',
      'encoder.down.conv.bias',
      'encoder.mid.conv.weight',
      'encoder.mid.conv.bias',
      'head.up.conv.weight',
      'head.up.conv.bias',
      'head.skip.conv.weight',
      'head.skip.conv.bias',
      'head.out.conv.weight',
      'head.out.conv.bias',
    ]);
    const byName = new Map(arch.params().map((p) => [p.name, p]));
    expect(byName.get('encoder.stem.conv.weight')!.shape).toEqual([3, 3, 3, 1, 4]);
    expect(byName.get('encoder.down.conv.weight')!.shape).toEqual([3, 3, 3, 4, 8]);
    expect(byName.get('head.out.conv.weight')!.shape).toEqual([1, 1, 1, 4, 3]);
    expect(arch.params().every((p) => p.layerType === 'conv' && p.trainable && p.dtype === 'F32')).toBe(true);
    expect(arch.params().filter((p) => p.part === 'encoder').map((p) => p.stage)).toEqual(['stem', 'stem', 'down', 'down', 'mid', 'mid']);
    expect(arch.id).toBe('tiny3d');
    expect(arch.numClasses).toBe(3);
    expect(arch.patchShape).toEqual([16, 16, 16]);
  });

  it('init matches params() exactly', () => {
    expect(checkAgainstSpecs(arch.init(1), arch.params())).toBeUndefined();
    expect(findNonFinite(arch.init(1))).toBeUndefined();
  });

  it('init is deterministic in the seed and differs across seeds', () => {
    const a = arch.init(7);
    const b = arch.init(7);
    const c = arch.init(8);
    for (const [name, t] of a) {
      expect(b.get(name)!.data).toEqual(t.data);
      if (name.endsWith('.weight')) expect(c.get(name)!.data).not.toEqual(t.data);
    }
  });

  it('uses Kaiming-normal (fan_out) weights and zero biases', () => {
    const big = createTiny3d({ patch: [8, 8, 8], width: 16 }).init(3);
    const w = big.get('encoder.mid.conv.weight')!.data; // 27·32·32 values
    let s = 0;
    let s2 = 0;
    for (const v of w) {
      s += v;
      s2 += v * v;
    }
    const std = Math.sqrt(s2 / w.length - (s / w.length) ** 2);
    expect(std / Math.sqrt(2 / (27 * 32))).toBeGreaterThan(0.97);
    expect(std / Math.sqrt(2 / (27 * 32))).toBeLessThan(1.03);
    for (const [name, t] of big) if (name.endsWith('.bias')) expect(t.data.every((v) => v === 0)).toBe(true);
  });

  it('rejects patches that do not survive one stride-2 level', () => {
    expect(() => createTiny3d({ patch: [15, 16, 16] })).toThrow(/even/);
    expect(() => createTiny3d({ patch: [16, 16, 16], numClasses: 1 })).toThrow(/numClasses/);
  });
});

describe('engine selection', () => {
  it('memoises the selection', async () => {
    expect(await selectEngine({ force: 'cpu' })).toBe(engine);
  });

  it('fails clearly when a forced engine is unavailable or unknown', async () => {
    if (!isInstalled('@tensorflow/tfjs-node')) {
      await expect(selectEngine({ force: 'tfjs-node' })).rejects.toThrow(/@tensorflow\/tfjs-node.*npm install @tensorflow\/tfjs-node.*internet.*MEDFL_ENGINE=cpu/);
    }
    await expect(selectEngine({ force: 'cuda' })).rejects.toThrow(/unknown engine "cuda"/);
    expect(tf.getBackend()).toBe(engine.name === 'cpu' ? 'cpu' : 'tensorflow');
  });
});

describe('cpu conv3d kernels', () => {
  // tfjs's own cpu Conv3D and its backprop kernels are slow but correct: use them as the reference.
  const cases = [
    { size: [7, 6, 5], cin: 2, cout: 3, k: 3, stride: 1 },
    { size: [7, 6, 8], cin: 3, cout: 5, k: 3, stride: 2 },
    { size: [6, 6, 6], cin: 4, cout: 8, k: 3, stride: 1 },
    { size: [5, 4, 3], cin: 3, cout: 2, k: 1, stride: 1 },
  ] as const;
  for (const c of cases) {
    it(`matches tf.conv3d forward and gradients: ${c.size.join('×')}, ${c.cin}→${c.cout}, k${c.k}, stride ${c.stride}`, () => {
      const rng = mulberry32(11);
      const xShape = [2, ...c.size, c.cin];
      const xv = randomArray(rng, 2 * c.size[0] * c.size[1] * c.size[2] * c.cin);
      const wv = randomArray(rng, c.k ** 3 * c.cin * c.cout);
      const bv = randomArray(rng, c.cout);
      const g = sameGeometry(xShape, c.k, c.stride, c.cout);
      tf.tidy(() => {
        const x = tf.tensor5d(xv, xShape as [number, number, number, number, number]);
        const w = tf.tensor5d(wv, [c.k, c.k, c.k, c.cin, c.cout]);
        const ref = tf.add(tf.conv3d(x, w, c.stride, 'same'), tf.tensor1d(bv));
        expect([g.n, ...g.out, c.cout]).toEqual(ref.shape);
        expect(maxRelErr(conv3dForward(xv, wv, bv, g), ref.dataSync())).toBeLessThan(1e-5);
        const dyv = randomArray(rng, ref.size);
        const [dx, dw] = tf.grads((a: Tensor, b: Tensor) => tf.conv3d(a as TfModule.Tensor5D, b as TfModule.Tensor5D, c.stride, 'same'))(
          [x, w],
          tf.tensor(dyv, ref.shape),
        );
        const ours = conv3dBackward(xv, wv, dyv, g, true);
        expect(maxRelErr(ours.dx!, dx.dataSync())).toBeLessThan(1e-5);
        expect(maxRelErr(ours.dw, dw.dataSync())).toBeLessThan(1e-5);
        expect(maxRelErr(ours.db, tf.sum(tf.tensor(dyv, ref.shape), [0, 1, 2, 3]).dataSync())).toBeLessThan(1e-5);
      });
    });
  }

  it('upsample2x and its adjoint match a reshape-broadcast reference', () => {
    const rng = mulberry32(3);
    const shape = [2, 3, 4, 5, 3];
    const xv = randomArray(rng, 2 * 3 * 4 * 5 * 3);
    const dyv = randomArray(rng, xv.length * 8);
    tf.tidy(() => {
      const up = (a: Tensor) => tf.reshape(tf.mul(tf.reshape(a, [2, 3, 1, 4, 1, 5, 1, 3]), tf.ones([1, 1, 2, 1, 2, 1, 2, 1])), [2, 6, 8, 10, 3]);
      const x = tf.tensor(xv, shape);
      expect(upsample2xForward(xv, shape)).toEqual(up(x).dataSync());
      const dx = tf.grad(up)(x, tf.tensor(dyv, [2, 6, 8, 10, 3]));
      expect(maxRelErr(upsample2xBackward(dyv, shape), dx.dataSync())).toBeLessThan(1e-6);
    });
  });
});

describe('loss and gradients', () => {
  it('the fused JS loss equals the tf-ops loss, value and gradient', () => {
    const rng = mulberry32(9);
    const n = 2 * 5 * 5 * 5;
    const labels = Array.from({ length: n }, () => randomInt(rng, 3));
    tf.tidy(() => {
      const logits = tf.tensor(randomArray(rng, n * 3, 2), [2, 5, 5, 5, 3]);
      const oneHot = tf.oneHot(tf.tensor1d(labels, 'int32'), 3).toFloat();
      const ref = segmentationLoss(tf, logits, oneHot);
      const ours = ops.segmentationLoss(logits, oneHot);
      expect(Math.abs(ours.dataSync()[0] - ref.dataSync()[0])).toBeLessThan(1e-5);
      const gRef = tf.grad((l: Tensor) => segmentationLoss(tf, l, oneHot))(logits);
      const gOurs = tf.grad((l: Tensor) => ops.segmentationLoss(l, oneHot))(logits);
      expect(maxRelErr(gOurs.dataSync(), gRef.dataSync())).toBeLessThan(1e-4);
    });
  });

  it('cpu-engine ops give the same forward and gradients as the tf.conv3d ops used on native engines', () => {
    const arch = createTiny3d({ patch: [8, 8, 8], numClasses: 3, width: 2 });
    const nativeOps = createTfjsOps({ ...engine, name: 'tfjs-node' });
    const rng = mulberry32(4);
    const params = toTensorMap(arch.init(5));
    const labels = Array.from({ length: 2 * 512 }, () => randomInt(rng, 3));
    tf.tidy(() => {
      const x = tf.tensor5d(randomArray(rng, 2 * 512), [2, 8, 8, 8, 1]);
      const oneHot = tf.oneHot(tf.tensor1d(labels, 'int32'), 3).toFloat();
      const list = [...params.values()];
      const run = (o: TfjsOps) =>
        tf.grads((...ws: Tensor[]) => {
          const m = new Map([...params.keys()].map((k, i) => [k, ws[i]]));
          return o.segmentationLoss(tiny3dForward(m, x, o), oneHot);
        })(list);
      expect(maxRelErr(tiny3dForward(params, x, ops).dataSync(), tiny3dForward(params, x, nativeOps).dataSync())).toBeLessThan(1e-5);
      const a = run(ops);
      const b = run(nativeOps);
      a.forEach((g, i) => expect(maxRelErr(g.dataSync(), b[i].dataSync())).toBeLessThan(1e-4));
    });
    disposeMap(params);
  });

  it('the training loss gradient matches central finite differences', () => {
    const arch = createTiny3d({ patch: [8, 8, 8], numClasses: 3, width: 2 });
    const rng = mulberry32(21);
    const init = arch.init(2);
    // Non-zero biases so every parameter's gradient is exercised away from the init symmetry.
    const bundle = makeBundle(
      [...init.values()].map((t) => (t.name.endsWith('.bias') ? { ...t, data: randomArray(rng, t.data.length, 0.1) } : t)),
    );
    const img = randomArray(rng, 2 * 512);
    const labels = Array.from({ length: 2 * 512 }, () => randomInt(rng, 3));
    const x = tf.tensor5d(img, [2, 8, 8, 8, 1]);
    const oneHot = tf.tidy(() => tf.oneHot(tf.tensor1d(labels, 'int32'), 3).toFloat());
    const lossOf = (b: TensorBundle): number => {
      const p = toTensorMap(b);
      const v = tf.tidy(() => ops.segmentationLoss(tiny3dForward(p, x, ops), oneHot).dataSync()[0]);
      disposeMap(p);
      return v;
    };
    const params = toTensorMap(bundle);
    const names = [...params.keys()];
    const grads = tf.tidy(() =>
      tf.grads((...ws: Tensor[]) => ops.segmentationLoss(tiny3dForward(new Map(names.map((k, i) => [k, ws[i]])), x, ops), oneHot))([
        ...params.values(),
      ]).map((g) => g.dataSync() as Float32Array),
    );
    disposeMap(params);
    // float32 loss ≈ 1 carries ~1e-7 absolute noise, so eps 1e-3 leaves ~1e-4 noise in the quotient
    // while rarely moving a ReLU across its kink (weights are O(0.3)); gradients here are O(1e-2).
    // Check each tensor's largest entry and one random entry.
    const eps = 1e-3;
    let checked = 0;
    names.forEach((name, ti) => {
      const g = grads[ti];
      let argmax = 0;
      for (let i = 1; i < g.length; i++) if (Math.abs(g[i]) > Math.abs(g[argmax])) argmax = i;
      for (const idx of [argmax, randomInt(rng, g.length)]) {
        const shifted = (delta: number) =>
          makeBundle(
            [...bundle.values()].map((t) => {
              if (t.name !== name) return t;
              const d = new Float32Array(t.data);
              d[idx] += delta;
              return { ...t, data: d };
            }),
          );
        const fd = (lossOf(shifted(eps)) - lossOf(shifted(-eps))) / (2 * eps);
        expect(Math.abs(fd - g[idx]), `${name}[${idx}]: finite difference ${fd}, analytic ${g[idx]}`).toBeLessThan(
          0.02 * Math.abs(g[idx]) + 1e-4,
        );
        checked++;
      }
    });
    expect(checked).toBe(24);
    x.dispose();
    oneHot.dispose();
  });
});

describe('tfjs trainer', () => {
  const size = 20;
  const patch: [number, number, number] = [16, 16, 16];
  const noise = 0.7;
  const trainCases = Array.from({ length: 8 }, (_, i) => sphereCase(i + 1, size, noise));
  const valCases = Array.from({ length: 4 }, (_, i) => sphereCase(1000 + i, size, noise));

  it('learns a bright-ball segmentation: loss falls, validation Dice beats an intensity threshold', async () => {
    const arch = createTiny3d({ patch, width: 8 });
    const trainer = createTfjsTrainer(arch, engine);
    expect(trainer.engine).toBe(engine.name);
    const before = tf.memory().numTensors;
    const w0 = arch.init(1);
    const pre = await trainer.evaluate(w0, valCases);
    const steps: number[] = [];
    const result = await trainer.train({
      weights: w0,
      cases: trainCases,
      steps: 60,
      batchSize: 2,
      learningRate: 0.01,
      seed: 3,
      onStep: (s) => steps.push(s),
    });
    const post = await trainer.evaluate(result.weights, valCases);
    expect(tf.memory().numTensors).toBe(before);

    expect(steps).toEqual(Array.from({ length: 60 }, (_, i) => i));
    expect(result.samples).toBe(8);
    expect(checkAgainstSpecs(result.weights, arch.params())).toBeUndefined();
    expect(result.loss).toBeLessThan(0.5 * result.firstLoss);
    // Baseline: the best a per-voxel intensity threshold does on these volumes (noise σ 0.7 on a step of 1).
    let bestThreshold = 0;
    for (const t of [0.3, 0.5, 0.7, 0.9, 1.1]) {
      const d = valCases.map((c) => diceScores(Uint8Array.from(c.image, (v) => (v > t ? 1 : 0)), c.label!, 2)[0]);
      bestThreshold = Math.max(bestThreshold, d.reduce((a, v) => a + v, 0) / d.length);
    }
    expect(pre.meanDice).toBeLessThan(0.3);
    expect(post.cases).toBe(4);
    expect(post.dicePerClass).toHaveLength(1);
    // Measured 0.81–0.85 over five init/training seeds; the best threshold scores 0.22.
    expect(post.meanDice).toBeGreaterThan(0.7);
    expect(post.meanDice).toBeGreaterThan(bestThreshold + 0.15);
  });

  it('is deterministic in the seed, leaks no tensors, and FedProx keeps weights nearer the start', async () => {
    const arch = createTiny3d({ patch: [8, 8, 8], width: 2 });
    const trainer = createTfjsTrainer(arch, engine);
    const small = trainCases.slice(0, 3).map((c) => cropCase(c, 12));
    const w0 = arch.init(4);
    const req = { weights: w0, cases: small, steps: 6, batchSize: 2, learningRate: 0.05, seed: 9 };
    const before = tf.memory().numTensors;
    const a = await trainer.train(req);
    const b = await trainer.train(req);
    const prox = await trainer.train({ ...req, proximalMu: 50 });
    await trainer.evaluate(a.weights, small);
    expect(tf.memory().numTensors).toBe(before);
    for (const [name, t] of a.weights) expect(b.weights.get(name)!.data).toEqual(t.data);
    const c = await trainer.train({ ...req, seed: 10 });
    expect(c.weights.get('encoder.stem.conv.weight')!.data).not.toEqual(a.weights.get('encoder.stem.conv.weight')!.data);
    const drift = (w: TensorBundle) => {
      let s = 0;
      for (const [name, t] of w) {
        const s0 = w0.get(name)!.data;
        for (let i = 0; i < t.data.length; i++) s += (t.data[i] - s0[i]) ** 2;
      }
      return s;
    };
    expect(drift(prox.weights)).toBeLessThan(0.8 * drift(a.weights));
    // The caller's start weights are never modified.
    expect(w0.get('encoder.stem.conv.weight')!.data).toEqual(arch.init(4).get('encoder.stem.conv.weight')!.data);
  });

  it('evaluates odd-sized volumes and skips unlabelled cases', async () => {
    const arch = createTiny3d({ patch: [8, 8, 8], width: 2 });
    const trainer = createTfjsTrainer(arch, engine);
    const odd = cropCase(trainCases[0], 11);
    const { label: _drop, ...unlabelled } = odd;
    const r = await trainer.evaluate(arch.init(1), [odd, unlabelled]);
    expect(r.cases).toBe(1);
    expect(r.meanDice).toBeGreaterThanOrEqual(0);
    expect(r.meanDice).toBeLessThanOrEqual(1);
  });

  it('rejects mismatched weights and unlabelled-only training sets', async () => {
    const arch = createTiny3d({ patch: [8, 8, 8], width: 2 });
    const trainer = createTfjsTrainer(arch, engine);
    const other = createTiny3d({ patch: [8, 8, 8], width: 4 }).init(1);
    const req = { weights: other, cases: trainCases.slice(0, 1), steps: 1, batchSize: 1, learningRate: 0.01, seed: 1 };
    await expect(trainer.train(req)).rejects.toThrow(/do not match architecture tiny3d/);
    const { label: _drop, ...unlabelled } = trainCases[0];
    await expect(trainer.train({ ...req, weights: arch.init(1), cases: [unlabelled] })).rejects.toThrow(/no labelled cases/);
  });
});

/** The first `s`³ corner of a case. */
function cropCase(c: VolumeCase, s: number): VolumeCase {
  const [, H, W] = c.shape;
  const image = new Float32Array(s ** 3);
  const label = new Uint8Array(s ** 3);
  for (let z = 0; z < s; z++) {
    for (let y = 0; y < s; y++) {
      for (let x = 0; x < s; x++) {
        image[(z * s + y) * s + x] = c.image[(z * H + y) * W + x];
        label[(z * s + y) * s + x] = c.label![(z * H + y) * W + x];
      }
    }
  }
  return { id: c.id, shape: [s, s, s], image, label };
}
