/**
 * The Med3D graph on a ComputeDevice: on the host device it is the host engine bit for bit (forward, every
 * gradient, running statistics, loss and the optimiser's update), and on a device whose buffers are opaque a
 * training step moves exactly one packed batch in and one loss value out; the weights cross once each way.
 */
import { describe, expect, it } from 'vitest';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { createHostDevice } from '../../shared/engine/host-device.ts';
import { createMed3dDeviceOps, deviceAct, DeviceTape, type DeviceParamStore } from '../../shared/model/graph/device-ops.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { BufferPool } from '../../shared/model/graph/pool.ts';
import { act, Tape } from '../../shared/model/graph/tape.ts';
import { jsConvKernels } from '../../shared/model/conv3d-cpu.ts';
import { createMed3d, med3dOutputFactor, type Med3dArchitecture, type Med3dOptions } from '../../shared/model/med3d.ts';
import { med3dEncoderFeatures, med3dHeadForward } from '../../shared/model/med3d-forward.ts';
import { DeviceTraining } from '../../shared/model/device-training.ts';
import { Optimizer, OptimizerSpecSchema, optimizerKernelsOf } from '../../shared/model/optim.ts';
import { segmentationLossJs } from '../../shared/model/tfjs-trainer.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { countingDevice } from '../helpers/counting-device.ts';

const kernelSets: Promise<ConvKernels[]> = (async () => {
  const sel = (await selectConvKernels()).kernels;
  return sel.name === 'js' ? [jsConvKernels] : [jsConvKernels, sel];
})();

const VARIANTS: { label: string; opts: Med3dOptions }[] = [
  { label: 'R10-A, BatchNorm, MedicalNet head', opts: { depth: 10, shortcut: 'A', widthMultiplier: 0.125, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] } as Med3dOptions },
  {
    label: 'R18-B, GroupNorm, U-Net head, 3 classes',
    opts: { depth: 18, shortcut: 'B', widthMultiplier: 0.125, norm: 'group', normGroups: 4, head: { kind: 'unet', numClasses: 3 }, patch: [16, 16, 16] } as Med3dOptions,
  },
];

function batchFor(arch: Med3dArchitecture, n: number, seed: number) {
  const rng = mulberry32(seed);
  const [d, h, w] = arch.patchShape;
  const image = Float32Array.from({ length: n * d * h * w }, () => 2 * rng() - 1);
  const f = med3dOutputFactor(arch.config.head);
  const voxels = (n * d * h * w) / f ** 3;
  const K = arch.numClasses;
  // Soft targets on the head's grid (rows sum to 1), as pooled labels are.
  const target = new Float32Array(voxels * K);
  for (let v = 0; v < voxels; v++) {
    let s = 0;
    for (let k = 0; k < K; k++) s += target[v * K + k] = rng();
    for (let k = 0; k < K; k++) target[v * K + k] /= s;
  }
  return { image, target, batchSize: n };
}

function hostStore(arch: Med3dArchitecture, weights: TensorBundle) {
  const values = new Map(arch.params().map((p) => [p.name, new Float32Array(weights.get(p.name)!.data)]));
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: (n) => shapes.get(n)!, grad: (n) => grads.get(n) };
  return { store, values, grads };
}

const names = (arch: Med3dArchitecture) => new Map(arch.params().map((p) => [p.name, p.name]));

describe('Med3D graph on the host device', async () => {
  for (const kernels of await kernelSets) {
    for (const v of VARIANTS) {
      it(`${v.label} on ${kernels.name}: forward, every gradient and the running statistics equal the host tape's bit for bit`, () => {
        const arch = createMed3d(v.opts);
        const w0 = arch.init(5);
        const { image, target } = batchFor(arch, 2, 11);
        const [d, h, w] = arch.patchShape;

        const host = hostStore(arch, w0);
        const tape = new Tape();
        const ops = createMed3dTrainOps({ kernels, store: host.store, tape, training: true, pool: new BufferPool() });
        const x = act(image, [2, d, h, w, 1], false);
        const enc = med3dEncoderFeatures(arch, names(arch), x, ops);
        const out = med3dHeadForward(arch, names(arch), enc.features, ops, { skips: enc.skips });
        const hostLoss = segmentationLossJs(out.data, target, arch.numClasses);
        tape.backward(out, hostLoss.grad);

        const dev = createHostDevice(kernels);
        const dv = hostStore(arch, w0);
        const dstore: DeviceParamStore<Float32Array> = dv.store;
        const dtape = new DeviceTape<Float32Array>();
        const dops = createMed3dDeviceOps({ device: dev, store: dstore, tape: dtape, training: true });
        const denc = med3dEncoderFeatures(arch, names(arch), deviceAct(dev.upload(image), [2, d, h, w, 1], false), dops);
        const dout = med3dHeadForward(arch, names(arch), denc.features, dops, { skips: denc.skips });
        expect(dout.buf).toEqual(out.data);
        const devLoss = dev.segmentationLoss(dout.buf, target, arch.numClasses, undefined);
        expect(devLoss.loss[0]).toBe(Math.fround(hostLoss.loss));
        dtape.backward(dout, devLoss.grad);

        let compared = 0;
        for (const p of arch.params()) {
          const want = p.trainable ? host.grads.get(p.name)! : host.values.get(p.name)!;
          const got = p.trainable ? dv.grads.get(p.name)! : dv.values.get(p.name)!;
          // Every trained parameter got a gradient, and none is all zeros by accident of wiring.
          if (p.trainable && p.name.endsWith('weight')) expect(want.some((g) => g !== 0), p.name).toBe(true);
          expect(Buffer.from(got.buffer, got.byteOffset, got.byteLength).equals(Buffer.from(want.buffer, want.byteOffset, want.byteLength)), p.name).toBe(true);
          compared++;
        }
        expect(compared).toBe(arch.params().length);
      });
    }
  }

  it('a training session on the host device takes exactly the host optimiser steps (Adam, groups, frozen stage)', async () => {
    const kernels = (await kernelSets).at(-1)!;
    const arch = createMed3d(VARIANTS[0].opts);
    const w0 = arch.init(7);
    const spec = OptimizerSpecSchema.parse({ kind: 'adam', weightDecay: 1e-4, groups: [{ select: { stage: 'stem' }, freeze: true }, { select: { part: 'head' }, lrScale: 3 }] });
    const lr = 0.01;
    const batches = [batchFor(arch, 2, 1), batchFor(arch, 2, 2)];

    const host = hostStore(arch, w0);
    const opt = new Optimizer(spec, lr, arch.params(), host.values, optimizerKernelsOf(kernels));
    const trained = new Set(opt.trained);
    const hostGrads = new Map([...host.grads].filter(([n]) => trained.has(n)));
    const store: ParamStore = { ...host.store, grad: (n) => hostGrads.get(n) };
    const pool = new BufferPool();
    const hostLosses: number[] = [];
    for (const b of batches) {
      for (const g of hostGrads.values()) g.fill(0);
      pool.recycle();
      const tape = new Tape();
      const ops = createMed3dTrainOps({ kernels, store, tape, training: true, pool });
      const [d, h, w] = arch.patchShape;
      const enc = med3dEncoderFeatures(arch, names(arch), act(b.image, [2, d, h, w, 1], false), ops);
      const out = med3dHeadForward(arch, names(arch), enc.features, ops, { skips: enc.skips });
      const l = segmentationLossJs(out.data, b.target, arch.numClasses);
      tape.backward(out, l.grad);
      opt.step(hostGrads, 0.5);
      hostLosses.push(Math.fround(l.loss));
    }

    const session = new DeviceTraining(createHostDevice(kernels), arch, w0, { optimizer: spec, learningRate: lr });
    const losses = batches.map((b) => session.step(b, 0.5));
    expect(losses).toEqual(hostLosses);
    const after = session.weights();
    let moved = 0;
    for (const p of arch.params()) {
      const got = after.get(p.name)!.data;
      expect(got, p.name).toEqual(host.values.get(p.name)!);
      if (got.some((x, i) => x !== w0.get(p.name)!.data[i])) moved++;
    }
    // The frozen stem kept its values; everything else trained.
    expect(after.get('encoder.conv1.weight')!.data).toEqual(w0.get('encoder.conv1.weight')!.data);
    expect(moved).toBeGreaterThan(arch.params().length / 2);
    const state = session.optimizerState();
    expect([...state.keys()].sort()).toEqual([...opt.state().keys()].sort());
    for (const [n, s] of opt.state()) expect(state.get(n)!.v).toEqual(s.v);
    session.close();
  });
});

describe('Med3D training on a device with opaque buffers', () => {
  it('a step uploads one packed batch and downloads one loss; the weights cross once each way', async () => {
    const kernels = (await kernelSets).at(-1)!;
    for (const v of VARIANTS) {
      const arch = createMed3d(v.opts);
      const w0 = arch.init(3);
      const { device, counts, reset } = countingDevice(createHostDevice(kernels));
      const session = new DeviceTraining(device, arch, w0, { learningRate: 0.01 });
      // Opening: one upload per parameter (and per optimiser moment only when continuing a state: none here).
      expect(counts).toEqual({ uploads: arch.params().length, uploadedValues: arch.params().reduce((a, p) => a + w0.get(p.name)!.data.length, 0), downloads: 0, downloadedValues: 0 });
      reset();
      const steps = 3;
      const losses: number[] = [];
      let batchValues = 0;
      for (let s = 0; s < steps; s++) {
        const b = batchFor(arch, 2, 20 + s);
        batchValues += b.image.length + b.target.length;
        losses.push(session.step(b));
      }
      expect(counts, v.label).toEqual({ uploads: steps, uploadedValues: batchValues, downloads: steps, downloadedValues: steps });
      expect(losses.every(Number.isFinite)).toBe(true);
      reset();
      const after = session.weights();
      expect(counts.uploads).toBe(0);
      expect(counts.downloads).toBe(arch.params().length);
      // It trained: the same steps on the host device give the same weights.
      const ref = new DeviceTraining(createHostDevice(kernels), arch, w0, { learningRate: 0.01 });
      for (let s = 0; s < steps; s++) ref.step(batchFor(arch, 2, 20 + s));
      for (const p of arch.params()) expect(after.get(p.name)!.data, p.name).toEqual(ref.weights().get(p.name)!.data);
      session.close();
      ref.close();
    }
  });

  it('refuses what it cannot run on the device with a clear error', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'classification', numClasses: 2, dropout: 0 }, patch: [16, 16, 16] } as Med3dOptions);
    expect(() => new DeviceTraining(createHostDevice(jsConvKernels), arch, arch.init(1), { learningRate: 0.01 })).toThrow(/classification head is not on the device/);
    const seg = createMed3d(VARIANTS[0].opts);
    const s = new DeviceTraining(createHostDevice(jsConvKernels), seg, seg.init(1), { learningRate: 0.01 });
    expect(() => s.step({ ...batchFor(seg, 2, 1), batchSize: 3 })).toThrow(/a batch of 3 needs/);
  });
});
