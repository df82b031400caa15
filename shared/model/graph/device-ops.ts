/**
 * The Med3D graph ops on a ComputeDevice: the same computation as med3d-ops.ts (the host tape), step for step,
 * but every activation, gradient and parameter is a device handle and every kernel runs on the device. Nothing
 * here reads host memory, so on a GPU a training step's activations never leave it. On the host device it is
 * bit-for-bit the host engine (test/engine/device-graph.test.ts).
 *
 * Not on the device yet: the classification head (global pool + dense) and dropout; they throw here, and the
 * trainer keeps them on the host engine.
 */
import { torchConvGeom } from '../../engine/conv-kernels.ts';
import type { ComputeDevice } from '../../engine/device.ts';
import { MED3D_BN_EPS } from '../med3d.ts';
import type { Med3dConvOptions, Med3dGraphOps } from '../med3d-forward.ts';

/** BatchNorm's tensors by store name (γ, β and the running statistics). */
interface BatchNormParams<P> {
  readonly gamma: P;
  readonly beta: P;
  readonly mean: P;
  readonly variance: P;
}

/** γ and β of a group/instance norm layer. */
interface AffineNormParams<P> {
  readonly gamma: P;
  readonly beta: P;
}

export interface DeviceAct<B> {
  readonly buf: B;
  /** NDHWC for volumes. */
  readonly shape: readonly number[];
  /** False for data (the input image): no gradient is computed for it. */
  readonly needsGrad: boolean;
  grad?: B;
}

/** Parameters and their gradient accumulators on the device, by name. */
export interface DeviceParamStore<B> {
  value(name: string): B;
  shape(name: string): readonly number[];
  /** Undefined when the parameter is frozen or not trained. */
  grad(name: string): B | undefined;
}

/** Reverse-mode tape over device activations (the host Tape's contract). */
export class DeviceTape<B> {
  private steps: (() => void)[] = [];

  record(backward: () => void): void {
    this.steps.push(backward);
  }

  get length(): number {
    return this.steps.length;
  }

  /** Seeds `out` with `grad` and runs every recorded step in reverse; the tape is empty afterwards. */
  backward(out: DeviceAct<B>, grad: B): void {
    out.grad = grad;
    const steps = this.steps;
    this.steps = [];
    for (let i = steps.length - 1; i >= 0; i--) steps[i]();
  }
}

export interface DeviceOpsOptions<B, S> {
  readonly device: ComputeDevice<B, S>;
  readonly store: DeviceParamStore<B>;
  /** Records backward steps; absent for inference. */
  readonly tape?: DeviceTape<B>;
  /** Batch statistics in BatchNorm (and running-statistics updates). */
  readonly training: boolean;
  readonly bnMomentum?: number;
}

export function deviceAct<B>(buf: B, shape: readonly number[], needsGrad: boolean): DeviceAct<B> {
  return { buf, shape, needsGrad };
}

export function createMed3dDeviceOps<B, S>(o: DeviceOpsOptions<B, S>): Med3dGraphOps<DeviceAct<B>, string> {
  const { device: dev, store, tape, training } = o;
  const momentum = o.bnMomentum ?? 0.1;
  const record = (fn: () => void) => tape?.record(fn);
  const size = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
  // The host tape's accumulate: an owned gradient is taken over, a shared one copied, else summed in place.
  const accumulate = (a: DeviceAct<B>, g: B, owned: boolean): void => {
    if (!a.needsGrad) return;
    if (!a.grad) a.grad = owned ? g : dev.copy(g);
    else dev.addInto(a.grad, g);
  };

  const conv3d = (x: DeviceAct<B>, wName: string, opts: Med3dConvOptions): DeviceAct<B> => {
    const w = store.value(wName);
    const ws = store.shape(wName);
    if (ws.length !== 5 || ws[3] !== x.shape[4]) throw new Error(`conv3d ${wName}: weight [${ws.join(',')}] does not fit input [${x.shape.join(',')}]`);
    const g = torchConvGeom(x.shape, ws[4], { k: [ws[0], ws[1], ws[2]], stride: opts.stride ?? 1, dilation: opts.dilation ?? 1, pad: opts.pad ?? 0 });
    const out = deviceAct(dev.conv3d(x.buf, w, g), [g.n, ...g.out, g.cout], true);
    record(() => {
      const dy = out.grad;
      if (dy === undefined) return;
      const gw = store.grad(wName);
      if (gw !== undefined) dev.conv3dBackwardFilterAdd(x.buf, dy, g, gw);
      if (x.needsGrad) accumulate(x, dev.conv3dBackwardData(dy, w, g), true);
    });
    return out;
  };

  const convTranspose2x = (x: DeviceAct<B>, wName: string, bName: string): DeviceAct<B> => {
    const w = store.value(wName);
    const ws = store.shape(wName);
    const [n, d, h, wd, cin] = x.shape;
    if (ws.length !== 5 || ws[0] !== 2 || ws[1] !== 2 || ws[2] !== 2 || ws[4] !== cin) {
      throw new Error(`ConvTranspose3d ${wName}: weight [${ws.join(',')}] does not fit input [${x.shape.join(',')}] (expected [2,2,2,out,${cin}])`);
    }
    const cout = ws[3];
    // The transposed conv is the input gradient of the conv that maps its output back to its input.
    const g = torchConvGeom([n, 2 * d, 2 * h, 2 * wd, cout], cin, { k: 2, stride: 2 });
    const y = dev.conv3dBackwardData(x.buf, w, g);
    dev.biasAdd(y, cout, store.value(bName));
    const out = deviceAct(y, [n, 2 * d, 2 * h, 2 * wd, cout], true);
    record(() => {
      const dy = out.grad;
      if (dy === undefined) return;
      const gw = store.grad(wName);
      if (gw !== undefined) dev.conv3dBackwardFilterAdd(dy, x.buf, g, gw);
      const gb = store.grad(bName);
      if (gb !== undefined) dev.biasGradAdd(gb, dy, cout);
      if (x.needsGrad) accumulate(x, dev.conv3d(dy, w, g), true);
    });
    return out;
  };

  const batchNorm = (x: DeviceAct<B>, p: BatchNormParams<string>, relu: boolean): DeviceAct<B> => {
    const C = x.shape[x.shape.length - 1];
    const gamma = store.value(p.gamma);
    const beta = store.value(p.beta);
    const runMean = store.value(p.mean);
    const runVar = store.value(p.variance);
    const { y, saved } = training
      ? dev.batchNormTrain(x.buf, C, gamma, beta, runMean, runVar, momentum, MED3D_BN_EPS, relu)
      : dev.batchNormEval(x.buf, C, gamma, beta, runMean, runVar, MED3D_BN_EPS, relu);
    const out = deviceAct(y, x.shape, true);
    record(() => {
      const dy = out.grad;
      if (dy === undefined) return;
      const dx = dev.batchNormBackward(x.buf, dy, C, saved, gamma, relu ? y : undefined, training, x.needsGrad, store.grad(p.gamma), store.grad(p.beta));
      if (dx !== undefined) accumulate(x, dx, true);
    });
    return out;
  };

  const groupNorm = (x: DeviceAct<B>, p: AffineNormParams<string>, groups: number, relu: boolean): DeviceAct<B> => {
    const n = x.shape[0];
    const C = x.shape[x.shape.length - 1];
    const gamma = store.value(p.gamma);
    const { y, saved } = dev.groupNormForward(x.buf, n, C, groups, gamma, store.value(p.beta), MED3D_BN_EPS, relu);
    const out = deviceAct(y, x.shape, true);
    record(() => {
      const dy = out.grad;
      if (dy === undefined) return;
      const dx = dev.groupNormBackward(x.buf, dy, n, C, groups, saved, gamma, relu ? y : undefined, x.needsGrad, store.grad(p.gamma), store.grad(p.beta));
      if (dx !== undefined) accumulate(x, dx, true);
    });
    return out;
  };

  const concat = (a: DeviceAct<B>, b: DeviceAct<B>): DeviceAct<B> => {
    const [Ca, Cb] = [a.shape[4], b.shape[4]];
    if (a.shape.length !== 5 || b.shape.length !== 5 || a.shape.slice(0, 4).some((v, i) => v !== b.shape[i])) {
      throw new Error(`concat: cannot concatenate [${a.shape.join(',')}] and [${b.shape.join(',')}] along channels`);
    }
    const out = deviceAct(dev.concat(a.buf, Ca, b.buf, Cb), [...a.shape.slice(0, 4), Ca + Cb], a.needsGrad || b.needsGrad);
    record(() => {
      const dy = out.grad;
      if (dy === undefined) return;
      const parts = dev.split(dy, Ca, Cb, a.needsGrad, b.needsGrad);
      if (parts.a !== undefined) accumulate(a, parts.a, true);
      if (parts.b !== undefined) accumulate(b, parts.b, true);
    });
    return out;
  };

  const relu = (x: DeviceAct<B>): DeviceAct<B> => {
    const y = dev.relu(x.buf);
    const out = deviceAct(y, x.shape, x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (dy === undefined || !x.needsGrad) return;
      accumulate(x, dev.reluBackward(y, dy), true);
    });
    return out;
  };

  const maxPool = (x: DeviceAct<B>): DeviceAct<B> => {
    const { y, saved, shape } = dev.maxPool(x.buf, x.shape);
    const out = deviceAct(y, shape, x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (dy === undefined || !x.needsGrad) return;
      accumulate(x, dev.maxPoolBackward(dy, saved, x.shape), true);
    });
    return out;
  };

  const shortcutA = (x: DeviceAct<B>, outChannels: number, stride: number): DeviceAct<B> => {
    const [n, D, H, W, C] = x.shape;
    if (outChannels < C) throw new Error(`med3d: shortcut A cannot shrink ${C} channels to ${outChannels}`);
    const o = (s: number) => Math.floor((s - 1) / stride) + 1;
    const out = deviceAct(dev.shortcutA(x.buf, x.shape, outChannels, stride), [n, o(D), o(H), o(W), outChannels], x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (dy === undefined || !x.needsGrad) return;
      accumulate(x, dev.shortcutABackward(dy, x.shape, outChannels, stride), true);
    });
    return out;
  };

  const add = (a: DeviceAct<B>, b: DeviceAct<B>, relu: boolean): DeviceAct<B> => {
    if (size(a.shape) !== size(b.shape)) throw new Error(`add: shapes [${a.shape.join(',')}] and [${b.shape.join(',')}] differ`);
    const y = dev.add(a.buf, b.buf, relu);
    const out = deviceAct(y, a.shape, a.needsGrad || b.needsGrad);
    record(() => {
      let dy = out.grad;
      if (dy === undefined) return;
      if (relu) {
        dy = dev.reluBackward(y, dy);
        // The masked gradient is ours: the first input that needs one takes it over, the other gets a copy.
        if (a.needsGrad) {
          accumulate(a, dy, true);
          accumulate(b, dy, false);
        } else accumulate(b, dy, true);
        return;
      }
      accumulate(a, dy, false);
      accumulate(b, dy, false);
    });
    return out;
  };

  return {
    shape: (x) => x.shape,
    conv3d,
    convTranspose2x,
    // A layer with running statistics is BatchNorm; the others (group, instance) normalise per sample in groups.
    norm: (x, layer, param, groups, relu) =>
      layer.runningStatistics
        ? batchNorm(x, { gamma: param('weight'), beta: param('bias'), mean: param('running_mean'), variance: param('running_var') }, relu)
        : groupNorm(x, { gamma: param('weight'), beta: param('bias') }, groups ?? x.shape[x.shape.length - 1], relu),
    concat,
    relu,
    maxPool,
    shortcutA,
    add: (a, b) => add(a, b, false),
    addRelu: (a, b) => add(a, b, true),
    classifier: () => {
      throw new Error(`the classification head does not run on the ${dev.name} device yet: train it on the host engine`);
    },
  };
}
