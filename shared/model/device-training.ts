/**
 * Med3D segmentation training with every tensor on a ComputeDevice: the weights, their gradients and the
 * optimiser's moments are uploaded once when the session opens; each step uploads one packed batch (image,
 * targets on the head's grid, optional voxel weights) in one transfer, runs forward, loss, backward and the
 * optimiser step on the device and downloads the loss (one value); weights() reads the parameters back once
 * at the end. The optimiser is the host Optimizer's (same groups, frozen stages, decay rule, per-parameter step
 * counts, continued state), so on the host device a session computes exactly what the host trainer computes.
 *
 * Segmentation heads only (MedicalNet's and the U-Net head); no dropout, no FedProx term: the classification
 * head and those options stay on the host engine.
 */
import type { ComputeDevice } from '../engine/device.ts';
import { makeBundle, type TensorBundle } from '../tensors/bundle.ts';
import { createMed3dDeviceOps, deviceAct, DeviceTape, type DeviceParamStore } from './graph/device-ops.ts';
import type { Med3dArchitecture } from './med3d.ts';
import { med3dEncoderFeatures, med3dHeadForward } from './med3d-forward.ts';
import { decays, DEFAULT_OPTIMIZER, optimizerStateProblem, resolveGroups, type OptimizerSpec, type OptimizerState, type ParamOptimizerState } from './optim.ts';

export interface DeviceTrainingOptions {
  readonly optimizer?: OptimizerSpec;
  readonly learningRate: number;
  /** Optimiser state to continue from (as TrainResult.optimizerState). */
  readonly optimizerState?: OptimizerState;
}

/** One step's batch on the host: image [n, D, H, W, C], targets on the head's grid [voxels, classes], optional weights [voxels]. */
export interface DeviceBatch {
  readonly image: Float32Array;
  readonly batchSize: number;
  readonly target: Float32Array;
  readonly weight?: Float32Array;
}

interface Slot<B> {
  readonly name: string;
  readonly lrScale: number;
  readonly decay: boolean;
  readonly m: B;
  readonly v?: B;
  t: number;
}

export class DeviceTraining<B, S> {
  private readonly values = new Map<string, B>();
  private readonly grads = new Map<string, B>();
  private readonly slots: Slot<B>[] = [];
  private readonly spec: OptimizerSpec;
  private readonly store: DeviceParamStore<B>;
  private closed = false;
  private packed?: Float32Array;

  constructor(
    private readonly device: ComputeDevice<B, S>,
    private readonly arch: Med3dArchitecture,
    weights: TensorBundle,
    private readonly opts: DeviceTrainingOptions,
  ) {
    if (arch.config.head.kind === 'classification') throw new Error('device training: the classification head is not on the device yet (host engine only)');
    if (!(opts.learningRate > 0)) throw new Error(`device training: learning rate must be > 0, got ${opts.learningRate}`);
    this.spec = opts.optimizer ?? DEFAULT_OPTIMIZER;
    const params = arch.params();
    const problem = opts.optimizerState && optimizerStateProblem(opts.optimizerState, this.spec.kind, params);
    if (problem) throw new Error(`device training: initial optimiser state does not fit: ${problem}`);
    const shapes = new Map<string, readonly number[]>();
    for (const p of params) {
      const t = weights.get(p.name);
      if (!t) throw new Error(`device training: no weights for ${p.name}`);
      // A private host copy first: the host device shares uploaded memory, and training updates it in place.
      this.values.set(p.name, device.upload(new Float32Array(t.data), true));
      shapes.set(p.name, p.shape);
    }
    const groups = resolveGroups(params, this.spec.groups);
    for (const p of params) {
      const g = groups.get(p.name);
      if (!g || g.frozen) continue;
      const n = device.length(this.values.get(p.name)!);
      const from = opts.optimizerState?.get(p.name);
      const moment = (host: Float32Array | undefined) => {
        if (host) return device.upload(new Float32Array(host), true);
        const b = device.alloc(n, true);
        device.fill(b, 0);
        return b;
      };
      const grad = device.alloc(n, true);
      this.grads.set(p.name, grad);
      this.slots.push({
        name: p.name,
        lrScale: g.lrScale,
        decay: decays(p),
        m: moment(from?.m),
        v: this.spec.kind === 'adam' ? moment(from?.v) : undefined,
        t: from?.step ?? 0,
      });
    }
    const values = this.values;
    const grads = this.grads;
    this.store = {
      value: (name) => {
        const v = values.get(name);
        if (v === undefined) throw new Error(`med3d: unknown parameter ${name}`);
        return v;
      },
      shape: (name) => shapes.get(name)!,
      grad: (name) => grads.get(name),
    };
  }

  /** One training step; returns its loss (the step's only download). */
  step(batch: DeviceBatch, lrFactor = 1): number {
    if (this.closed) throw new Error('device training: session is closed');
    if (!(lrFactor >= 0 && Number.isFinite(lrFactor))) throw new Error(`device training: learning-rate factor must be finite and ≥ 0, got ${lrFactor}`);
    const dev = this.device;
    const arch = this.arch;
    const [pd, ph, pw] = arch.patchShape;
    const C = arch.config.inChannels;
    const n = batch.batchSize;
    const imageLen = n * pd * ph * pw * C;
    if (batch.image.length !== imageLen) throw new Error(`device training: image holds ${batch.image.length} values, a batch of ${n} needs ${imageLen}`);
    const K = arch.numClasses;
    if (batch.target.length % K !== 0) throw new Error(`device training: ${batch.target.length} target values are not a whole number of ${K}-class voxels`);
    const voxels = batch.target.length / K;
    if (batch.weight && batch.weight.length !== voxels) throw new Error(`device training: ${batch.weight.length} voxel weights for ${voxels} voxels`);

    dev.recycle();
    for (const g of this.grads.values()) dev.fill(g, 0);
    // The batch in one transfer: image, targets, weights packed back to back.
    // The host array is kept for the next step (same sizes): a fresh 32 MB array per step (4 × 128³) costs
    // its zeroing and page faults on every step.
    const packedLen = imageLen + batch.target.length + (batch.weight?.length ?? 0);
    if (this.packed?.length !== packedLen) this.packed = new Float32Array(packedLen);
    const packed = this.packed;
    packed.set(batch.image, 0);
    packed.set(batch.target, imageLen);
    if (batch.weight) packed.set(batch.weight, imageLen + batch.target.length);
    const onDevice = dev.upload(packed);
    const image = dev.view(onDevice, 0, imageLen);
    const target = dev.view(onDevice, imageLen, batch.target.length);
    const weight = batch.weight ? dev.view(onDevice, imageLen + batch.target.length, voxels) : undefined;

    const tape = new DeviceTape<B>();
    const ops = createMed3dDeviceOps({ device: dev, store: this.store, tape, training: true });
    const names = new Map(arch.params().map((p) => [p.name, p.name]));
    const x = deviceAct(image, [n, pd, ph, pw, C], false);
    const enc = med3dEncoderFeatures(arch, names, x, ops);
    const out = med3dHeadForward(arch, names, enc.features, ops, { skips: enc.skips });
    if (dev.length(out.buf) !== batch.target.length) {
      throw new Error(`device training: the head predicts ${dev.length(out.buf) / K} voxels, the targets hold ${voxels}`);
    }
    const { loss, grad } = dev.segmentationLoss(out.buf, target, K, weight);
    const value = dev.download(loss)[0];
    if (!Number.isFinite(value)) throw new Error(`device training: loss became ${value} (learning rate ${this.opts.learningRate} too high?)`);
    tape.backward(out, grad);
    this.optimizerStep(lrFactor);
    return value;
  }

  /** The parameters, read back from the device (one download per tensor). */
  weights(): TensorBundle {
    return makeBundle(
      this.arch.params().map((p) => ({ name: p.name, dtype: 'F32' as const, shape: [...p.shape], data: new Float32Array(this.device.download(this.values.get(p.name)!)) })),
    );
  }

  /** The optimiser's state, read back from the device (to continue in a later round). */
  optimizerState(): OptimizerState {
    const dl = (b: B) => new Float32Array(this.device.download(b));
    return new Map<string, ParamOptimizerState>(this.slots.map((s) => [s.name, { step: s.t, m: dl(s.m), ...(s.v !== undefined ? { v: dl(s.v) } : {}) }]));
  }

  /** Frees everything this session holds on the device. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.device.recycle();
    for (const b of [...this.values.values(), ...this.grads.values()]) this.device.free(b);
    for (const s of this.slots) {
      this.device.free(s.m);
      if (s.v !== undefined) this.device.free(s.v);
    }
  }

  // The host Optimizer's step, with its buffers on the device.
  private optimizerStep(lrFactor: number): void {
    const { kind, momentum, beta1, beta2, eps, weightDecay } = this.spec;
    for (const s of this.slots) {
      const t = ++s.t;
      const w = this.values.get(s.name)!;
      const g = this.grads.get(s.name)!;
      const lr = this.opts.learningRate * s.lrScale * lrFactor;
      const wd = s.decay ? weightDecay : 0;
      if (kind === 'sgd') {
        this.device.sgdStep(w, g, s.m, lr, momentum, wd, t === 1 ? 1 : 0);
        continue;
      }
      const c1 = 1 - Math.pow(beta1, t);
      this.device.adamStep(w, g, s.m, s.v!, lr / c1, beta1, beta2, eps, Math.sqrt(1 - Math.pow(beta2, t)), wd);
    }
  }
}
