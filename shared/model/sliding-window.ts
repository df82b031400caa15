/**
 * Whole-volume inference by sliding windows (nnU-Net's scheme): windows of a fixed size tile the volume with
 * overlap, run in batches, and their softmax probabilities are blended with a Gaussian (σ = window/8 per axis,
 * nnU-Net's rule: the centre of a window, which saw the most context, counts most) or uniform weight per voxel,
 * optionally averaged over the 8 axis flips (test-time augmentation). The window's network is a parameter
 * (`WindowForward`), so the blending is the same whatever runs the windows.
 *
 * The plan's `model.inference` section (InferenceSettingsSchema) asks for it; `whole` (one pass over the padded
 * volume) stays the default, and window mode is chosen automatically only when a whole-volume pass would not fit
 * WHOLE_VOLUME_MAX_BYTES (chooseInference).
 */
import { z } from 'zod';
import { addWindowProbs, blendSums, jsWindowBlend, type WindowBlendKernel, type WindowLogits } from './window-blend.ts';

const positiveInt = z.number().int().positive();

export const InferenceSettingsSchema = z
  .object({
    /** whole: the padded volume through the network at once (the default); window: sliding windows. */
    mode: z.enum(['whole', 'window']).default('whole'),
    /** Window [D, H, W] in voxels, rounded up to a multiple of 8 and capped by the volume; absent = the plan's patch × 2. */
    window: z.tuple([positiveInt, positiveInt, positiveInt]).optional(),
    /** Fraction of a window shared with its neighbour along each axis (nnU-Net: 0.5). */
    overlap: z.number().min(0).max(0.9).default(0.5),
    /** Weight of a window's probabilities per voxel: gaussian (σ = window/8) or uniform. */
    blend: z.enum(['gaussian', 'uniform']).default('gaussian'),
    /** Mean of the probabilities over the 8 axis-flip combinations (8× the forward passes). */
    flipTTA: z.boolean().default(false),
    /** Windows per forward pass. */
    batch: positiveInt.max(64).default(2),
  })
  .strict();

export type InferenceSettings = z.infer<typeof InferenceSettingsSchema>;

export const DEFAULT_INFERENCE: InferenceSettings = InferenceSettingsSchema.parse({});

/** Settings that score exactly as a site without them would: whole volume, no flips (absent counts as such). */
export function isDefaultInference(s: InferenceSettings | undefined): boolean {
  return s === undefined || (s.mode === 'whole' && !s.flipTTA);
}

/**
 * Bound on the estimated live float32 activations of one whole-volume pass (wholeVolumeBytes). 4 GiB: Node 20
 * cannot hold a single typed array over 4 GiB (buffer.constants.MAX_LENGTH), and a site machine (16 GiB is
 * common) must keep the data cache (data.cacheMiB, 1 GiB by default) and the rest of the agent beside the pass.
 * Above it, whole mode falls back to windows, whose memory is fixed by the window, not the scan.
 */
export const WHOLE_VOLUME_MAX_BYTES = 4 * 1024 ** 3;

export type Shape3 = readonly [number, number, number];

const ceil8 = (v: number) => Math.ceil(v / 8) * 8;

/** The window for a volume: `requested` (or patch × 2), capped by the volume, rounded up to the network's stride 8. */
export function windowSize(requested: Shape3 | undefined, patch: Shape3, shape: Shape3): [number, number, number] {
  const want = requested ?? [patch[0] * 2, patch[1] * 2, patch[2] * 2];
  return [0, 1, 2].map((a) => ceil8(Math.min(want[a], shape[a]))) as [number, number, number];
}

/**
 * Window starts along one axis of `extent` voxels (nnU-Net's rule): as few windows as keep neighbours at most
 * window·(1 − overlap) apart, spread evenly so the first starts at 0 and the last ends at the extent.
 */
export function windowStarts(extent: number, window: number, overlap: number): number[] {
  if (extent <= window) return [0];
  const step = Math.max(1, window * (1 - overlap));
  const n = Math.ceil((extent - window) / step) + 1;
  return Array.from({ length: n }, (_, i) => Math.round((i * (extent - window)) / (n - 1)));
}

/** Per-voxel weight of a window [wd·wh·ww]: a separable Gaussian with σ = side/8, peak 1, or all ones. */
export function blendWeights(window: Shape3, blend: 'gaussian' | 'uniform'): Float32Array {
  const [wd, wh, ww] = window;
  const out = new Float32Array(wd * wh * ww);
  if (blend === 'uniform') return out.fill(1);
  const axis = (n: number) => {
    const sigma = n / 8;
    const c = (n - 1) / 2; // symmetric, so a flipped window weighs the same voxels alike
    return Float64Array.from({ length: n }, (_, i) => Math.exp(-((i - c) ** 2) / (2 * sigma * sigma)));
  };
  const [gd, gh, gw] = [axis(wd), axis(wh), axis(ww)];
  // Peak 1 (σ = n/8 keeps the corner at e^-24 ≈ 4e-11: small but a normal float, so every voxel has a weight).
  const peak = Math.max(...gd) * Math.max(...gh) * Math.max(...gw);
  for (let z = 0; z < wd; z++) for (let y = 0; y < wh; y++) for (let x = 0; x < ww; x++) out[(z * wh + y) * ww + x] = (gd[z] * gh[y] * gw[x]) / peak;
  return out;
}

/** Mirrors a [D, H, W, C] volume along the marked axes (its own inverse). */
export function flipVolume(x: Float32Array, shape: Shape3, flip: readonly [boolean, boolean, boolean], C: number): Float32Array {
  if (!flip.some(Boolean)) return x;
  const [D, H, W] = shape;
  const out = new Float32Array(x.length);
  for (let z = 0; z < D; z++) {
    const sz = flip[0] ? D - 1 - z : z;
    for (let y = 0; y < H; y++) {
      const sy = flip[1] ? H - 1 - y : y;
      for (let xx = 0; xx < W; xx++) {
        const sx = flip[2] ? W - 1 - xx : xx;
        const d = ((z * H + y) * W + xx) * C;
        const s = ((sz * H + sy) * W + sx) * C;
        for (let c = 0; c < C; c++) out[d + c] = x[s + c];
      }
    }
  }
  return out;
}

/** Softmax probabilities [n, d, h, w, classes] of `n` inputs [n, d, h, w, channels] (sides multiples of 8). */
export type WindowForward = (input: Float32Array, n: number, window: Shape3) => Float32Array;

/** `forward` averaged over the 8 axis flips of each input (flipped in, flipped back out). */
export function flipAveraged(forward: WindowForward, numClasses: number, channels = 1): WindowForward {
  return (input, n, window) => {
    const nv = window[0] * window[1] * window[2];
    const ni = nv * channels;
    const sum = new Float32Array(n * nv * numClasses);
    for (let f = 0; f < 8; f++) {
      const flip: [boolean, boolean, boolean] = [(f & 4) !== 0, (f & 2) !== 0, (f & 1) !== 0];
      const flipped = new Float32Array(input.length);
      for (let b = 0; b < n; b++) flipped.set(flipVolume(input.subarray(b * ni, (b + 1) * ni), window, flip, channels), b * ni);
      const p = forward(flipped, n, window);
      for (let b = 0; b < n; b++) {
        const back = flipVolume(p.subarray(b * nv * numClasses, (b + 1) * nv * numClasses), window, flip, numClasses);
        const o = b * nv * numClasses;
        for (let i = 0; i < back.length; i++) sum[o + i] += back[i] / 8;
      }
    }
    return sum;
  };
}

/** Logits of windows (on the head's grid) and the kernel that blends them into the volume: no window-sized probabilities. */
export interface WindowLogitsNetwork {
  readonly logits: (input: Float32Array, n: number, window: Shape3) => WindowLogits;
  readonly blend: WindowBlendKernel;
}

export interface WindowOptions {
  /** Sides multiples of 8 (windowSize). */
  readonly window: Shape3;
  readonly overlap: number;
  readonly blend: 'gaussian' | 'uniform';
  readonly batch: number;
  readonly numClasses: number;
  /** Input channels of the image (channels last); absent = 1. */
  readonly channels?: number;
}

/**
 * Blended probabilities [D·H·W, C] of a volume from overlapping windows, from a network that gives probabilities
 * (blended in JS) or one that gives logits with its blending kernel (window-blend.ts). Sides shorter than the window are
 * zero-padded up to it (as the whole-volume pass pads to a multiple of 8), so one window covering a volume
 * gives exactly that pass's probabilities.
 */
export async function slidingWindowProbs(image: Float32Array, shape: Shape3, o: WindowOptions, network: WindowForward | WindowLogitsNetwork): Promise<Float32Array> {
  const [D, H, W] = shape;
  const [wd, wh, ww] = o.window;
  const C = o.numClasses;
  const ch = o.channels ?? 1;
  if (o.window.some((s) => s % 8 !== 0 || s < 8)) throw new Error(`sliding window: sides must be positive multiples of 8, got [${o.window.join(', ')}]`);
  if (image.length !== D * H * W * ch) throw new Error(`sliding window: image has ${image.length} values, shape [${shape.join(', ')}] × ${ch} channel(s) needs ${D * H * W * ch}`);
  const [Ed, Eh, Ew] = [Math.max(D, wd), Math.max(H, wh), Math.max(W, ww)];
  const starts: Shape3[] = [];
  for (const z of windowStarts(Ed, wd, o.overlap)) for (const y of windowStarts(Eh, wh, o.overlap)) for (const x of windowStarts(Ew, ww, o.overlap)) starts.push([z, y, x]);
  const sums = blendSums(shape, o.window, C, blendWeights(o.window, o.blend));
  const nv = wd * wh * ww;
  // One input buffer for every batch of windows. Its padding stays zero: every window is cut off at the same
  // voxels (a side shorter than the window has the one start 0, a longer side never crosses the volume's edge),
  // so each batch writes exactly where the previous one did.
  const inputs = new Float32Array(Math.min(o.batch, starts.length) * nv * ch);
  for (let first = 0; first < starts.length; first += o.batch) {
    const group = starts.slice(first, first + o.batch);
    const input = inputs.subarray(0, group.length * nv * ch);
    group.forEach(([z0, y0, x0], b) => {
      for (let z = 0; z < wd && z0 + z < D; z++) {
        for (let y = 0; y < wh && y0 + y < H; y++) {
          const src = ((z0 + z) * H + y0 + y) * W + x0;
          const len = Math.min(ww, W - x0);
          input.set(image.subarray(src * ch, (src + len) * ch), (b * nv + (z * wh + y) * ww) * ch);
        }
      }
    });
    // Between passes the event loop runs (a site keeps heartbeating through a long scoring).
    if (first > 0) await new Promise<void>((resolve) => setImmediate(resolve));
    if (typeof network === 'function') addWindowProbs(network(input, group.length, o.window), group, sums);
    else network.blend.addLogits(network.logits(input, group.length, o.window), group, sums);
  }
  return (typeof network === 'function' ? jsWindowBlend : network.blend).normalise(sums);
}

/** How one volume is scored: the whole padded volume at once, or windows (with the settings that apply). */
export type InferencePlan = { readonly kind: 'whole'; readonly flipTTA: boolean } | { readonly kind: 'window'; readonly options: Omit<WindowOptions, 'numClasses'>; readonly flipTTA: boolean; readonly auto: boolean };

/**
 * The plan for a volume of `shape`: whole unless the settings ask for windows or the whole pass would need more
 * than `maxBytes` (estimated by `wholeBytes` for the volume padded to a multiple of 8).
 */
export function chooseInference(
  settings: InferenceSettings | undefined,
  patch: Shape3,
  shape: Shape3,
  wholeBytes: (padded: Shape3) => number,
  maxBytes = WHOLE_VOLUME_MAX_BYTES,
): InferencePlan {
  const s = settings ?? DEFAULT_INFERENCE;
  const windowed = (auto: boolean): InferencePlan => ({
    kind: 'window',
    options: { window: windowSize(s.window, patch, shape), overlap: s.overlap, blend: s.blend, batch: s.batch },
    flipTTA: s.flipTTA,
    auto,
  });
  if (s.mode === 'window') return windowed(false);
  const padded = shape.map(ceil8) as [number, number, number];
  return wholeBytes(padded) > maxBytes ? windowed(true) : { kind: 'whole', flipTTA: s.flipTTA };
}
