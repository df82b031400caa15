/**
 * Site "scanner" profiles: how one phantom subject becomes one site's file. Each differs in every way that
 * makes multi-site data hard: a non-linear contrast curve on the tissue property (lesions closer to or farther
 * from grey matter), a smooth multiplicative bias field, an anisotropic point-spread function (thick slices),
 * Rician noise, the voxel grid, the stored axis order and the on-disk intensity encoding.
 */
import type { Shape3 } from '../types.ts';

export interface ScannerProfile {
  readonly name: string;
  readonly description: string;
  /**
   * Monotone piecewise-linear map (tissue property → intensity) through these (property, intensity) knots,
   * linear beyond the last one. Property units: CSF 0.15, WM 0.5, deep grey 0.6, GM 0.68, caps 0.8, vessels
   * 0.92, lesions 0.5 × (1 + contrast).
   */
  readonly contrastCurve: readonly (readonly [number, number])[];
  /** Standard deviation of the log bias field (0.2 ≈ ±20 % over the brain). */
  readonly biasStrength: number;
  /** Gaussian point-spread sigma in mm per canonical axis [D, H, W] (inferior–superior, posterior–anterior, left–right). */
  readonly blurMm: Shape3;
  /** Noise SD as a fraction of the white-matter intensity (complex Gaussian; the magnitude is stored: Rician). */
  readonly noise: number;
  /** Written voxel size as a multiple of the phantom's spacing per axis [D, H, W] (1.25 at 2 mm = 2.5 mm). */
  readonly spacingFactor: Shape3;
  /**
   * Stored axis codes, nibabel-style: the world direction each stored voxel axis (x fastest, then y, z) points
   * to, e.g. "RAS" (canonical), "LPS" (DICOM-like), "ASL" (permuted). The loader brings all back to RAS+.
   */
  readonly axcodes: string;
  readonly datatype: 'float32' | 'int16';
  /** Intensity multiplier on disk (arbitrary scanner units). */
  readonly scale: number;
  /** int16 only: scl_slope written to the header (stored integer × slope = intensity). */
  readonly slope?: number;
}

export const SCANNER_PROFILES: readonly ScannerProfile[] = [
  {
    name: 'A-3T-iso',
    description: '3T-like: sharp isotropic 2 mm, mild bias, low noise, near-linear contrast, RAS float32',
    contrastCurve: [[0, 0], [0.5, 0.5], [0.7, 0.7], [1.2, 1.25]],
    biasStrength: 0.08,
    blurMm: [0.9, 0.9, 0.9],
    noise: 0.035,
    spacingFactor: [1, 1, 1],
    axcodes: 'RAS',
    datatype: 'float32',
    scale: 1,
  },
  {
    name: 'B-1.5T-thick',
    description: '1.5T-like: thick axial slices (blur along inferior–superior), strong bias, compressed bright end (lesions near grey matter), LPS int16',
    contrastCurve: [[0, 0], [0.15, 0.22], [0.5, 0.54], [0.68, 0.7], [0.8, 0.8], [1.2, 1.02]],
    biasStrength: 0.22,
    blurMm: [2.6, 0.9, 0.9],
    noise: 0.06,
    spacingFactor: [1, 1, 1],
    axcodes: 'LPS',
    datatype: 'int16',
    scale: 2000,
  },
  {
    name: 'C-lowres-2.5mm',
    description: 'older scanner: 2.5 mm grid, blur along left–right, dark CSF and expanded bright end (gamma-like), axes permuted (ASL), float32',
    contrastCurve: [[0, 0], [0.15, 0.05], [0.5, 0.32], [0.68, 0.52], [1.2, 1.3]],
    biasStrength: 0.15,
    blurMm: [1.2, 1.2, 2.2],
    noise: 0.05,
    spacingFactor: [1.25, 1.25, 1.25],
    axcodes: 'ASL',
    datatype: 'float32',
    scale: 350,
  },
  {
    name: 'D-sagittal',
    description: 'sagittal-like: thick along left–right, moderate bias, low grey/white contrast, SPL int16 with scl_slope',
    contrastCurve: [[0, 0], [0.15, 0.18], [0.5, 0.55], [0.68, 0.64], [1.2, 1.1]],
    biasStrength: 0.12,
    blurMm: [1.0, 1.0, 2.6],
    noise: 0.045,
    spacingFactor: [1, 1, 1.5],
    axcodes: 'SPL',
    datatype: 'int16',
    scale: 800,
    slope: 0.5,
  },
];

export function profileFor(siteIndex: number): ScannerProfile {
  return SCANNER_PROFILES[siteIndex % SCANNER_PROFILES.length];
}

/** The profile's contrast curve as a function (monotone piecewise-linear, extrapolated with the last segment's slope). */
export function contrastFunction(profile: ScannerProfile): (p: number) => number {
  const k = profile.contrastCurve;
  const exact = (p: number): number => {
    if (p <= k[0][0]) return k[0][1];
    let i = 1;
    while (i < k.length - 1 && p > k[i][0]) i++;
    const [x0, y0] = k[i - 1];
    const [x1, y1] = k[i];
    return y0 + ((p - x0) * (y1 - y0)) / (x1 - x0);
  };
  // A lookup table over [0, 2): the curve is evaluated once per brain voxel.
  const steps = 4096;
  const lut = new Float32Array(steps + 1);
  for (let i = 0; i <= steps; i++) lut[i] = exact((2 * i) / steps);
  return (p: number) => {
    const t = (p * steps) / 2;
    if (!(t >= 0 && t < steps)) return exact(p);
    const i = Math.floor(t);
    return lut[i] + (lut[i + 1] - lut[i]) * (t - i);
  };
}
