/**
 * The host as a ComputeDevice: buffers are the Float32Arrays themselves (upload and download hand the same
 * array back: zero copies), every kernel is the selected ConvKernels, its ElementwiseKernels and the optimiser
 * kernels it brings, and step-scoped memory comes from a BufferPool. It computes exactly what the host tape of
 * med3d-ops.ts computes, operation for operation, so the device graph on it is bit-for-bit the host engine.
 */
import { BufferPool } from '../model/graph/pool.ts';
import { segmentationLossJs } from '../model/tfjs-trainer.ts';
import { JS_OPTIMIZER_KERNELS, optimizerKernelsOf } from '../model/optim.ts';
import { inputLength, outputLength, weightLength, type ConvKernels } from './conv-kernels.ts';
import type { ComputeDevice } from './device.ts';
import { batchNormKernels } from '../model/layers/batch-norm.ts';
import { groupNormKernels } from '../model/layers/group-norm.ts';
import type { GroupNormForward } from '../model/layers/group-norm-kernel.ts';
import { elementwiseOf, type ElementwiseKernels } from './elementwise-kernels.ts';

/** What a host forward kernel saves for its backward. */
export type HostSaved =
  | { readonly kind: 'bn'; readonly mean: Float32Array; readonly invStd: Float32Array }
  | { readonly kind: 'gn'; readonly fwd: Pick<GroupNormForward, 'mean' | 'invStd'> }
  | { readonly kind: 'pool'; readonly argmax: Int32Array };

export type HostDevice = ComputeDevice<Float32Array, HostSaved>;

export function createHostDevice(kernels: ConvKernels, opts: { elementwise?: ElementwiseKernels } = {}): HostDevice {
  const pool = new BufferPool();
  const take = (n: number) => pool.take(n);
  const ew = (opts.elementwise ?? elementwiseOf(kernels)).withAlloc(take);
  const bn = batchNormKernels(ew);
  const gn = groupNormKernels(ew);
  const optim = optimizerKernelsOf(kernels) ?? JS_OPTIMIZER_KERNELS;
  /** Runs a convolution kernel into a pooled output (the kernel may ignore it and return its own). */
  const pooled = (len: number, run: (out: Float32Array) => Float32Array): Float32Array => {
    const out = pool.take(len);
    const r = run(out);
    if (r !== out) pool.untake(out);
    return r;
  };
  const zeros = (n: number) => {
    const b = pool.take(n);
    b.fill(0);
    return b;
  };
  const saved = <K extends HostSaved['kind']>(s: HostSaved, kind: K): Extract<HostSaved, { kind: K }> => {
    if (s.kind !== kind) throw new Error(`host device: expected saved ${kind} state, got ${s.kind}`);
    return s as Extract<HostSaved, { kind: K }>;
  };
  const addParamGrads = (gg: Float32Array | undefined, gb: Float32Array | undefined, dgamma: ArrayLike<number>, dbeta: ArrayLike<number>) => {
    for (let c = 0; c < dgamma.length; c++) {
      if (gg) gg[c] += dgamma[c];
      if (gb) gb[c] += dbeta[c];
    }
  };

  return {
    name: `host (${kernels.name})`,
    alloc: (n, persistent) => (persistent ? new Float32Array(n) : pool.take(n)),
    upload: (src) => src,
    download: (b, dst) => {
      if (!dst) return b;
      dst.set(b);
      return dst;
    },
    length: (b) => b.length,
    view: (b, offset, length) => b.subarray(offset, offset + length),
    fill: (b, value) => {
      b.fill(value);
    },
    copy: (b) => {
      const c = pool.take(b.length);
      c.set(b);
      return c;
    },
    free: () => {},
    recycle: () => pool.recycle(),

    conv3d: (x, w, g) => pooled(outputLength(g), (o) => kernels.conv3d(x, w, g, o)),
    conv3dBackwardData: (dy, w, g) => pooled(inputLength(g), (o) => kernels.conv3dBackwardData(dy, w, g, o)),
    conv3dBackwardFilterAdd: (x, dy, g, gw) => ew.addInto(gw, pooled(weightLength(g), (o) => kernels.conv3dBackwardFilter(x, dy, g, o))),

    batchNormTrain(x, C, gamma, beta, runMean, runVar, momentum, eps, relu) {
      const r = bn.batchNormTrain(x, C, gamma, beta, runMean, runVar, momentum, eps, relu);
      return { y: r.y, saved: { kind: 'bn', mean: r.mean, invStd: r.invStd } };
    },
    batchNormEval(x, C, gamma, beta, runMean, runVar, eps, relu) {
      const mean = new Float32Array(C);
      const invStd = new Float32Array(C);
      const scale = new Float32Array(C);
      const shift = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        mean[c] = runMean[c];
        invStd[c] = 1 / Math.sqrt(runVar[c] + eps);
        scale[c] = gamma[c] * invStd[c];
        shift[c] = beta[c] - runMean[c] * scale[c];
      }
      return { y: bn.scaleShift(x, C, scale, shift, relu), saved: { kind: 'bn', mean, invStd } };
    },
    batchNormBackward(x, dy, C, s, gamma, y, batchStats, wantDx, gg, gb) {
      const { mean, invStd } = saved(s, 'bn');
      const g = bn.batchNormBackward(x, dy, C, mean, invStd, gamma, y, batchStats, wantDx);
      addParamGrads(gg, gb, g.dgamma, g.dbeta);
      return g.dx;
    },
    groupNormForward(x, n, C, G, gamma, beta, eps, relu) {
      const fwd = gn.groupNormForward(x, n, C, G, gamma, beta, eps, relu);
      return { y: fwd.y, saved: { kind: 'gn', fwd } };
    },
    groupNormBackward(x, dy, n, C, G, s, gamma, reluOut, wantDx, gg, gb) {
      const g = gn.groupNormBackward(x, dy, n, C, G, saved(s, 'gn').fwd, gamma, reluOut, wantDx);
      addParamGrads(gg, gb, g.dgamma, g.dbeta);
      return g.dx;
    },

    relu: (x) => ew.relu(x),
    reluBackward: (y, dy) => ew.reluBackward(y, dy),
    add: (a, b, relu) => ew.add(a, b, relu),
    addInto: (dst, src) => ew.addInto(dst, src),
    maxPool(x, shape) {
      const r = ew.maxPool(x, shape);
      return { y: r.y, saved: { kind: 'pool', argmax: r.argmax }, shape: r.shape };
    },
    maxPoolBackward: (dy, s, inShape) => ew.maxPoolBackward(dy, saved(s, 'pool').argmax, inShape),
    concat: (a, Ca, b, Cb) => ew.concat(a, Ca, b, Cb),
    split: (y, Ca, Cb, wantA, wantB) => ew.split(y, Ca, Cb, wantA, wantB),
    biasAdd: (y, C, bias) => ew.biasAdd(y, C, bias),
    biasGradAdd(gb, dy, C) {
      const sum = new Float64Array(C);
      ew.channelSum(dy, C, sum);
      for (let c = 0; c < C; c++) gb[c] += sum[c];
    },
    shortcutA(x, shape, outChannels, stride) {
      const { oShape, index } = shortcutGeometry(shape, stride);
      const [n, oD, oH, oW] = oShape;
      const C = shape[4];
      const y = zeros(n * oD * oH * oW * outChannels);
      let p = 0;
      for (let b = 0; b < n; b++) {
        for (let z = 0; z < oD; z++) {
          for (let yy = 0; yy < oH; yy++) {
            for (let xx = 0; xx < oW; xx++, p += outChannels) y.set(x.subarray(index(b, z, yy, xx), index(b, z, yy, xx) + C), p);
          }
        }
      }
      return y;
    },
    shortcutABackward(dy, inShape, outChannels, stride) {
      const { oShape, index } = shortcutGeometry(inShape, stride);
      const [n, oD, oH, oW] = oShape;
      const C = inShape[4];
      const dx = zeros(inShape.reduce((a, b) => a * b, 1));
      let q = 0;
      for (let b = 0; b < n; b++) {
        for (let z = 0; z < oD; z++) {
          for (let yy = 0; yy < oH; yy++) {
            for (let xx = 0; xx < oW; xx++, q += outChannels) dx.set(dy.subarray(q, q + C), index(b, z, yy, xx));
          }
        }
      }
      return dx;
    },

    segmentationLoss(z, target, C, weight) {
      const r = segmentationLossJs(z, target, C, weight);
      return { loss: Float32Array.of(r.loss), grad: r.grad };
    },
    adamStep: (w, g, m, v, stepSize, beta1, beta2, eps, sqrtC2, wd) => optim.adamStep(w, g, m, v, stepSize, beta1, beta2, eps, sqrtC2, wd),
    sgdStep: (w, g, buf, lr, momentum, wd, first) => optim.sgdStep(w, g, buf, lr, momentum, wd, first),
  };
}

/** Output grid of shortcut A and the flat offset of input voxel (b, z, y, x) it reads. */
function shortcutGeometry(shape: readonly number[], stride: number) {
  const [n, D, H, W, C] = shape;
  const o = (s: number) => Math.floor((s - 1) / stride) + 1;
  const oShape = [n, o(D), o(H), o(W)] as const;
  const index = (b: number, z: number, yy: number, xx: number) => (((b * D + z * stride) * H + yy * stride) * W + xx * stride) * C;
  return { oShape, index };
}
