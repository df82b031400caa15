/**
 * MRI bias-field correction: removes the smooth multiplicative intensity drift a receive coil leaves over the
 * head, before intensity normalisation. Scanners differ most in it (docs/data.md), and a network trained where
 * the drift is mild reads a drifting scan's bright grey matter as lesion.
 *
 * Method (N3's idea, with a polynomial field): in the log domain the drift is additive, log I = log(tissue) +
 * b(x), so the observed log-intensity histogram is the tissue histogram blurred by the spread of b. Repeatedly
 * (1) sharpen the histogram by Wiener deconvolution with a narrow Gaussian, (2) map every voxel to the expected
 * tissue log intensity under the sharpened histogram, and (3) fit b as a low-degree polynomial in physical
 * coordinates to what that mapping leaves over, until b settles. No tissue classification is needed, so a
 * field stronger than the grey/white contrast does not mislead it. The field is centred to zero mean over the
 * foreground: the correction changes the shape of the intensity landscape, not its level (normalisation follows).
 */
import { foregroundMask } from './normalize.ts';
import type { Shape3 } from './types.ts';

export interface BiasFieldOptions {
  /** Polynomial degree of log b (all monomials x^i y^j z^k with i + j + k ≤ degree); 3 gives 20 terms. */
  readonly degree?: number;
  /** At most this many sharpen-and-fit rounds (they stop earlier once the field settles). */
  readonly iterations?: number;
  /** Width (full width at half maximum, log units) of the blur the field is assumed to add to the log histogram. */
  readonly fwhm?: number;
  /** At most this many foreground voxels enter the fit (an even lattice subsample). */
  readonly maxSamples?: number;
}

export interface BiasFieldResult {
  /** Corrected intensities (voxels that are 0 or negative are kept as they were). */
  readonly image: Float32Array;
  /** Standard deviation of the estimated log field over the foreground (0.1 ≈ ±10 %). */
  readonly logFieldSd: number;
}

/** Log-intensity histogram bins, Gaussian deconvolution noise and stop rule of the sharpening loop (N3's values). */
const HISTOGRAM_BINS = 200;
const WIENER_NOISE = 0.01;
const CONVERGED = 1e-4;

/** Monomial exponents with total degree ≤ degree, constant term first. */
function monomials(degree: number): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (let total = 0; total <= degree; total++)
    for (let i = total; i >= 0; i--) for (let j = total - i; j >= 0; j--) out.push([i, j, total - i - j]);
  return out;
}

/** Solves the symmetric positive (semi)definite system A x = y (Gaussian elimination with partial pivoting and a tiny ridge). */
function solveSymmetric(A: Float64Array, y: Float64Array, n: number): Float64Array {
  const M = Float64Array.from(A);
  const v = Float64Array.from(y);
  let trace = 0;
  for (let i = 0; i < n; i++) trace += M[i * n + i];
  const ridge = 1e-9 * (trace / n || 1);
  for (let i = 0; i < n; i++) M[i * n + i] += ridge;
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(M[r * n + c]) > Math.abs(M[p * n + c])) p = r;
    if (p !== c) {
      for (let k = 0; k < n; k++) [M[c * n + k], M[p * n + k]] = [M[p * n + k], M[c * n + k]];
      [v[c], v[p]] = [v[p], v[c]];
    }
    const d = M[c * n + c];
    if (Math.abs(d) < 1e-300) continue;
    for (let r = c + 1; r < n; r++) {
      const f = M[r * n + c] / d;
      if (f === 0) continue;
      for (let k = c; k < n; k++) M[r * n + k] -= f * M[c * n + k];
      v[r] -= f * v[c];
    }
  }
  const x = new Float64Array(n);
  for (let r = n - 1; r >= 0; r--) {
    let s = v[r];
    for (let k = r + 1; k < n; k++) s -= M[r * n + k] * x[k];
    const d = M[r * n + r];
    x[r] = Math.abs(d) < 1e-300 ? 0 : s / d;
  }
  return x;
}

/**
 * The N3 step: the log-intensity histogram is the true tissue histogram blurred by the field's spread. Deconvolve
 * it with a Gaussian (Wiener filter, so noise does not explode), and return, for every bin, the expected true
 * log intensity given the observed one: E[u | v] = ∫ u U(u) G(v − u) du / ∫ U(u) G(v − u) du.
 */
function sharpenedExpectation(hist: Float64Array, binWidth: number, lo: number, fwhm: number, wienerNoise: number): Float64Array {
  const nb = hist.length;
  let size = 1;
  while (size < 2 * nb) size <<= 1;
  const sigmaBins = fwhm / (2 * Math.sqrt(2 * Math.log(2))) / binWidth;
  // Kernel centred at index 0 (wrapped), and the histogram, both padded to `size`.
  const kRe = new Float64Array(size);
  let ksum = 0;
  for (let i = 0; i < size; i++) {
    const d = i <= size / 2 ? i : i - size;
    kRe[i] = Math.exp(-(d * d) / (2 * sigmaBins * sigmaBins));
    ksum += kRe[i];
  }
  for (let i = 0; i < size; i++) kRe[i] /= ksum;
  const h = new Float64Array(size);
  h.set(hist);
  const K = dft(kRe, new Float64Array(size), false);
  const V = dft(h, new Float64Array(size), false);
  const uRe = new Float64Array(size);
  const uIm = new Float64Array(size);
  for (let f = 0; f < size; f++) {
    // U = conj(K) V / (|K|² + z)
    const kr = K.re[f];
    const ki = K.im[f];
    const den = kr * kr + ki * ki + wienerNoise;
    uRe[f] = (kr * V.re[f] + ki * V.im[f]) / den;
    uIm[f] = (kr * V.im[f] - ki * V.re[f]) / den;
  }
  const u = dft(uRe, uIm, true).re;
  const U = new Float64Array(nb);
  for (let i = 0; i < nb; i++) U[i] = Math.max(0, u[i]);
  const radius = Math.ceil(4 * sigmaBins);
  const out = new Float64Array(nb);
  for (let k = 0; k < nb; k++) {
    let num = 0;
    let den = 0;
    for (let j = Math.max(0, k - radius); j <= Math.min(nb - 1, k + radius); j++) {
      const w = U[j] * Math.exp(-((k - j) ** 2) / (2 * sigmaBins * sigmaBins));
      num += w * (lo + (j + 0.5) * binWidth);
      den += w;
    }
    out[k] = den > 0 ? num / den : lo + (k + 0.5) * binWidth;
  }
  return out;
}

/** Plain O(n²) discrete Fourier transform (n is a few hundred bins: no FFT library needed). */
function dft(re: Float64Array, im: Float64Array, inverse: boolean): { re: Float64Array; im: Float64Array } {
  const n = re.length;
  const oRe = new Float64Array(n);
  const oIm = new Float64Array(n);
  const sign = inverse ? 1 : -1;
  const cos = new Float64Array(n);
  const sin = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    cos[i] = Math.cos((2 * Math.PI * i) / n);
    sin[i] = sign * Math.sin((2 * Math.PI * i) / n);
  }
  for (let k = 0; k < n; k++) {
    let sr = 0;
    let si = 0;
    for (let t = 0, idx = 0; t < n; t++, idx = (idx + k) % n) {
      sr += re[t] * cos[idx] - im[t] * sin[idx];
      si += re[t] * sin[idx] + im[t] * cos[idx];
    }
    oRe[k] = inverse ? sr / n : sr;
    oIm[k] = inverse ? si / n : si;
  }
  return { re: oRe, im: oIm };
}

/**
 * Estimates and removes a smooth multiplicative bias field from the positive voxels of `data`, fitted over the
 * head (a masked scan's nonzero voxels, or a threshold body mask). `spacing` [D, H, W] in mm makes the
 * polynomial isotropic in millimetres. A scan with too few voxels to fit is returned unchanged (logFieldSd 0).
 */
export function correctBiasField(data: Float32Array, shape: Shape3, spacing: Shape3, opts: BiasFieldOptions = {}): BiasFieldResult {
  const degree = opts.degree ?? 3;
  const iterations = opts.iterations ?? 50;
  const fwhm = opts.fwhm ?? 0.15;
  const maxSamples = opts.maxSamples ?? 60_000;
  const [D, H, W] = shape;
  if (data.length !== D * H * W) throw new RangeError(`bias field: ${data.length} voxels for shape ${shape.join('×')}`);
  const terms = monomials(degree);
  const nt = terms.length;

  // The fit sees the head only: the nonzero voxels of a masked scan, else a threshold body mask (as normalisation
  // chooses its foreground), so noisy air does not pose as tissue. The field then applies to every positive voxel.
  let nonzero = 0;
  for (let i = 0; i < data.length; i++) if (data[i] !== 0) nonzero++;
  const body = nonzero > 0.99 * data.length ? foregroundMask(data, 'auto') : undefined;
  const inFit = (i: number): boolean => data[i] > 0 && (body === undefined || body[i] === 1);
  let positive = 0;
  for (let i = 0; i < data.length; i++) if (inFit(i)) positive++;
  if (positive < 20 * nt) return { image: Float32Array.from(data), logFieldSd: 0 };

  // Physical coordinates scaled to about [-1, 1] by the largest half-extent (one scale for all axes).
  const half = Math.max(D * spacing[0], H * spacing[1], W * spacing[2]) / 2;
  const coord = (n: number, s: number): Float64Array => Float64Array.from({ length: n }, (_, i) => ((i + 0.5 - n / 2) * s) / half);
  const cz = coord(D, spacing[0]);
  const cy = coord(H, spacing[1]);
  const cx = coord(W, spacing[2]);
  const power = (c: Float64Array): Float64Array[] => Array.from({ length: degree + 1 }, (_, p) => c.map((v) => v ** p));
  const pz = power(cz);
  const py = power(cy);
  const px = power(cx);

  // Even lattice subsample of the foreground.
  const stride = Math.max(1, Math.ceil(Math.cbrt(positive / maxSamples)));
  const idx: number[] = [];
  for (let z = 0; z < D; z += stride)
    for (let y = 0; y < H; y += stride)
      for (let x = 0; x < W; x += stride) {
        const i = (z * H + y) * W + x;
        if (inFit(i)) idx.push(i);
      }
  const n = idx.length;
  const logI = new Float64Array(n);
  const basis = new Float64Array(n * nt);
  for (let s = 0; s < n; s++) {
    const i = idx[s];
    logI[s] = Math.log(data[i]);
    const x = i % W;
    const y = Math.floor(i / W) % H;
    const z = Math.floor(i / (W * H));
    for (let t = 0; t < nt; t++) basis[s * nt + t] = pz[terms[t][0]][z] * py[terms[t][1]][y] * px[terms[t][2]][x];
  }

  // The basis never changes: its normal matrix is built once, and each round only projects a new residual.
  const AtA = new Float64Array(nt * nt);
  for (let s = 0; s < n; s++) {
    const row = s * nt;
    for (let a = 0; a < nt; a++) for (let b = a; b < nt; b++) AtA[a * nt + b] += basis[row + a] * basis[row + b];
  }
  for (let a = 0; a < nt; a++) for (let b = 0; b < a; b++) AtA[a * nt + b] = AtA[b * nt + a];

  let coef: Float64Array = new Float64Array(nt);
  const field = new Float64Array(n);
  const hist = new Float64Array(HISTOGRAM_BINS);
  const Atr = new Float64Array(nt);
  for (let it = 0; it < iterations; it++) {
    let lo = Number.POSITIVE_INFINITY;
    let hi = Number.NEGATIVE_INFINITY;
    for (let s = 0; s < n; s++) {
      const v = logI[s] - field[s];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const binWidth = Math.max(hi - lo, 1e-6) / HISTOGRAM_BINS;
    hist.fill(0);
    const bin = (v: number): number => Math.min(HISTOGRAM_BINS - 1, Math.max(0, Math.floor((v - lo) / binWidth)));
    for (let s = 0; s < n; s++) hist[bin(logI[s] - field[s])]++;
    const expected = sharpenedExpectation(hist, binWidth, lo, fwhm, WIENER_NOISE);
    // What the sharpened histogram cannot explain is field: fit the smooth model to log I − E[u | v].
    Atr.fill(0);
    for (let s = 0; s < n; s++) {
      const v = logI[s] - field[s];
      const t = (v - lo) / binWidth - 0.5;
      const k = Math.min(HISTOGRAM_BINS - 2, Math.max(0, Math.floor(t)));
      const f = Math.min(1, Math.max(0, t - k));
      const r = logI[s] - (expected[k] + f * (expected[k + 1] - expected[k]));
      const row = s * nt;
      for (let a = 0; a < nt; a++) Atr[a] += basis[row + a] * r;
    }
    coef = solveSymmetric(AtA, Atr, nt);
    let mean = 0;
    let change = 0;
    for (let s = 0; s < n; s++) {
      let f = 0;
      for (let t = 0; t < nt; t++) f += coef[t] * basis[s * nt + t];
      change += (f - field[s]) ** 2;
      field[s] = f;
      mean += f;
    }
    mean /= n;
    for (let s = 0; s < n; s++) field[s] -= mean;
    coef[0] -= mean;
    if (Math.sqrt(change / n) < CONVERGED) break;
  }

  // Apply the field on the full grid, and measure its spread over the foreground. Outside the fitted head (air of
  // an unmasked scan) the polynomial is extrapolating: hold it within the range it took on the head.
  let fLo = Number.POSITIVE_INFINITY;
  let fHi = Number.NEGATIVE_INFINITY;
  for (let s = 0; s < n; s++) {
    fLo = Math.min(fLo, field[s]);
    fHi = Math.max(fHi, field[s]);
  }
  const image = Float32Array.from(data);
  let sum = 0;
  let sumSq = 0;
  let count = 0;
  for (let z = 0; z < D; z++)
    for (let y = 0; y < H; y++) {
      // Collapse the z and y factors once per row: f(x) = Σ_t coef_t z^i y^j · x^k.
      const byPower = new Float64Array(degree + 1);
      for (let t = 0; t < nt; t++) byPower[terms[t][2]] += coef[t] * pz[terms[t][0]][z] * py[terms[t][1]][y];
      for (let x = 0; x < W; x++) {
        const i = (z * H + y) * W + x;
        const v = data[i];
        if (!(v > 0)) continue;
        let f = 0;
        for (let p = degree; p >= 0; p--) f = f * cx[x] + byPower[p];
        if (!inFit(i)) f = Math.min(fHi, Math.max(fLo, f));
        image[i] = v * Math.exp(-f);
        if (!inFit(i)) continue;
        sum += f;
        sumSq += f * f;
        count++;
      }
    }
  const m = sum / count;
  return { image, logFieldSd: Math.sqrt(Math.max(0, sumSq / count - m * m)) };
}
