/**
 * The "cuda" ComputeDevice: cuDNN convolutions and CUDA kernels (native/cuda/, built at install by
 * scripts/build-cuda.mjs only where nvcc and cuDNN are found). Device memory is addressed by BigInt; this module
 * keeps the step-scoped pool (free lists by size, as BufferPool on the host), so after the first step a step
 * allocates nothing. loadCudaDevice() never throws: it returns the device or why there is none (not built and
 * the build's own reason, no GPU, no driver).
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DICE_SMOOTH } from '../model/tfjs-trainer.ts';
import { inputLength, outputLength, type Conv3dGeom } from './conv-kernels.ts';
import type { ComputeDevice } from './device.ts';
import { poolOut } from './elementwise-kernels.ts';

export interface CudaBuffer {
  readonly ptr: bigint;
  /** float32 values. */
  readonly n: number;
}

export type CudaSaved =
  | { readonly kind: 'bn'; readonly mean: CudaBuffer; readonly invStd: CudaBuffer }
  | { readonly kind: 'gn'; readonly stats: CudaBuffer }
  | { readonly kind: 'pool'; readonly argmax: CudaBuffer };

export type CudaDevice = ComputeDevice<CudaBuffer, CudaSaved> & { readonly info: CudaInfo; synchronize(): void };

export interface CudaInfo {
  readonly device: string;
  readonly computeCapability: string;
  readonly memoryBytes: number;
  readonly cudnn: string;
  readonly cudaRuntime: number;
  readonly cudaDriver: number;
}

type P = bigint;
interface CudaAddon {
  info(): CudaInfo;
  setTf32(on: boolean): void;
  malloc(bytes: number): P;
  free(p: P): void;
  upload(p: P, src: Float32Array): void;
  download(p: P, dst: Float32Array): void;
  synchronize(): void;
  fill(p: P, n: number, v: number): void;
  copy(dst: P, src: P, n: number): void;
  conv(op: 0 | 1 | 2, geom: Int32Array, a: P, b: P, out: P): void;
  bnTrain(x: P, nv: number, C: number, g: P, b: P, rm: P, rv: P, momentum: number, eps: number, relu: boolean, y: P, mean: P, invStd: P): void;
  bnEval(x: P, nv: number, C: number, g: P, b: P, rm: P, rv: P, eps: number, relu: boolean, y: P, mean: P, invStd: P): void;
  bnBackward(x: P, dy: P, nv: number, C: number, mean: P, invStd: P, g: P, y: P, batchStats: boolean, dx: P, gg: P, gb: P): void;
  gnForward(x: P, n: number, V: number, C: number, G: number, g: P, b: P, eps: number, relu: boolean, y: P, stats: P): void;
  gnBackward(x: P, dy: P, n: number, V: number, C: number, G: number, stats: P, g: P, reluOut: P, dx: P, gg: P, gb: P): void;
  relu(x: P, y: P, n: number): void;
  reluBackward(y: P, dy: P, dx: P, n: number): void;
  add(a: P, b: P, y: P, n: number, relu: boolean): void;
  addInto(dst: P, src: P, n: number): void;
  maxPool(x: P, n: number, D: number, H: number, W: number, C: number, y: P, argmax: P): void;
  maxPoolBackward(dy: P, argmax: P, n: number, D: number, H: number, W: number, C: number, dx: P): void;
  concat(a: P, Ca: number, b: P, Cb: number, y: P, voxels: number): void;
  split(y: P, Ca: number, Cb: number, a: P, b: P, voxels: number): void;
  biasAdd(y: P, voxels: number, C: number, bias: P): void;
  biasGradAdd(gb: P, dy: P, voxels: number, C: number): void;
  shortcutA(x: P, n: number, D: number, H: number, W: number, C: number, outC: number, stride: number, y: P): void;
  shortcutABackward(dy: P, n: number, D: number, H: number, W: number, C: number, outC: number, stride: number, dx: P): void;
  segLoss(z: P, t: P, w: P, voxels: number, K: number, smooth: number, loss: P, grad: P): void;
  adam(w: P, g: P, m: P, v: P, n: number, stepSize: number, b1: number, b2: number, eps: number, sqrtC2: number, wd: number): void;
  sgd(w: P, g: P, buf: P, n: number, lr: number, momentum: number, wd: number, first: boolean): void;
}

const BUILD_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'native', 'build', 'Release');
export const CUDA_ADDON_PATH = join(BUILD_DIR, 'medfl_cuda.node');
/** Where the build leaves its one line when it did not build the addon (scripts/build-cuda.mjs). */
export const CUDA_BUILD_NOTE = join(BUILD_DIR, 'medfl_cuda.reason');

export interface CudaDeviceOptions {
  /** TF32 tensor cores in cuDNN convolutions (PyTorch's default, torch.backends.cudnn.allow_tf32); off: full fp32. */
  readonly tf32?: boolean;
  /** The addon file (default: the build's output). */
  readonly addonPath?: string;
}

/** The device, or why there is none; never throws. */
export function loadCudaDevice(opts: CudaDeviceOptions = {}): { device: CudaDevice } | { reason: string } {
  const path = opts.addonPath ?? CUDA_ADDON_PATH;
  if (!existsSync(path)) {
    const note = existsSync(CUDA_BUILD_NOTE) ? readFileSync(CUDA_BUILD_NOTE, 'utf8').trim() : '';
    const why = /\((.*)\)/.exec(note)?.[1] ?? 'the install did not build it';
    return { reason: `not built (${why}); build with npm run build:native where nvcc and cuDNN are installed` };
  }
  let addon: CudaAddon;
  try {
    addon = createRequire(import.meta.url)(path) as CudaAddon;
  } catch (e) {
    return { reason: `built, but it does not load: ${(e as Error).message.split('\n')[0]}` };
  }
  let info: CudaInfo;
  try {
    info = addon.info();
  } catch (e) {
    return { reason: `built, but no usable GPU: ${(e as Error).message.replace(/^cuda: /, '')}` };
  }
  addon.setTf32(opts.tf32 ?? false);
  return { device: createCudaDevice(addon, info) };
}

const NULL = 0n;

function geomArray(g: Conv3dGeom): Int32Array {
  return Int32Array.from([g.n, ...g.in, g.cin, g.cout, ...g.k, ...g.stride, ...g.dilation, ...g.padBefore, ...g.out]);
}

function createCudaDevice(addon: CudaAddon, info: CudaInfo): CudaDevice {
  const free = new Map<number, bigint[]>();
  let inUse: CudaBuffer[] = [];
  const persistent = new Set<bigint>();
  const fresh = (n: number): CudaBuffer => ({ ptr: addon.malloc(4 * Math.max(n, 1)), n });
  const alloc = (n: number, keep?: boolean): CudaBuffer => {
    if (!keep) return take(n);
    const b = fresh(n);
    persistent.add(b.ptr);
    return b;
  };
  const take = (n: number): CudaBuffer => {
    const ptr = free.get(n)?.pop();
    const b = ptr === undefined ? fresh(n) : { ptr, n };
    inUse.push(b);
    return b;
  };
  const opt = (b: CudaBuffer | undefined) => (b === undefined ? NULL : b.ptr);
  const size = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
  const saved = <K extends CudaSaved['kind']>(s: CudaSaved, kind: K): Extract<CudaSaved, { kind: K }> => {
    if (s.kind !== kind) throw new Error(`cuda device: expected saved ${kind} state, got ${s.kind}`);
    return s as Extract<CudaSaved, { kind: K }>;
  };

  return {
    name: `cuda (${info.device}, cuDNN ${info.cudnn})`,
    info,
    synchronize: () => addon.synchronize(),
    alloc,
    upload(src, keep) {
      const b = alloc(src.length, keep);
      addon.upload(b.ptr, src);
      return b;
    },
    download(b, dst) {
      const out = dst ?? new Float32Array(b.n);
      if (out.length !== b.n) throw new Error(`cuda download: ${b.n} values into an array of ${out.length}`);
      addon.download(b.ptr, out);
      return out;
    },
    length: (b) => b.n,
    view(b, offset, length) {
      if (offset < 0 || length < 0 || offset + length > b.n) throw new Error(`cuda view [${offset}, ${offset + length}) outside a buffer of ${b.n}`);
      return { ptr: b.ptr + BigInt(4 * offset), n: length };
    },
    fill: (b, v) => addon.fill(b.ptr, b.n, v),
    copy(b) {
      const c = take(b.n);
      addon.copy(c.ptr, b.ptr, b.n);
      return c;
    },
    free(b) {
      if (!persistent.delete(b.ptr)) throw new Error('cuda free: not a persistent buffer of this device');
      addon.free(b.ptr);
    },
    recycle() {
      for (const b of inUse) {
        const list = free.get(b.n);
        if (list) list.push(b.ptr);
        else free.set(b.n, [b.ptr]);
      }
      inUse = [];
    },

    conv3d(x, w, g) {
      const y = take(outputLength(g));
      addon.conv(0, geomArray(g), x.ptr, w.ptr, y.ptr);
      return y;
    },
    conv3dBackwardData(dy, w, g) {
      const dx = take(inputLength(g));
      addon.conv(1, geomArray(g), dy.ptr, w.ptr, dx.ptr);
      return dx;
    },
    conv3dBackwardFilterAdd: (x, dy, g, gw) => addon.conv(2, geomArray(g), x.ptr, dy.ptr, gw.ptr),

    batchNormTrain(x, C, gamma, beta, rm, rv, momentum, eps, relu) {
      const y = take(x.n);
      const mean = take(C);
      const invStd = take(C);
      addon.bnTrain(x.ptr, x.n / C, C, gamma.ptr, beta.ptr, rm.ptr, rv.ptr, momentum, eps, relu, y.ptr, mean.ptr, invStd.ptr);
      return { y, saved: { kind: 'bn', mean, invStd } };
    },
    batchNormEval(x, C, gamma, beta, rm, rv, eps, relu) {
      const y = take(x.n);
      const mean = take(C);
      const invStd = take(C);
      addon.bnEval(x.ptr, x.n / C, C, gamma.ptr, beta.ptr, rm.ptr, rv.ptr, eps, relu, y.ptr, mean.ptr, invStd.ptr);
      return { y, saved: { kind: 'bn', mean, invStd } };
    },
    batchNormBackward(x, dy, C, s, gamma, y, batchStats, wantDx, gg, gb) {
      const { mean, invStd } = saved(s, 'bn');
      const dx = wantDx ? take(x.n) : undefined;
      addon.bnBackward(x.ptr, dy.ptr, x.n / C, C, mean.ptr, invStd.ptr, gamma.ptr, opt(y), batchStats, opt(dx), opt(gg), opt(gb));
      return dx;
    },
    groupNormForward(x, n, C, G, gamma, beta, eps, relu) {
      const y = take(x.n);
      // Per (sample, group) mean and 1/σ in double: 2·n·G doubles = 4·n·G floats.
      const stats = take(4 * n * G);
      addon.gnForward(x.ptr, n, x.n / (n * C), C, G, gamma.ptr, beta.ptr, eps, relu, y.ptr, stats.ptr);
      return { y, saved: { kind: 'gn', stats } };
    },
    groupNormBackward(x, dy, n, C, G, s, gamma, reluOut, wantDx, gg, gb) {
      const { stats } = saved(s, 'gn');
      const dx = wantDx ? take(x.n) : undefined;
      addon.gnBackward(x.ptr, dy.ptr, n, x.n / (n * C), C, G, stats.ptr, gamma.ptr, opt(reluOut), opt(dx), opt(gg), opt(gb));
      return dx;
    },

    relu(x) {
      const y = take(x.n);
      addon.relu(x.ptr, y.ptr, x.n);
      return y;
    },
    reluBackward(y, dy) {
      const dx = take(y.n);
      addon.reluBackward(y.ptr, dy.ptr, dx.ptr, y.n);
      return dx;
    },
    add(a, b, relu) {
      const y = take(a.n);
      addon.add(a.ptr, b.ptr, y.ptr, a.n, relu);
      return y;
    },
    addInto: (dst, src) => addon.addInto(dst.ptr, src.ptr, dst.n),
    maxPool(x, shape) {
      const [n, D, H, W, C] = shape;
      const out = [n, poolOut(D), poolOut(H), poolOut(W), C] as const;
      const y = take(size(out));
      const argmax = take(size(out));
      addon.maxPool(x.ptr, n, D, H, W, C, y.ptr, argmax.ptr);
      return { y, saved: { kind: 'pool', argmax }, shape: out };
    },
    maxPoolBackward(dy, s, inShape) {
      const [n, D, H, W, C] = inShape;
      const dx = take(size(inShape));
      addon.maxPoolBackward(dy.ptr, saved(s, 'pool').argmax.ptr, n, D, H, W, C, dx.ptr);
      return dx;
    },
    concat(a, Ca, b, Cb) {
      const voxels = a.n / Ca;
      const y = take(voxels * (Ca + Cb));
      addon.concat(a.ptr, Ca, b.ptr, Cb, y.ptr, voxels);
      return y;
    },
    split(y, Ca, Cb, wantA, wantB) {
      const voxels = y.n / (Ca + Cb);
      const a = wantA ? take(voxels * Ca) : undefined;
      const b = wantB ? take(voxels * Cb) : undefined;
      addon.split(y.ptr, Ca, Cb, opt(a), opt(b), voxels);
      return { a, b };
    },
    biasAdd: (y, C, bias) => addon.biasAdd(y.ptr, y.n / C, C, bias.ptr),
    biasGradAdd: (gb, dy, C) => addon.biasGradAdd(gb.ptr, dy.ptr, dy.n / C, C),
    shortcutA(x, shape, outC, stride) {
      const [n, D, H, W, C] = shape;
      const o = (s: number) => Math.floor((s - 1) / stride) + 1;
      const y = take(n * o(D) * o(H) * o(W) * outC);
      addon.shortcutA(x.ptr, n, D, H, W, C, outC, stride, y.ptr);
      return y;
    },
    shortcutABackward(dy, inShape, outC, stride) {
      const [n, D, H, W, C] = inShape;
      const dx = take(size(inShape));
      addon.shortcutABackward(dy.ptr, n, D, H, W, C, outC, stride, dx.ptr);
      return dx;
    },

    segmentationLoss(z, target, C, weight) {
      const loss = take(1);
      const grad = take(z.n);
      addon.segLoss(z.ptr, target.ptr, opt(weight), z.n / C, C, DICE_SMOOTH, loss.ptr, grad.ptr);
      return { loss, grad };
    },
    adamStep: (w, g, m, v, stepSize, b1, b2, eps, sqrtC2, wd) => addon.adam(w.ptr, g.ptr, m.ptr, v.ptr, w.n, stepSize, b1, b2, eps, sqrtC2, wd),
    sgdStep: (w, g, buf, lr, momentum, wd, first) => addon.sgd(w.ptr, g.ptr, buf.ptr, w.n, lr, momentum, wd, first !== 0),
  };
}
