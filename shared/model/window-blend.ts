/**
 * Blending of sliding windows into the volume (sliding-window.ts): each window's probabilities, weighted per voxel
 * (Gaussian or uniform), are added into running sums over the volume, and the sums are normalised at the end.
 * Two kernels do it:
 *   - "js" (here): the probabilities on the window's grid first (window-probs.ts: upsampling, softmax), then added
 *     row by row; the reference, and what runs without the addon,
 *   - "native": the addon's windowBlend (native/src/window_blend.cc), which goes from the head's coarse logits to
 *     the sums in one pass per window (upsampling, logistic/softmax and weighting fused, vectorised, threaded),
 *     and windowNormalise. Same results up to float rounding (~1e-7 on the probabilities).
 * Two classes: only class 1 is summed (class 0 is its complement after normalising), half the work.
 */
import { elementwiseOf } from '../engine/elementwise-kernels.ts';
import type { ConvKernels } from '../engine/conv-kernels.ts';
import type { Shape3 } from './sliding-window.ts';
import { windowProbsFromLogits } from './window-probs.ts';

/** Logits of n windows on a grid `factor` times coarser than the window: [n, d/f, h/f, w/f, C]. */
export interface WindowLogits {
  readonly logits: Float32Array;
  readonly factor: number;
}

/** The running sums of one volume: acc [D·H·W] (two classes: class 1) or [D·H·W, C], wsum [D·H·W]. */
export interface BlendSums {
  readonly volume: Shape3;
  readonly window: Shape3;
  readonly numClasses: number;
  /** Per-voxel weight of a window [wd·wh·ww]. */
  readonly weight: Float32Array;
  readonly acc: Float32Array;
  readonly wsum: Float32Array;
}

export interface WindowBlendKernel {
  readonly name: 'js' | 'native';
  /** Adds the probabilities of windows starting at `starts` (cropped to the volume) from their logits. */
  addLogits(l: WindowLogits, starts: readonly Shape3[], sums: BlendSums): void;
  /** Probabilities [D·H·W, C]: the sums divided by the weight per voxel. */
  normalise(sums: BlendSums): Float32Array;
}

/** The running sums for a volume, zeroed. */
export function blendSums(volume: Shape3, window: Shape3, numClasses: number, weight: Float32Array): BlendSums {
  const voxels = volume[0] * volume[1] * volume[2];
  return { volume, window, numClasses, weight, acc: new Float32Array(voxels * (numClasses === 2 ? 1 : numClasses)), wsum: new Float32Array(voxels) };
}

/** Adds windows' probabilities [n, wd, wh, ww, C] (already on the window's grid) into the sums, row by row. */
export function addWindowProbs(probs: Float32Array, starts: readonly Shape3[], sums: BlendSums): void {
  const [D, H, W] = sums.volume;
  const [wd, wh, ww] = sums.window;
  const C = sums.numClasses;
  const nv = wd * wh * ww;
  const { weight, acc, wsum } = sums;
  if (probs.length !== starts.length * nv * C) throw new Error(`sliding window: the forward returned ${probs.length} values for ${starts.length} windows of ${nv} voxels × ${C} classes`);
  starts.forEach(([z0, y0, x0], b) => {
    const zLen = Math.min(wd, D - z0);
    const yLen = Math.min(wh, H - y0);
    const xLen = Math.min(ww, W - x0);
    for (let z = 0; z < zLen; z++) {
      for (let y = 0; y < yLen; y++) {
        // One row at a time: contiguous in the window, the weights and the volume alike.
        const wRow = (z * wh + y) * ww;
        const vRow = ((z0 + z) * H + y0 + y) * W + x0;
        const pRow = (b * nv + wRow) * C;
        for (let x = 0; x < xLen; x++) wsum[vRow + x] += weight[wRow + x];
        if (C === 2) {
          for (let x = 0; x < xLen; x++) acc[vRow + x] += weight[wRow + x] * probs[pRow + 2 * x + 1];
        } else {
          for (let x = 0; x < xLen; x++) {
            const g = weight[wRow + x];
            const a = (vRow + x) * C;
            const s = pRow + x * C;
            for (let c = 0; c < C; c++) acc[a + c] += g * probs[s + c];
          }
        }
      }
    }
  });
}

function checkLogits(l: WindowLogits, n: number, sums: BlendSums): void {
  const f = l.factor;
  if (!Number.isInteger(f) || f < 1 || sums.window.some((s) => s % f !== 0)) throw new Error(`window blend: upsampling factor ${f} does not divide the window [${sums.window.join(', ')}]`);
  const want = (n * sums.window[0] * sums.window[1] * sums.window[2] * sums.numClasses) / f ** 3;
  if (l.logits.length !== want) throw new Error(`window blend: ${l.logits.length} logits for ${n} windows, expected ${want}`);
}

/** The JS kernel; the window-sized probabilities come from `take` (an inference pass's buffer pool). */
export const jsWindowBlendOn = (take?: (n: number) => Float32Array): WindowBlendKernel => ({
  name: 'js',
  addLogits(l, starts, sums) {
    checkLogits(l, starts.length, sums);
    addWindowProbs(windowProbsFromLogits(l.logits, starts.length, sums.window, l.factor, sums.numClasses, take), starts, sums);
  },
  normalise({ acc, wsum, numClasses: C }) {
    if (C === 2) {
      const out = new Float32Array(wsum.length * 2);
      for (let v = 0; v < wsum.length; v++) {
        const p1 = acc[v] / wsum[v];
        out[2 * v] = 1 - p1;
        out[2 * v + 1] = p1;
      }
      return out;
    }
    // In place: the sums are not read again.
    for (let v = 0; v < wsum.length; v++) for (let c = 0; c < C; c++) acc[v * C + c] /= wsum[v];
    return acc;
  },
});

export const jsWindowBlend: WindowBlendKernel = jsWindowBlendOn();

type WindowBlendFn = (logits: Float32Array, geom: Int32Array, starts: Int32Array, weight: Float32Array, acc: Float32Array, wsum: Float32Array) => void;
type WindowNormaliseFn = (acc: Float32Array, wsum: Float32Array, C: number, out: Float32Array) => void;

/** The addon's kernel (it checks the geometry and the array sizes itself and throws a plain error). */
export function nativeWindowBlend(blend: WindowBlendFn, normalise: WindowNormaliseFn): WindowBlendKernel {
  return {
    name: 'native',
    addLogits(l, starts, sums) {
      checkLogits(l, starts.length, sums);
      const geom = Int32Array.of(starts.length, sums.numClasses, l.factor, ...sums.window, ...sums.volume);
      blend(l.logits, geom, Int32Array.from(starts.flat()), sums.weight, sums.acc, sums.wsum);
    },
    normalise({ acc, wsum, numClasses }) {
      const out = new Float32Array(wsum.length * numClasses);
      normalise(acc, wsum, numClasses, out);
      return out;
    },
  };
}

/** The native kernel when these convolution kernels carry an addon that has it (an older build has not), else JS. */
export function windowBlendOf(kernels: ConvKernels, take?: (n: number) => Float32Array): WindowBlendKernel {
  const ew = elementwiseOf(kernels);
  const blend = ew.native<WindowBlendFn>('windowBlend');
  const normalise = ew.native<WindowNormaliseFn>('windowNormalise');
  return blend && normalise ? nativeWindowBlend(blend, normalise) : jsWindowBlendOn(take);
}
