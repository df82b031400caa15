/**
 * Scanner-difference augmentation: patch transforms that imitate how one scanner's image of the same anatomy differs
 * from another's — a smooth multiplicative bias field, blur along some axes (thick slices), a coarser acquisition
 * grid (low-resolution simulation) and a contrast change about the mean. Each site trains on versions of its own
 * scans as other scanners would have taken them, so the sites' training distributions overlap and their updates pull
 * the shared model the same way. Measured on the multi-site benchmark (docs/benchmark.md): federating sites of one
 * scanner profile each scored well below the same cases shuffled across sites, i.e. the scanner shift, not the
 * averaging, was the federation's gap. Nothing leaves the site: every transform is drawn and applied locally.
 *
 * All four are off unless their probability is set (data.augment in the plan); with all of them off the random
 * stream of the other augmentations is untouched, so existing seeds give existing patches.
 */
import { uniform, type Rng } from './prng.ts';

export interface ScannerAugmentOptions {
  /** Probability of a smooth bias field on a patch; its strength is the largest |log multiplier| in the patch. */
  readonly biasProbability?: number;
  readonly biasStrength?: readonly [number, number];
  /** Probability of a Gaussian blur; each axis is blurred with probability ½ (at least one), σ in voxels. */
  readonly blurProbability?: number;
  readonly blurSigma?: readonly [number, number];
  /** Probability of low-resolution simulation: each axis (½ each, at least one) resampled on a grid `zoom` as fine. */
  readonly lowResProbability?: number;
  readonly lowResZoom?: readonly [number, number];
  /** Probability per channel of scaling the deviation from the patch mean by a factor (range kept). */
  readonly contrastProbability?: number;
  readonly contrastRange?: readonly [number, number];
}

export const DEFAULT_SCANNER_AUGMENT: Required<ScannerAugmentOptions> = {
  biasProbability: 0,
  biasStrength: [0.1, 0.4],
  blurProbability: 0,
  blurSigma: [0.5, 1.5],
  lowResProbability: 0,
  lowResZoom: [0.5, 1],
  contrastProbability: 0,
  contrastRange: [0.75, 1.25],
};

/** What one patch gets; absent = not applied. */
export interface ScannerAugmentParams {
  /** Coefficients of the quadratic log-field over the patch in [−1, 1]³: x, y, z, x², y², z², xy, xz, yz. */
  readonly bias?: readonly number[];
  /** σ per axis [D, H, W] in voxels (0 = that axis untouched). */
  readonly blur?: readonly [number, number, number];
  /** Grid fineness per axis (1 = untouched). */
  readonly lowRes?: readonly [number, number, number];
  /** Per channel contrast factor (1 = unchanged). */
  readonly contrast?: readonly number[];
}

function probability(p: number, what: string): number {
  if (!(p >= 0 && p <= 1)) throw new RangeError(`${what} must be a probability in [0, 1], got ${p}`);
  return p;
}

/** Three flags, each true with probability ½, at least one true (a transform that was drawn must do something). */
function someAxes(rng: Rng): [boolean, boolean, boolean] {
  for (;;) {
    const a: [boolean, boolean, boolean] = [rng() < 0.5, rng() < 0.5, rng() < 0.5];
    if (a.some(Boolean)) return a;
  }
}

/** Draws the scanner transforms; consumes the rng only for those whose probability is above 0. */
export function drawScannerAugmentation(rng: Rng, channels: number, options: ScannerAugmentOptions = {}): ScannerAugmentParams {
  const o = { ...DEFAULT_SCANNER_AUGMENT, ...options };
  const out: { -readonly [K in keyof ScannerAugmentParams]: ScannerAugmentParams[K] } = {};
  if (probability(o.biasProbability, 'biasProbability') > 0 && rng() < o.biasProbability) {
    const raw = Array.from({ length: 9 }, () => uniform(rng, -1, 1));
    // Scale so the largest |log f| over the patch corners and centres of faces is the drawn strength.
    const peak = biasPeak(raw);
    const strength = uniform(rng, o.biasStrength[0], o.biasStrength[1]);
    out.bias = raw.map((c) => (peak > 0 ? (c * strength) / peak : 0));
  }
  if (probability(o.blurProbability, 'blurProbability') > 0 && rng() < o.blurProbability) {
    const axes = someAxes(rng);
    out.blur = axes.map((on) => (on ? uniform(rng, o.blurSigma[0], o.blurSigma[1]) : 0)) as unknown as [number, number, number];
  }
  if (probability(o.lowResProbability, 'lowResProbability') > 0 && rng() < o.lowResProbability) {
    const axes = someAxes(rng);
    out.lowRes = axes.map((on) => (on ? uniform(rng, o.lowResZoom[0], o.lowResZoom[1]) : 1)) as unknown as [number, number, number];
  }
  if (probability(o.contrastProbability, 'contrastProbability') > 0) {
    const f: number[] = [];
    for (let c = 0; c < channels; c++) f.push(rng() < o.contrastProbability ? uniform(rng, o.contrastRange[0], o.contrastRange[1]) : 1);
    if (f.some((x) => x !== 1)) out.contrast = f;
  }
  return out;
}

/** Largest |log field| on a 5³ lattice of the patch (the quadratic's extremes lie on it or near it). */
function biasPeak(c: readonly number[]): number {
  let peak = 0;
  for (let i = 0; i < 5; i++)
    for (let j = 0; j < 5; j++)
      for (let k = 0; k < 5; k++) peak = Math.max(peak, Math.abs(logField(c, -1 + i / 2, -1 + j / 2, -1 + k / 2)));
  return peak;
}

function logField(c: readonly number[], x: number, y: number, z: number): number {
  return c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z + c[6] * x * y + c[7] * x * z + c[8] * y * z;
}

/**
 * Applies drawn transforms to an interleaved [D, H, W, C] image in place, in acquisition order: bias field, blur,
 * coarser grid, then contrast. The label is untouched (the anatomy is the same; only its picture changes).
 */
export function applyScannerAugmentation(img: Float32Array, shape: readonly [number, number, number], channels: number, p: ScannerAugmentParams): void {
  if (p.bias) biasField(img, shape, channels, p.bias);
  if (p.blur) for (let a = 0; a < 3; a++) if (p.blur[a] > 0) blurAxis(img, shape, channels, a, p.blur[a]);
  if (p.lowRes) for (let a = 0; a < 3; a++) if (p.lowRes[a] < 1) coarsenAxis(img, shape, channels, a, p.lowRes[a]);
  p.contrast?.forEach((f, c) => { if (f !== 1) contrastChannel(img, channels, c, f); });
}

/**
 * Multiplies each channel's signal by exp(field). In normalised units the "no signal" level is not 0, so the field
 * multiplies the distance from the patch's minimum (the darkest tissue), as a receive-coil bias does to raw signal.
 */
function biasField(img: Float32Array, [D, H, W]: readonly [number, number, number], C: number, coeff: readonly number[]): void {
  const min = channelMinima(img, C);
  const at = (n: number, i: number) => (n > 1 ? -1 + (2 * i) / (n - 1) : 0);
  for (let z = 0; z < D; z++) {
    const zz = at(D, z);
    for (let y = 0; y < H; y++) {
      const yy = at(H, y);
      for (let x = 0; x < W; x++) {
        const f = Math.exp(logField(coeff, at(W, x), yy, zz));
        const base = ((z * H + y) * W + x) * C;
        for (let c = 0; c < C; c++) img[base + c] = (img[base + c] - min[c]) * f + min[c];
      }
    }
  }
}

function channelMinima(img: Float32Array, C: number): number[] {
  const min = new Array<number>(C).fill(Infinity);
  for (let i = 0; i < img.length; i++) {
    const c = i % C;
    if (img[i] < min[c]) min[c] = img[i];
  }
  return min;
}

/** Visits every line of the image along `axis`: gives the offset of its first element and the stride between elements. */
function forEachLine(shape: readonly [number, number, number], C: number, axis: number, fn: (start: number, stride: number) => void): void {
  const strides = [shape[1] * shape[2] * C, shape[2] * C, C];
  const others = [0, 1, 2].filter((a) => a !== axis);
  const n0 = shape[others[0]];
  const n1 = shape[others[1]];
  for (let i = 0; i < n0; i++) for (let j = 0; j < n1; j++) for (let c = 0; c < C; c++) fn(i * strides[others[0]] + j * strides[others[1]] + c, strides[axis]);
}

/** Separable Gaussian blur along one axis, edges clamped. */
function blurAxis(img: Float32Array, shape: readonly [number, number, number], C: number, axis: number, sigma: number): void {
  const n = shape[axis];
  const r = Math.max(1, Math.ceil(2.5 * sigma));
  const k = new Float64Array(2 * r + 1);
  let sum = 0;
  for (let i = -r; i <= r; i++) sum += k[i + r] = Math.exp(-(i * i) / (2 * sigma * sigma));
  for (let i = 0; i < k.length; i++) k[i] /= sum;
  const line = new Float64Array(n);
  forEachLine(shape, C, axis, (start, stride) => {
    for (let i = 0; i < n; i++) line[i] = img[start + i * stride];
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (let t = -r; t <= r; t++) acc += k[t + r] * line[Math.min(n - 1, Math.max(0, i + t))];
      img[start + i * stride] = acc;
    }
  });
}

/**
 * A coarser grid along one axis: the line is sampled at round(n·zoom) evenly spaced points (nearest voxel, as a
 * thick-slice acquisition keeps one value per slice) and linearly interpolated back to n points.
 */
function coarsenAxis(img: Float32Array, shape: readonly [number, number, number], C: number, axis: number, zoom: number): void {
  const n = shape[axis];
  const m = Math.max(1, Math.round(n * zoom));
  if (m >= n) return;
  const coarse = new Float64Array(m);
  forEachLine(shape, C, axis, (start, stride) => {
    for (let j = 0; j < m; j++) coarse[j] = img[start + Math.min(n - 1, Math.floor(((j + 0.5) * n) / m)) * stride];
    for (let i = 0; i < n; i++) {
      // Position of voxel i on the coarse grid (cell centres at (j + 0.5)·n/m).
      const u = Math.min(m - 1, Math.max(0, ((i + 0.5) * m) / n - 0.5));
      const j = Math.floor(u);
      const t = u - j;
      img[start + i * stride] = j + 1 < m ? coarse[j] * (1 - t) + coarse[j + 1] * t : coarse[j];
    }
  });
}

/** (v − mean)·f + mean on channel `c`, clipped to the channel's range before the change (nnU-Net's rule). */
function contrastChannel(img: Float32Array, C: number, c: number, f: number): void {
  let mean = 0;
  let count = 0;
  let min = Infinity;
  let max = -Infinity;
  for (let i = c; i < img.length; i += C) {
    mean += img[i];
    count++;
    if (img[i] < min) min = img[i];
    if (img[i] > max) max = img[i];
  }
  mean /= count;
  for (let i = c; i < img.length; i += C) img[i] = Math.min(max, Math.max(min, (img[i] - mean) * f + mean));
}
