/**
 * The memory-bound seam of the training engine, next to ConvKernels: ReLU, max-pool 3³ / stride 2 / padding 1 with
 * argmax, add — each optionally fused with the ReLU that follows it in the Med3D graph — and the U-Net head's
 * channel concatenation and per-channel bias. Tensors are NDHWC Float32Arrays; per-channel vectors have C
 * entries. Outputs come from an allocator (withAlloc: a step's buffer pool in training) whose memory holds
 * anything, so every kernel writes all of each output it returns. Implementations:
 *   - "js" (here): plain loops in as few passes as the op allows (the reference for the native one),
 *   - "native": the same loops in C++ in the oneDNN addon (native/src/elementwise.cc), OpenMP-parallel;
 *     a ConvKernels object carries it as `elementwise` (onednn-kernels.ts), so selecting the "onednn"
 *     convolutions brings both, and the JS convolutions bring the JS ops.
 * Layers with kernels of their own (the norm layers, shared/model/layers/) take the allocator from here and look
 * the addon's functions up by name with `native(name)`: the JS kernels have none, so those layers run their JS loops.
 *
 * Semantics are PyTorch's: max pooling takes the first maximum in (z, y, x) order and never the padding; NaN propagates.
 */
import { Buffer } from 'node:buffer';
import { DICE_SMOOTH, segmentationLossJs } from '../model/graph/segmentation-loss.ts';
import type { ConvKernels } from './conv-kernels.ts';

/** Allocates a Float32Array of n values whose contents are unspecified (the caller writes all of them). */
export type F32Alloc = (n: number) => Float32Array;

export interface MaxPoolResult {
  readonly y: Float32Array;
  /** For each output value, the flat index of the input value it took. */
  readonly argmax: Int32Array;
  /** Output [n, oD, oH, oW, C]. */
  readonly shape: readonly [number, number, number, number, number];
}

export interface ElementwiseKernels {
  readonly name: string;
  /** Where this object's outputs come from (a layer with its own kernels allocates its outputs here too). */
  readonly alloc: F32Alloc;
  /** The native addon's function `name`, when these kernels are native and the addon has it; else undefined. */
  native<F extends (...args: never[]) => unknown>(name: string): F | undefined;
  relu(x: Float32Array): Float32Array;
  /** dy where y > 0, else 0 (y: the ReLU's output). */
  reluBackward(y: Float32Array, dy: Float32Array): Float32Array;
  /** a + b, then max(·, 0) when `relu`. */
  add(a: Float32Array, b: Float32Array, relu: boolean): Float32Array;
  /** dst += src. */
  addInto(dst: Float32Array, src: Float32Array): void;
  /** MaxPool3d kernel 3, stride 2, padding 1 over x [n, D, H, W, C]. */
  maxPool(x: Float32Array, shape: readonly number[]): MaxPoolResult;
  /** dx of the pool's input shape [n, D, H, W, C]: dy[i] added at argmax[i] (in output order). */
  maxPoolBackward(dy: Float32Array, argmax: Int32Array, inShape: readonly number[]): Float32Array;
  /** Channel concatenation of a [·, Ca] and b [·, Cb] (same voxels) → [·, Ca + Cb], a's channels first. */
  concat(a: Float32Array, Ca: number, b: Float32Array, Cb: number): Float32Array;
  /** The inverse of concat: a's and b's parts of y [·, Ca + Cb], each only when wanted. */
  split(y: Float32Array, Ca: number, Cb: number, wantA: boolean, wantB: boolean): { a?: Float32Array; b?: Float32Array };
  /** y [·, C] += bias per channel, in place. */
  biasAdd(y: Float32Array, C: number, bias: Float32Array): void;
  /** sum[c] += Σ over voxels of x[·, c], accumulated in float64. */
  channelSum(x: Float32Array, C: number, sum: Float64Array): void;
  /** The same kernels with every returned Float32Array output allocated by `alloc` instead of fresh memory. */
  /**
   * The segmentation training loss of logits z [voxels, C] against soft targets (rows summing to 1), optional
   * per-voxel weights, and its gradient with respect to z (segmentation-loss.ts: the semantics and the JS twin).
   */
  segmentationLoss(z: Float32Array, target: Float32Array, C: number, weight?: Float32Array): { loss: number; grad: Float32Array };
  withAlloc(alloc: F32Alloc): ElementwiseKernels;
}

/** The elementwise kernels that come with a ConvKernels object: its own (native) ones, else JS. */
export function elementwiseOf(kernels: ConvKernels): ElementwiseKernels {
  return (kernels as ConvKernels & { elementwise?: ElementwiseKernels }).elementwise ?? jsElementwiseKernels;
}

export const poolOut = (s: number): number => Math.floor((s - 1) / 2) + 1;

function checkC(x: Float32Array, C: number, what: string): void {
  if (!(C >= 1) || x.length % C !== 0) throw new Error(`${what}: ${x.length} values are not a whole number of ${C}-channel voxels`);
}

function jsKernels(alloc: F32Alloc): ElementwiseKernels {
  const kernels: ElementwiseKernels = {
    name: 'js',
    alloc,
    native: () => undefined,

    relu(x) {
      const y = alloc(x.length);
      for (let i = 0; i < x.length; i++) {
        const v = x[i];
        y[i] = v < 0 ? 0 : v;
      }
      return y;
    },

    reluBackward(y, dy) {
      const dx = alloc(y.length);
      for (let i = 0; i < y.length; i++) dx[i] = y[i] > 0 ? dy[i] : 0;
      return dx;
    },

    add(a, b, relu) {
      if (a.length !== b.length) throw new Error(`add: ${a.length} and ${b.length} values`);
      const y = alloc(a.length);
      if (relu) {
        for (let i = 0; i < y.length; i++) {
          const v = a[i] + b[i];
          y[i] = v < 0 ? 0 : v;
        }
      } else for (let i = 0; i < y.length; i++) y[i] = a[i] + b[i];
      return y;
    },

    addInto(dst, src) {
      for (let i = 0; i < dst.length; i++) dst[i] += src[i];
    },

    maxPool(x, shape) {
      const [n, D, H, W, C] = shape;
      if (n * D * H * W * C !== x.length) throw new Error(`maxPool: shape [${shape.join(',')}] does not hold ${x.length} values`);
      const [oD, oH, oW] = [poolOut(D), poolOut(H), poolOut(W)];
      // Separable: max over x, then y, then z, each keeping the first maximum (strictly greater replaces),
      // which picks the same voxel as one scan in (z, y, x) order: the lexicographically first maximum.
      const rowsW = n * D * H;
      const mW = new Float32Array(rowsW * oW * C);
      const aW = new Int32Array(mW.length);
      for (let r = 0; r < rowsW; r++) {
        const inRow = r * W * C;
        for (let ox = 0; ox < oW; ox++) {
          const x0 = Math.max(0, 2 * ox - 1);
          const x1 = Math.min(W, 2 * ox + 2);
          const o = (r * oW + ox) * C;
          for (let c = 0; c < C; c++) {
            let best = x0 * C + inRow + c;
            let m = x[best];
            for (let xx = x0 + 1; xx < x1; xx++) {
              const j = inRow + xx * C + c;
              const v = x[j];
              // biome-ignore lint/suspicious/noSelfCompare: x !== x is the call-free NaN test; max pooling propagates NaN as PyTorch does.
              if (v > m || (v !== v && m === m)) {
                m = v;
                best = j;
              }
            }
            mW[o + c] = m;
            aW[o + c] = best;
          }
        }
      }
      const reduce = (src: Float32Array, srcArg: Int32Array, outer: number, len: number, outLen: number, inner: number) => {
        // src [outer, len, inner] → [outer, outLen, inner], window 3 / stride 2 / padding 1 along len.
        const m = new Float32Array(outer * outLen * inner);
        const a = new Int32Array(m.length);
        for (let q = 0; q < outer; q++) {
          for (let o = 0; o < outLen; o++) {
            const s0 = Math.max(0, 2 * o - 1);
            const s1 = Math.min(len, 2 * o + 2);
            const dst = (q * outLen + o) * inner;
            const first = (q * len + s0) * inner;
            m.set(src.subarray(first, first + inner), dst);
            a.set(srcArg.subarray(first, first + inner), dst);
            for (let s = s0 + 1; s < s1; s++) {
              const base = (q * len + s) * inner;
              for (let e = 0; e < inner; e++) {
                const v = src[base + e];
                const cur = m[dst + e];
                // biome-ignore lint/suspicious/noSelfCompare: the call-free NaN test, as in the pooling loop above.
                if (v > cur || (v !== v && cur === cur)) {
                  m[dst + e] = v;
                  a[dst + e] = srcArg[base + e];
                }
              }
            }
          }
        }
        return { m, a };
      };
      const hPass = reduce(mW, aW, n * D, H, oH, oW * C);
      const dPass = reduce(hPass.m, hPass.a, n, D, oD, oH * oW * C);
      return { y: dPass.m, argmax: dPass.a, shape: [n, oD, oH, oW, C] };
    },

    maxPoolBackward(dy, argmax, inShape) {
      const dx = alloc(inShape.reduce((a, b) => a * b, 1)).fill(0);
      for (let i = 0; i < dy.length; i++) dx[argmax[i]] += dy[i];
      return dx;
    },

    concat(a, Ca, b, Cb) {
      const voxels = a.length / Ca;
      if (!Number.isInteger(voxels) || b.length !== voxels * Cb) throw new Error(`concat: ${a.length} values of ${Ca} channels and ${b.length} of ${Cb} are not the same voxels`);
      const y = alloc(voxels * (Ca + Cb));
      // Plain index loops: a subarray per voxel would allocate millions of views at full resolution.
      for (let v = 0, o = 0, ia = 0, ib = 0; v < voxels; v++) {
        for (let c = 0; c < Ca; c++) y[o++] = a[ia++];
        for (let c = 0; c < Cb; c++) y[o++] = b[ib++];
      }
      return y;
    },

    split(y, Ca, Cb, wantA, wantB) {
      const voxels = y.length / (Ca + Cb);
      if (!Number.isInteger(voxels)) throw new Error(`split: ${y.length} values are not a whole number of ${Ca + Cb}-channel voxels`);
      const out: { a?: Float32Array; b?: Float32Array } = {};
      if (wantA) {
        const a = (out.a = alloc(voxels * Ca));
        for (let v = 0, o = 0, i = 0; v < voxels; v++, o += Cb) for (let c = 0; c < Ca; c++) a[i++] = y[o++];
      }
      if (wantB) {
        const b = (out.b = alloc(voxels * Cb));
        for (let v = 0, o = Ca, i = 0; v < voxels; v++, o += Ca) for (let c = 0; c < Cb; c++) b[i++] = y[o++];
      }
      return out;
    },

    biasAdd(y, C, bias) {
      checkC(y, C, 'bias');
      for (let i = 0; i < y.length; i += C) for (let c = 0; c < C; c++) y[i + c] += bias[c];
    },

    channelSum(x, C, sum) {
      checkC(x, C, 'channel sum');
      // Channel by channel with a scalar accumulator: V8 keeps it in a register (an accumulator array would not).
      for (let c = 0; c < C; c++) {
        let s = 0;
        for (let i = c; i < x.length; i += C) s += x[i];
        sum[c] += s;
      }
    },

    segmentationLoss(z, target, C, weight) {
      checkLossInputs(z, target, C, weight);
      return segmentationLossJs(z, target, C, weight, alloc);
    },

    withAlloc: (a) => jsKernels(a),
  };
  return kernels;
}

export const jsElementwiseKernels: ElementwiseKernels = jsKernels(uninitF32);

function checkLossInputs(z: Float32Array, target: Float32Array, C: number, weight: Float32Array | undefined): void {
  if (!Number.isInteger(C) || C < 2) throw new Error(`segmentation loss: needs at least 2 classes, got ${C}`);
  if (z.length === 0 || z.length % C !== 0) throw new Error(`segmentation loss: ${z.length} logits are not a whole number of ${C}-class voxels`);
  if (target.length !== z.length) throw new Error(`segmentation loss: ${target.length} target values for ${z.length} logits`);
  if (weight && weight.length !== z.length / C) throw new Error(`segmentation loss: ${weight.length} voxel weights for ${z.length / C} voxels`);
}

/** The addon's elementwise functions (native/src/addon.cc, elementwise.cc); outputs are preallocated here. */
export interface ElementwiseAddon {
  relu(x: Float32Array, y: Float32Array): void;
  reluBackward(y: Float32Array, dy: Float32Array, dx: Float32Array): void;
  add(a: Float32Array, b: Float32Array, relu: boolean, y: Float32Array): void;
  addInto(dst: Float32Array, src: Float32Array): void;
  maxPool(x: Float32Array, n: number, D: number, H: number, W: number, C: number, y: Float32Array, argmax: Int32Array): void;
  maxPoolBackward(dy: Float32Array, argmax: Int32Array, n: number, D: number, H: number, W: number, C: number, dx: Float32Array): void;
}

/** The addon's concat and bias functions (an addon built before them lacks them: the JS ones run then). */
export interface ElementwiseAddonV2 {
  concat(a: Float32Array, Ca: number, b: Float32Array, Cb: number, y: Float32Array): void;
  split(y: Float32Array, Ca: number, Cb: number, a: Float32Array | null, b: Float32Array | null): void;
  biasAdd(y: Float32Array, C: number, bias: Float32Array): void;
  channelSum(x: Float32Array, C: number, sum: Float64Array): void;
}

/** True when the addon has the concat / bias functions. */
export function hasElementwiseV2(addon: object): addon is ElementwiseAddonV2 {
  const a = addon as Partial<ElementwiseAddonV2>;
  return typeof a.concat === 'function' &&
    typeof a.split === 'function' && typeof a.biasAdd === 'function' && typeof a.channelSum === 'function';
}

/** The addon's segmentation loss (an addon built before it lacks it: the JS loss runs then). */
export interface LossAddon {
  segmentationLoss(z: Float32Array, target: Float32Array, weight: Float32Array | null, C: number, smooth: number, grad: Float32Array): number;
}

export function hasLossKernel(addon: object): addon is LossAddon {
  return typeof (addon as Partial<LossAddon>).segmentationLoss === 'function';
}

/**
 * A Float32Array whose memory is NOT zeroed, for outputs a kernel writes completely: zeroing a fresh
 * 16 MiB array costs about as much as the kernel that then overwrites it (1–2 ms here).
 */
export function uninitF32(n: number): Float32Array {
  const b = Buffer.allocUnsafeSlow(n * 4);
  return new Float32Array(b.buffer, b.byteOffset, n);
}

/** True when a loaded addon has the elementwise functions (an addon built before them has not). */
export function hasElementwise(addon: object): addon is ElementwiseAddon {
  return typeof (addon as Partial<ElementwiseAddon>).relu === 'function' && typeof (addon as Partial<ElementwiseAddon>).maxPoolBackward === 'function';
}

/**
 * "native" ElementwiseKernels over the addon: same results as the JS ones up to float rounding order. With an
 * addon built before the concat / bias functions, those run in JS.
 */
export function nativeElementwiseKernels(addon: ElementwiseAddon, alloc: F32Alloc = uninitF32): ElementwiseKernels {
  const js = jsKernels(alloc);
  const v2 = hasElementwiseV2(addon) ? addon : undefined;
  const lossAddon = hasLossKernel(addon) ? addon : undefined;
  return {
    name: 'native',
    alloc,
    native<F extends (...args: never[]) => unknown>(name: string): F | undefined {
      const f = (addon as unknown as Record<string, unknown>)[name];
      return typeof f === 'function' ? (f as F) : undefined;
    },
    relu(x) {
      const y = alloc(x.length);
      addon.relu(x, y);
      return y;
    },
    reluBackward(y, dy) {
      const dx = alloc(y.length);
      addon.reluBackward(y, dy, dx);
      return dx;
    },
    add(a, b, relu) {
      if (a.length !== b.length) throw new Error(`add: ${a.length} and ${b.length} values`);
      const y = alloc(a.length);
      addon.add(a, b, relu, y);
      return y;
    },
    addInto(dst, src) {
      addon.addInto(dst, src);
    },
    maxPool(x, shape) {
      const [n, D, H, W, C] = shape;
      if (n * D * H * W * C !== x.length) throw new Error(`maxPool: shape [${shape.join(',')}] does not hold ${x.length} values`);
      const out: [number, number, number, number, number] = [n, poolOut(D), poolOut(H), poolOut(W), C];
      const len = out.reduce((a, b) => a * b, 1);
      const y = alloc(len);
      const argmax = new Int32Array(len);
      addon.maxPool(x, n, D, H, W, C, y, argmax);
      return { y, argmax, shape: out };
    },
    maxPoolBackward(dy, argmax, inShape) {
      const [n, D, H, W, C] = inShape;
      const dx = alloc(n * D * H * W * C);
      addon.maxPoolBackward(dy, argmax, n, D, H, W, C, dx);
      return dx;
    },
    concat(a, Ca, b, Cb) {
      if (!v2) return js.concat(a, Ca, b, Cb);
      const voxels = a.length / Ca;
      if (!Number.isInteger(voxels) || b.length !== voxels * Cb) throw new Error(`concat: ${a.length} values of ${Ca} channels and ${b.length} of ${Cb} are not the same voxels`);
      const y = alloc(voxels * (Ca + Cb));
      v2.concat(a, Ca, b, Cb, y);
      return y;
    },
    split(y, Ca, Cb, wantA, wantB) {
      if (!v2) return js.split(y, Ca, Cb, wantA, wantB);
      const voxels = y.length / (Ca + Cb);
      if (!Number.isInteger(voxels)) throw new Error(`split: ${y.length} values are not a whole number of ${Ca + Cb}-channel voxels`);
      const a = wantA ? alloc(voxels * Ca) : undefined;
      const b = wantB ? alloc(voxels * Cb) : undefined;
      if (a || b) v2.split(y, Ca, Cb, a ?? null, b ?? null);
      return { a, b };
    },
    biasAdd(y, C, bias) {
      if (!v2) return js.biasAdd(y, C, bias);
      checkC(y, C, 'bias');
      v2.biasAdd(y, C, bias);
    },
    channelSum(x, C, sum) {
      if (!v2) return js.channelSum(x, C, sum);
      checkC(x, C, 'channel sum');
      v2.channelSum(x, C, sum);
    },
    segmentationLoss(z, target, C, weight) {
      if (!lossAddon) return js.segmentationLoss(z, target, C, weight);
      checkLossInputs(z, target, C, weight);
      const grad = alloc(z.length);
      const loss = lossAddon.segmentationLoss(z, target, weight ?? null, C, DICE_SMOOTH, grad);
      return { loss, grad };
    },
    withAlloc: (a) => nativeElementwiseKernels(addon, a),
  };
}
