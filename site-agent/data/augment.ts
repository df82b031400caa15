/**
 * Patch augmentation for training (pure: the input patch is never modified; all randomness from the `rng`
 * passed in, so a seed fixes the result). Defaults follow nnU-Net (Isensee et al. 2021; docs/data.md) for the transforms done here:
 *   mirroring     each axis flipped with probability 0.5; the label is flipped with the image, voxel for voxel.
 *                 With `leftRightPairs` a flip of the left–right axis (W in canonical RAS+) also swaps those
 *                 label values (laterality: left kidney ↔ right kidney).
 *   brightness    multiply each channel by U(0.75, 1.25), probability 0.15 per channel.
 *   shift         add U(−0.1, 0.1) to each channel, probability 0 by default (off).
 *   noise         add N(0, σ²) with σ² ~ U(0, 0.1), probability 0.1 per patch.
 *   gamma         per channel, probability 0.3: rescale the patch to [0, 1], raise to γ, restore its range
 *                 (min and max stay put). As nnU-Net draws it: half the time γ ~ U(0.7, 1), else U(1, 1.5).
 * Rotation, zoom and elastic deformation need the whole case (a cropped patch would pull its zero borders in), so
 * the patch sampler does them while cutting (sampler.ts samplePatch with `spatial`, spatial-augment.ts); the
 * options live here so one object configures both. Random cropping around foreground is the sampler's job too.
 * Scanner differences (bias field, blur, coarser grid, contrast) are scanner-augment.ts's, drawn after these and
 * applied right after mirroring; they are off unless their probabilities are set.
 */
import { gaussian, uniform, type Rng } from './prng.ts';
import { applyScannerAugmentation, DEFAULT_SCANNER_AUGMENT, drawScannerAugmentation, type ScannerAugmentOptions, type ScannerAugmentParams } from './scanner-augment.ts';
import { DEFAULT_SPATIAL, type SpatialAugmentOptions } from './spatial-augment.ts';
import type { Patch } from './types.ts';

export interface AugmentOptions extends SpatialAugmentOptions, ScannerAugmentOptions {
  /** Probability of flipping each axis [D, H, W]; a number applies to all three. */
  readonly flipProbability?: number | readonly [number, number, number];
  /** Label pairs swapped when the W (left–right) axis is flipped. */
  readonly leftRightPairs?: readonly (readonly [number, number])[];
  readonly scaleProbability?: number;
  readonly scaleRange?: readonly [number, number];
  readonly shiftProbability?: number;
  readonly shiftRange?: readonly [number, number];
  readonly noiseProbability?: number;
  /** Range of the noise variance σ² (in normalised intensity units). */
  readonly noiseVariance?: readonly [number, number];
  /** Probability of a gamma transform per channel. */
  readonly gammaProbability?: number;
  /** Range of γ; values below 1 brighten mid-tones, above 1 darken them. */
  readonly gammaRange?: readonly [number, number];
}

export const DEFAULT_AUGMENT: Required<AugmentOptions> = {
  ...DEFAULT_SPATIAL,
  ...DEFAULT_SCANNER_AUGMENT,
  flipProbability: 0.5,
  leftRightPairs: [],
  scaleProbability: 0.15,
  scaleRange: [0.75, 1.25],
  shiftProbability: 0,
  shiftRange: [-0.1, 0.1],
  noiseProbability: 0.1,
  noiseVariance: [0, 0.1],
  gammaProbability: 0.3,
  gammaRange: [0.7, 1.5],
};

/** What one call decided to do (drawn before any voxel is touched). */
export interface AugmentParams {
  readonly flip: readonly [boolean, boolean, boolean];
  /** Per channel multiplier (1 = unchanged). */
  readonly scale: readonly number[];
  /** Per channel additive shift (0 = unchanged). */
  readonly shift: readonly number[];
  /** Noise standard deviation (0 = no noise). */
  readonly noiseSd: number;
  /** Per channel gamma (1 = unchanged); absent = none (parameters drawn before gamma existed). */
  readonly gamma?: readonly number[];
  /** Scanner-difference transforms; absent = none. */
  readonly scanner?: ScannerAugmentParams;
}

function check01(p: number, what: string): number {
  if (!(p >= 0 && p <= 1)) throw new RangeError(`${what} must be a probability in [0, 1], got ${p}`);
  return p;
}

/** Draw the augmentation for a patch with `channels` channels. */
export function drawAugmentation(rng: Rng, channels: number, options: AugmentOptions = {}): AugmentParams {
  const o = { ...DEFAULT_AUGMENT, ...options };
  const fp = typeof o.flipProbability === 'number' ? [o.flipProbability, o.flipProbability, o.flipProbability] : o.flipProbability;
  const flip = fp.map((p, a) => rng() < check01(p, `flipProbability[${a}]`)) as unknown as [boolean, boolean, boolean];
  const scale: number[] = [];
  const shift: number[] = [];
  for (let c = 0; c < channels; c++) {
    scale.push(rng() < check01(o.scaleProbability, 'scaleProbability') ? uniform(rng, o.scaleRange[0], o.scaleRange[1]) : 1);
    shift.push(rng() < check01(o.shiftProbability, 'shiftProbability') ? uniform(rng, o.shiftRange[0], o.shiftRange[1]) : 0);
  }
  const noiseSd = rng() < check01(o.noiseProbability, 'noiseProbability') ? Math.sqrt(Math.max(0, uniform(rng, o.noiseVariance[0], o.noiseVariance[1]))) : 0;
  const gamma: number[] = [];
  for (let c = 0; c < channels; c++) gamma.push(rng() < check01(o.gammaProbability, 'gammaProbability') ? drawGamma(rng, o.gammaRange) : 1);
  const scanner = drawScannerAugmentation(rng, channels, o);
  return { flip, scale, shift, noiseSd, gamma, ...(Object.keys(scanner).length > 0 ? { scanner } : {}) };
}

/** nnU-Net's draw: as often below 1 as above it (a plain uniform on [0.7, 1.5] would darken ⅝ of the time). */
function drawGamma(rng: Rng, [lo, hi]: readonly [number, number]): number {
  if (!(lo > 0 && lo <= hi)) throw new RangeError(`gammaRange must be positive [low, high], got [${lo}, ${hi}]`);
  if (lo < 1 && hi > 1) return rng() < 0.5 ? uniform(rng, lo, 1) : uniform(rng, 1, hi);
  return uniform(rng, lo, hi);
}

/** Entries of the x^γ table gammaChannel interpolates (error < 1e-3 of the range; Math.pow per voxel is ~5× slower). */
const GAMMA_TABLE = 2048;

/** x ↦ min + (max − min)·((x − min)/(max − min))^γ on channel `c` of interleaved `img`, in place. */
export function gammaChannel(img: Float32Array, channels: number, c: number, gamma: number): void {
  let min = Infinity;
  let max = -Infinity;
  for (let i = c; i < img.length; i += channels) {
    if (img[i] < min) min = img[i];
    if (img[i] > max) max = img[i];
  }
  const range = max - min;
  if (!(range > 0)) return;
  const table = new Float64Array(GAMMA_TABLE + 2);
  for (let k = 0; k <= GAMMA_TABLE; k++) table[k] = min + range * Math.pow(k / GAMMA_TABLE, gamma);
  table[GAMMA_TABLE + 1] = max;
  const scale = GAMMA_TABLE / range;
  for (let i = c; i < img.length; i += channels) {
    const u = (img[i] - min) * scale;
    const k = Math.floor(u);
    img[i] = table[k] + (u - k) * (table[k + 1] - table[k]);
  }
}

/** Mirror a patch (image and label together) along the axes marked true. */
export function flipPatch(patch: Patch, flip: readonly [boolean, boolean, boolean], leftRightPairs: AugmentOptions['leftRightPairs'] = []): Patch {
  const [D, H, W] = patch.shape;
  const C = patch.channels;
  const image = new Float32Array(patch.image.length);
  const label = patch.label ? new Uint8Array(patch.label.length) : undefined;
  let swap: Uint8Array | undefined;
  if (label && flip[2] && leftRightPairs.length > 0) {
    swap = new Uint8Array(256).map((_, i) => i);
    for (const [a, b] of leftRightPairs) [swap[a], swap[b]] = [b, a];
  }
  for (let z = 0; z < D; z++) {
    const sz = flip[0] ? D - 1 - z : z;
    for (let y = 0; y < H; y++) {
      const sy = flip[1] ? H - 1 - y : y;
      const dRow = (z * H + y) * W;
      const sRow = (sz * H + sy) * W;
      for (let x = 0; x < W; x++) {
        const s = sRow + (flip[2] ? W - 1 - x : x);
        const d = dRow + x;
        for (let c = 0; c < C; c++) image[d * C + c] = patch.image[s * C + c];
        if (label) label[d] = swap ? swap[patch.label![s]] : patch.label![s];
      }
    }
  }
  return { shape: patch.shape, channels: C, image, ...(label ? { label } : {}) };
}

/** Apply drawn parameters; `rng` supplies the noise. */
export function applyAugmentation(patch: Patch, p: AugmentParams, rng: Rng, leftRightPairs: AugmentOptions['leftRightPairs'] = []): Patch {
  const flipped = p.flip.some(Boolean) ? flipPatch(patch, p.flip, leftRightPairs) : { ...patch, image: patch.image.slice(), ...(patch.label ? { label: patch.label.slice() } : {}) };
  const img = flipped.image;
  const C = patch.channels;
  if (p.scanner) applyScannerAugmentation(img, patch.shape, C, p.scanner);
  if (p.scale.some((s) => s !== 1) || p.shift.some((s) => s !== 0)) {
    for (let i = 0; i < img.length; i++) {
      const c = i % C;
      img[i] = img[i] * p.scale[c] + p.shift[c];
    }
  }
  if (p.noiseSd > 0) for (let i = 0; i < img.length; i++) img[i] += p.noiseSd * gaussian(rng);
  p.gamma?.forEach((g, c) => { if (g !== 1) gammaChannel(img, C, c, g); });
  return flipped;
}

/**
 * The one call the trainer makes per training patch: draw and apply (see the module comment for defaults).
 * Pure: returns a new patch; deterministic for a given rng state.
 */
export function augmentPatch(patch: Patch, rng: Rng, options: AugmentOptions = {}): Patch {
  const params = drawAugmentation(rng, patch.channels, options);
  return applyAugmentation(patch, params, rng, options.leftRightPairs ?? []);
}
