/**
 * Med3D variants for federations of small sites: GroupNorm/InstanceNorm instead of BatchNorm, and the
 * full-resolution U-Net site head. GroupNorm is checked against a float64 reference and finite differences;
 * the U-Net head's gradients by finite differences through the training ops; shapes, the tfjs eval path,
 * plan/task validation, BN → GN transfer and a short training run on a tiny object.
 */
import type * as TfModule from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { CheckpointMappingError } from '../../shared/checkpoints/torch-mapping.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { jsConvKernels } from '../../shared/model/conv3d-cpu.ts';
import { groupNormBackward, groupNormForward } from '../../shared/model/layers/group-norm-kernel.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { act, Tape, type Act } from '../../shared/model/graph/tape.ts';
import {
  createMed3d,
  inferMed3dOptions,
  med3dFromTorch,
  med3dMetadata,
  med3dOptionsFromMetadata,
  med3dOutputShape,
  med3dToTorch,
  type Med3dArchitecture,
  type Med3dOptions,
} from '../../shared/model/med3d.ts';
import { med3dEmbed, med3dEncoderFeatures, med3dForward, med3dHeadForward, med3dPredict } from '../../shared/model/med3d-forward.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { initStrategyFromSpec } from '../../shared/model/transfer-init.ts';
import type { VolumeCase } from '../../shared/model/types.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';
import { parseSiteTask } from '../../site-agent/task-config.ts';
import { sphereCase } from '../helpers/volumes.ts';

type Tf = typeof TfModule;

let kernels: ConvKernels;
let tf: Tf;
beforeAll(async () => {
  kernels = (await selectConvKernels()).kernels;
  tf = (await selectEngine({ force: 'cpu' })).tf;
});

const randn = (n: number, seed: number, mean = 0, std = 1) => {
  const rng = mulberry32(seed);
  return Float64Array.from({ length: n }, () => mean + std * gaussian(rng));
};

/** nn.GroupNorm written out in float64: per sample and group, biased variance over voxels × group channels. */
function referenceGroupNorm(x: Float64Array, n: number, C: number, G: number, gamma: Float64Array, beta: Float64Array, relu: boolean): Float64Array {
  const V = x.length / n / C;
  const cg = C / G;
  const y = new Float64Array(x.length);
  for (let b = 0; b < n; b++) {
    for (let g = 0; g < G; g++) {
      const idx: number[] = [];
      for (let v = 0; v < V; v++) for (let c = g * cg; c < (g + 1) * cg; c++) idx.push((b * V + v) * C + c);
      const mean = idx.reduce((s, i) => s + x[i], 0) / idx.length;
      const variance = idx.reduce((s, i) => s + (x[i] - mean) ** 2, 0) / idx.length;
      for (const i of idx) {
        const t = ((x[i] - mean) / Math.sqrt(variance + 1e-5)) * gamma[i % C] + beta[i % C];
        y[i] = relu ? Math.max(0, t) : t;
      }
    }
  }
  return y;
}

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

describe('GroupNorm / InstanceNorm ops', () => {
  const n = 2;
  const V = 5;
  const C = 6;

  for (const [G, relu] of [[1, false], [2, false], [3, true], [6, false], [6, true]] as const) {
    it(`G=${G}${G === C ? ' (instance norm)' : ''}${relu ? ' + ReLU' : ''}: forward matches the float64 reference, backward matches finite differences`, () => {
      // A large common offset: the two-pass variance must still be exact.
      const x = randn(n * V * C, 1 + G, 3, 0.7);
      const gamma = randn(C, 2, 1, 0.5);
      const beta = randn(C, 3, 0, 0.5);
      const r = randn(n * V * C, 4);
      const x32 = Float32Array.from(x);
      const fwd = groupNormForward(x32, n, C, G, Float32Array.from(gamma), Float32Array.from(beta), 1e-5, relu);
      const ref = referenceGroupNorm(x, n, C, G, gamma, beta, relu);
      for (let i = 0; i < ref.length; i++) expect(Math.abs(fwd.y[i] - ref[i])).toBeLessThan(2e-5);

      const grads = groupNormBackward(x32, Float32Array.from(r), n, C, G, fwd, Float32Array.from(gamma), relu ? fwd.y : undefined, true);
      // L = Σ r·y; central differences on the float64 reference.
      const h = 1e-5;
      const loss = (xx: Float64Array, gg: Float64Array, bb: Float64Array) => dot(r, referenceGroupNorm(xx, n, C, G, gg, bb, relu));
      const fd = (arr: Float64Array, i: number) => {
        const keep = arr[i];
        arr[i] = keep + h;
        const up = loss(x, gamma, beta);
        arr[i] = keep - h;
        const down = loss(x, gamma, beta);
        arr[i] = keep;
        return (up - down) / (2 * h);
      };
      const close = (analytic: number, numeric: number) => expect(Math.abs(analytic - numeric)).toBeLessThan(1e-3 * Math.max(1, Math.abs(numeric)));
      for (let i = 0; i < x.length; i++) close(grads.dx![i], fd(x, i));
      for (let c = 0; c < C; c++) {
        close(grads.dgamma[c], fd(gamma, c));
        close(grads.dbeta[c], fd(beta, c));
      }
    });
  }

  it('instance norm normalises every channel of every sample on its own; a bad group count is refused', () => {
    const x = Float32Array.from(randn(n * V * C, 9, 5, 2));
    const ones = new Float32Array(C).fill(1);
    const { y } = groupNormForward(x, n, C, C, ones, new Float32Array(C), 1e-5, false);
    for (let b = 0; b < n; b++) {
      for (let c = 0; c < C; c++) {
        const vals = Array.from({ length: V }, (_, v) => y[(b * V + v) * C + c]);
        const mean = vals.reduce((s, v) => s + v, 0) / V;
        expect(Math.abs(mean)).toBeLessThan(1e-5);
        expect(vals.reduce((s, v) => s + (v - mean) ** 2, 0) / V).toBeCloseTo(1, 3);
      }
    }
    expect(() => groupNormForward(x, n, C, 4, ones, ones, 1e-5, false)).toThrow(/6 channels cannot be split into 4 groups/);
  });
});

/** Parameter store over plain arrays with a gradient for every trainable tensor. */
function storeOf(arch: Med3dArchitecture, weights: TensorBundle): ParamStore & { values: Map<string, Float32Array>; grads: Map<string, Float32Array> } {
  const values = new Map(arch.params().map((p) => [p.name, Float32Array.from(weights.get(p.name)!.data)]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  return { values, grads, value: (n) => values.get(n)!, shape: (n) => shapes.get(n)!, grad: (n) => grads.get(n) };
}

const names = (arch: Med3dArchitecture) => new Map(arch.params().map((p) => [p.name, p.name]));

/**
 * Finite-difference check of a float32 network. ReLU and max-pool kinks make a central difference wrong
 * wherever a perturbation crosses one, so each entry is differenced at h and h/2: where the two agree the
 * function is smooth there and the analytic gradient must match; at least `minSmooth` of the entries must be.
 * Float32 rounding leaves about 5e-3 of noise in a difference at h = 1e-3, hence the absolute floor of 1 in `scale`.
 */
function checkGradient(label: string, arr: Float32Array, grad: Float32Array, indices: readonly number[], loss: () => number, minSmooth = 0.6): void {
  let smooth = 0;
  const diff = (i: number, h: number) => {
    const keep = arr[i];
    arr[i] = keep + h;
    const up = loss();
    arr[i] = keep - h;
    const down = loss();
    arr[i] = keep;
    return (up - down) / (2 * h);
  };
  for (const i of indices) {
    const coarse = diff(i, 1e-3);
    const fine = diff(i, 5e-4);
    const scale = Math.max(1, Math.abs(fine));
    if (Math.abs(coarse - fine) > 1e-2 * scale) continue;
    smooth++;
    expect(Math.abs(grad[i] - fine), `${label}[${i}]: analytic ${grad[i]}, numeric ${fine}`).toBeLessThan(2e-2 * scale);
  }
  expect(smooth, `${label}: entries in a smooth region`).toBeGreaterThanOrEqual(Math.ceil(minSmooth * indices.length));
}

const sample = (len: number, k: number, seed: number) => {
  const rng = mulberry32(seed);
  return Array.from({ length: k }, () => Math.floor(rng() * len));
};

describe('U-Net head', () => {
  const unetOpts = (norm: 'batch' | 'group' | 'instance', patch: [number, number, number] = [16, 16, 16]): Med3dOptions => ({
    depth: 10,
    shortcut: 'B',
    widthMultiplier: 0.0625,
    head: { kind: 'unet', numClasses: 2, channels: 4 },
    patch,
    norm,
    normGroups: 2,
  });

  it('has its parameters under head.dec with conv/norm layer types, all site-local by default; no running statistics with group norm', () => {
    const bn = createMed3d(unetOpts('batch'));
    const gn = createMed3d(unetOpts('group'));
    const head = gn.params().filter((p) => p.part === 'head');
    expect(head.length).toBeGreaterThan(0);
    expect(head.every((p) => p.name.startsWith('head.dec.'))).toBe(true);
    expect(head.find((p) => p.name === 'head.dec.up3.weight')).toMatchObject({ layerType: 'conv', shape: [2, 2, 2, 4, 32] });
    expect(head.find((p) => p.name === 'head.dec.norm3.weight')).toMatchObject({ layerType: 'norm' });
    expect(gn.params().some((p) => p.name.includes('running_'))).toBe(false);
    expect(bn.params().find((p) => p.name === 'head.dec.norm1.running_var')).toMatchObject({ trainable: false, layerType: 'norm' });
    // Same names for γ/β in both norms: a BatchNorm checkpoint transfers by name.
    const trainableNames = (a: Med3dArchitecture) => a.params().filter((p) => p.trainable).map((p) => p.name);
    expect(trainableNames(gn)).toEqual(trainableNames(bn));
    const share = { parts: ['encoder' as const], keepLocal: ['norm' as const] };
    const shared = sharedParams(gn, share);
    expect(shared.some((p) => p.part === 'head' || p.layerType === 'norm')).toBe(false);
  });

  for (const [patch, label] of [
    [[32, 32, 32], '32³'],
    [[24, 32, 40], '24×32×40'],
  ] as const) {
    it(`predicts at the full input resolution (${label}), in the training ops and in tfjs eval, which agree`, () => {
      for (const norm of ['group', 'batch'] as const) {
        const arch = createMed3d(unetOpts(norm, [...patch]));
        expect(med3dOutputShape(arch.config, patch)).toEqual([...patch, 2]);
        const w = arch.init(5);
        const store = storeOf(arch, w);
        const x = Float32Array.from(randn(patch[0] * patch[1] * patch[2], 6));
        const y = med3dForward(arch, names(arch), act(x, [1, ...patch, 1], false), createMed3dTrainOps({ kernels, store, training: false }));
        expect(y.shape).toEqual([1, ...patch, 2]);
        const yt = med3dPredict(tf, arch, w, tf.tensor(x, [1, ...patch, 1]) as TfModule.Tensor5D);
        expect(yt.shape).toEqual([1, ...patch, 2]);
        const ref = yt.dataSync();
        yt.dispose();
        let maxAbs = 0;
        let maxRef = 0;
        for (let i = 0; i < ref.length; i++) {
          maxAbs = Math.max(maxAbs, Math.abs(ref[i] - y.data[i]));
          maxRef = Math.max(maxRef, Math.abs(ref[i]));
        }
        expect(maxAbs, `${norm} ${label}`).toBeLessThan(1e-4 * Math.max(1, maxRef));
      }
    });
  }

  it('refuses an input whose sides are not multiples of 8 with a clear error; the trainer pads a whole volume and crops back', async () => {
    const arch = createMed3d(unetOpts('instance'));
    const store = storeOf(arch, arch.init(1));
    const ops = createMed3dTrainOps({ kernels, store, training: false });
    expect(() => med3dForward(arch, names(arch), act(new Float32Array(20 * 16 * 16), [1, 20, 16, 16, 1], false), ops)).toThrow(/multiples of 8/);
    expect(() => med3dHeadForward(arch, names(arch), act(new Float32Array(32), [1, 1, 1, 1, 32], false), ops)).toThrow(/needs the encoder skips/);

    const trainer = createMed3dTrainer(arch, kernels);
    const [D, H, W] = [21, 30, 37];
    const rng = mulberry32(3);
    const vc: VolumeCase = { id: 'odd', shape: [D, H, W], image: Float32Array.from({ length: D * H * W }, () => rng()), label: new Uint8Array(D * H * W) };
    const probs = await trainer.predictProbs(arch.init(1), vc);
    expect(probs.length).toBe(D * H * W * 2);
    for (let v = 0; v < D * H * W; v += 97) expect(probs[2 * v] + probs[2 * v + 1]).toBeCloseTo(1, 5);
    const ev = await trainer.evaluate(arch.init(1), [vc]);
    expect(ev.cases).toBe(1);
  });

  it('gradients of the head parameters and of its inputs (features and skips) match finite differences', () => {
    // 8³ input (the smallest the head takes): fewer activations, fewer kinks to cross.
    const arch = createMed3d(unetOpts('group', [8, 8, 8]));
    const store = storeOf(arch, arch.init(11));
    const params = names(arch);
    const x = act(Float32Array.from(randn(2 * 8 ** 3, 12)), [2, 8, 8, 8, 1], false);
    // Encoder once, without a tape: its outputs become the head's inputs, which need gradients here.
    const enc = med3dEncoderFeatures(arch, params, x, createMed3dTrainOps({ kernels: jsConvKernels, store, training: true }));
    const input = (a: Act) => act(Float32Array.from(a.data), a.shape, true);
    const [feats, stem, layer1] = [input(enc.features), input(enc.skips.stem), input(enc.skips.layer1)];
    const r = Float32Array.from(randn(2 * 8 ** 3 * 2, 13));
    const forward = (tape?: Tape) =>
      med3dHeadForward(arch, params, feats, createMed3dTrainOps({ kernels: jsConvKernels, store, tape, training: true }), { skips: { input: x, stem, layer1 } });
    const tape = new Tape();
    tape.backward(forward(tape), r);
    const loss = () => dot(r, forward().data);
    for (const name of ['head.dec.up3.weight', 'head.dec.up3.bias', 'head.dec.conv3.weight', 'head.dec.norm3.weight', 'head.dec.up2.weight', 'head.dec.conv2.weight', 'head.dec.norm2.bias', 'head.dec.up1.weight', 'head.dec.up1.bias', 'head.dec.in_conv.weight', 'head.dec.in_norm.weight', 'head.dec.conv1.weight', 'head.dec.norm1.weight', 'head.dec.cls.weight']) {
      const v = store.values.get(name)!;
      checkGradient(name, v, store.grads.get(name)!, sample(v.length, 4, name.length), loss, 0.5);
    }
    checkGradient('features', feats.data as Float32Array, feats.grad!, sample(feats.data.length, 6, 1), loss);
    checkGradient('stem skip', stem.data as Float32Array, stem.grad!, sample(stem.data.length, 6, 2), loss);
    checkGradient('layer1 skip', layer1.data as Float32Array, layer1.grad!, sample(layer1.data.length, 6, 3), loss);
  });

  it('encoder gradients through the skips match finite differences (group norm encoder + U-Net head)', () => {
    const arch = createMed3d(unetOpts('group', [8, 8, 8]));
    const store = storeOf(arch, arch.init(21));
    const params = names(arch);
    const x = act(Float32Array.from(randn(2 * 8 ** 3, 22)), [2, 8, 8, 8, 1], false);
    const r = Float32Array.from(randn(2 * 8 ** 3 * 2, 23));
    const run = (tape?: Tape) => med3dForward(arch, params, x, createMed3dTrainOps({ kernels: jsConvKernels, store, tape, training: true }));
    const tape = new Tape();
    tape.backward(run(tape), r);
    for (const name of ['encoder.conv1.weight', 'encoder.bn1.weight', 'encoder.bn1.bias', 'encoder.layer1.0.conv2.weight', 'encoder.layer1.0.bn2.weight', 'encoder.layer2.0.conv1.weight', 'encoder.layer2.0.downsample.0.weight']) {
      const v = store.values.get(name)!;
      checkGradient(name, v, store.grads.get(name)!, sample(v.length, 6, name.length), () => dot(r, run().data), 0.5);
    }
  });

  it('learns a tiny object (radius 1–2 voxels) that MedicalNet’s ¼-resolution head cannot resolve', async () => {
    // 16³ volumes, 0.1–0.8% foreground; both heads get 8 channels and the same encoder, data and steps.
    const cases = Array.from({ length: 8 }, (_, i) => sphereCase(i + 1, 16, 0.3, [1, 2]));
    const run = async (kind: 'segmentation' | 'unet') => {
      const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.125, head: { kind, numClasses: 2, channels: 8 }, patch: [16, 16, 16], norm: 'group' });
      const trainer = createMed3dTrainer(arch, kernels);
      const result = await trainer.train({ weights: arch.init(1), cases, steps: 40, batchSize: 2, learningRate: 0.01, seed: 3 });
      return { result, dice: (await trainer.evaluate(result.weights, cases)).meanDice };
    };
    const seg = await run('segmentation');
    const unet = await run('unet');
    // Measured (oneDNN): segmentation Dice 0.00, U-Net 0.95 (loss 0.64 → 0.07).
    expect(unet.result.loss).toBeLessThan(0.5 * unet.result.firstLoss);
    expect(unet.dice).toBeGreaterThan(0.6);
    expect(unet.dice).toBeGreaterThan(seg.dice + 0.4);
  });

  it('trains with batch size 1 under group norm (BatchNorm still needs 2)', async () => {
    const cases = [sphereCase(1, 16, 0.3, [2, 3])];
    const train = (norm: 'batch' | 'group') => {
      const arch = createMed3d({ ...unetOpts(norm), normGroups: 4 });
      return createMed3dTrainer(arch, kernels).train({ weights: arch.init(1), cases, steps: 2, batchSize: 1, learningRate: 0.01, seed: 1 });
    };
    await expect(train('batch')).rejects.toThrow(/batchSize ≥ 2/);
    const r = await train('group');
    expect(Number.isFinite(r.loss)).toBe(true);
  });
});

describe('plan and site task options', () => {
  const plan = (model: string) => `model:\n  architecture: med3d\n  patch: [16, 16, 16]\n${model}`;

  it('defaults to BatchNorm with 8 groups and accepts unet / group / instance', () => {
    const p = parsePlan(plan(''), 'p.yaml');
    expect(p.model.norm).toBe('batch');
    expect(p.model.normGroups).toBe(8);
    const q = parsePlan(plan('  head: unet\n  norm: group\n  normGroups: 4\n'), 'p.yaml');
    const arch = architectureFor(q.model) as Med3dArchitecture;
    expect(arch.config).toMatchObject({ norm: 'group', normGroups: 4, head: { kind: 'unet', channels: 8 } });
    expect(parsePlan(plan('  norm: instance\n'), 'p.yaml').model.norm).toBe('instance');
  });

  it('refuses a group count that does not divide a norm layer, naming the layer and the key', () => {
    // ¼ width: 16 base planes, head channels 8: 3 divides none of them, 16 does not divide the head's 8.
    expect(() => parsePlan(plan('  norm: group\n  normGroups: 3\n'), 'p.yaml')).toThrow(/p\.yaml:\d+: model\.normGroups: .*normGroups 3 does not divide .*encoder\.bn1 \(16\)/);
    expect(() => parsePlan(plan('  norm: group\n  normGroups: 16\n'), 'p.yaml')).toThrow(/model\.normGroups: .*head\.conv_seg\.1 \(8\)/);
    // Not checked for instance norm (always divides) nor batch norm (groups unused).
    expect(() => parsePlan(plan('  norm: instance\n  normGroups: 3\n'), 'p.yaml')).not.toThrow();
    expect(() => parsePlan(plan('  norm: layer\n'), 'p.yaml')).toThrow(/model\.norm/);
    expect(() => createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: { kind: 'unet', numClasses: 2 }, patch: [16, 16, 16], norm: 'group', normGroups: 5 })).toThrow(
      /normGroups 5 does not divide/,
    );
  });

  it('needs patch sides that are multiples of 8 for the unet head', () => {
    expect(() => parsePlan('model:\n  architecture: med3d\n  head: unet\n  patch: [20, 24, 24]\n', 'p.yaml')).toThrow(/model\.patch: med3d unet heads need patch sides that are multiples of 8/);
  });

  it('lets a site choose the unet head in its task file', () => {
    expect(parseSiteTask('head: unet\nnumClasses: 3\nheadChannels: 12\n')).toMatchObject({ head: 'unet', numClasses: 3, headChannels: 12 });
    expect(() => parseSiteTask('head: unet\nnumClasses: 2\ndropout: 0.1\n')).toThrow(/dropout/);
    expect(() => parseSiteTask('head: unet\nnumClasses: 300\n')).toThrow(/at most 255 classes/);
  });
});

describe('BatchNorm checkpoint → group-norm architecture', () => {
  const opts = (norm: 'batch' | 'group'): Med3dOptions => ({
    depth: 10,
    shortcut: 'B',
    widthMultiplier: 0.0625,
    head: { kind: 'unet', numClasses: 2, channels: 4 },
    patch: [16, 16, 16],
    norm,
    normGroups: 2,
  });

  /** A BatchNorm model whose γ, β and statistics are all non-trivial. */
  function bnCheckpoint(): TensorBundle {
    const arch = createMed3d(opts('batch'));
    const w = arch.init(7);
    let seed = 100;
    return makeBundle([...w.values()].map((t) => (t.name.includes('bn') || t.name.includes('downsample.1') ? { ...t, data: Float32Array.from(randn(t.data.length, seed++, 1, 0.3)) } : t)));
  }

  for (const spec of ['pretrained', 'partial:1', 'mean-var']) {
    it(`${spec}: γ and β carried over by name (mean-var: reset), running statistics dropped and noted`, () => {
      const source = bnCheckpoint();
      const gn = createMed3d(opts('group'));
      const { weights, report } = initStrategyFromSpec(spec).init(gn, { seed: 1, pretrained: source });
      expect([...weights.keys()].some((n) => n.includes('running_'))).toBe(false);
      expect(report.ignored).toContain('encoder.bn1.running_mean');
      expect(report.ignored).toContain('encoder.layer1.0.bn2.running_var');
      expect(report.notes.some((n) => /running statistics of \d+ norm layers dropped/.test(n))).toBe(true);
      const g = weights.get('encoder.bn1.weight')!.data;
      const b = weights.get('encoder.layer1.0.bn2.bias')!.data;
      if (spec === 'mean-var') {
        expect([...g].every((v) => v === 1)).toBe(true);
        expect([...b].every((v) => v === 0)).toBe(true);
      } else {
        expect([...g]).toEqual([...source.get('encoder.bn1.weight')!.data]);
        expect([...b]).toEqual([...source.get('encoder.layer1.0.bn2.bias')!.data]);
        expect(report.copied).toContain('encoder.bn1.weight');
      }
    });
  }

  it('a group-norm source for a BatchNorm model is refused with a hint; MedicalNet names map cleanly or refuse with a hint', () => {
    const gn = createMed3d(opts('group'));
    const bn = createMed3d(opts('batch'));
    let err: unknown;
    try {
      initStrategyFromSpec('pretrained').init(bn, { seed: 1, pretrained: gn.init(1) });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CheckpointMappingError);
    expect((err as Error).message).toMatch(/group\/instance-norm model/);

    // PyTorch export and import of a group-norm U-Net model round-trips (dec.* is the head, dec.up* transposed).
    const w = gn.init(3);
    const back = med3dFromTorch(gn, med3dToTorch(w));
    for (const [name, t] of w) expect([...back.get(name)!.data], name).toEqual([...t.data]);
    // A BatchNorm (MedicalNet) state_dict into a group-norm model: refused, with the way to transfer it.
    expect(() => med3dFromTorch(gn, med3dToTorch(bnCheckpoint()))).toThrow(/BatchNorm running statistics.*init pretrained/s);
  });

  it('model files record norm and head; the tensors give the head but never guess the norm', () => {
    const gn = createMed3d({ ...opts('group') });
    const meta = med3dOptionsFromMetadata(med3dMetadata(gn))!;
    expect(meta).toMatchObject({ norm: 'group', normGroups: 2, head: { kind: 'unet', numClasses: 2, channels: 4 } });
    const inferred = inferMed3dOptions([...gn.init(1).values()]);
    expect(inferred).toMatchObject({ head: { kind: 'unet', numClasses: 2, channels: 4 }, depth: 10, shortcut: 'B' });
    // Group or instance norm, and how many groups, cannot be read off γ/β.
    expect(inferred.norm).toBeUndefined();
  });

  it('embeds with the tfjs eval ops through a group-norm encoder (same features as the training ops)', () => {
    const arch = createMed3d({ ...opts('group'), patch: [16, 16, 16] });
    const w = arch.init(4);
    const x = Float32Array.from(randn(16 ** 3, 5));
    const ops = createMed3dTrainOps({ kernels, store: storeOf(arch, w), training: false });
    const mine = med3dEncoderFeatures(arch, names(arch), act(x, [1, 16, 16, 16, 1], false), ops).features;
    const feats = med3dEmbed(tf, arch, w, tf.tensor(x, [1, 16, 16, 16, 1]) as TfModule.Tensor5D);
    expect(feats.shape).toEqual([...mine.shape]);
    const ref = feats.dataSync();
    feats.dispose();
    for (let i = 0; i < ref.length; i++) expect(Math.abs(ref[i] - mine.data[i])).toBeLessThan(1e-4 * Math.max(1, Math.abs(ref[i])));
  });
});
