/**
 * One site's scan of one phantom subject: tissue property (anatomy + texture + partial-volume lesions) →
 * the profile's contrast curve → point-spread blur → bias field → the site's voxel grid → Rician noise →
 * skull-stripping (everything outside the brain mask exactly 0) → the site's intensity scale.
 * The result is still in canonical RAS+ [D, H, W] order; write.ts stores it in the profile's axis order.
 */
import { resampledShape, resizeLinear } from '../resample.ts';
import type { Shape3 } from '../types.ts';
import { deriveSeed, gaussian, mulberry32 } from '../prng.ts';
import { Tissue, TISSUE_PROPERTY, type Anatomy } from './anatomy.ts';
import { gaussianBlur, smoothNoise } from './fields.ts';
import type { LesionMap } from './lesions.ts';
import type { BenchmarkKnobs } from './options.ts';
import { contrastFunction, type ScannerProfile } from './profiles.ts';

export interface Acquisition {
  /** Canonical [D, H, W] on the site's grid. */
  readonly shape: Shape3;
  /** [D, H, W] mm. */
  readonly spacingMm: Shape3;
  /** Intensities in the site's units (× profile.scale); exactly 0 outside the brain. */
  readonly image: Float32Array;
  readonly label: Uint8Array;
  readonly lesionVoxels: number;
}

/** White-matter tissue property (lesion intensities are relative to it). */
const WM = TISSUE_PROPERTY[Tissue.white];

export function acquire(anatomy: Anatomy, lesions: LesionMap, profile: ScannerProfile, knobs: BenchmarkKnobs, seed: number): Acquisition {
  const shape = anatomy.shape;
  const n = anatomy.tissue.length;
  const curve = contrastFunction(profile);
  const texAmp = 0.04 * knobs.textureScale;

  const img = new Float32Array(n);
  const property = Float32Array.from(TISSUE_PROPERTY); // locals: module bindings are slow in a hot loop under tsx
  const background = Tissue.background;
  for (let k = 0; k < n; k++) {
    const t = anatomy.tissue[k];
    if (t === background) continue;
    const tex = anatomy.texture[k];
    let p = property[t] * (1 + texAmp * tex);
    const f = lesions.fraction[k];
    if (f > 0) p = p * (1 - f) + f * WM * (1 + lesions.contrast[k]) * (1 + 1.5 * texAmp * tex);
    img[k] = curve(p);
  }

  const s = anatomy.spacingMm;
  const sigma = profile.blurMm.map((mm) => (mm * knobs.blurScale) / s) as unknown as Shape3;
  const blurred = gaussianBlur(img, shape, sigma);

  const biasStrength = profile.biasStrength * knobs.biasScale;
  if (biasStrength > 0) {
    const cells = shape.map((m) => Math.max(1, Math.round((m * s) / 90))) as unknown as Shape3;
    const field = smoothNoise(shape, cells, mulberry32(deriveSeed(seed, 1)));
    for (let k = 0; k < n; k++) blurred[k] *= Math.exp(biasStrength * field[k]);
  }

  // The site's grid: resample image, brain mask and lesion fraction together so the label stays on the lesion.
  const spacingMm = profile.spacingFactor.map((f) => f * s) as unknown as Shape3;
  const outShape = resampledShape(shape, [s, s, s], spacingMm);
  const same = outShape.every((m, a) => m === shape[a]);
  const maskSrc = new Float32Array(n);
  for (let k = 0; k < n; k++) maskSrc[k] = anatomy.tissue[k] === background ? 0 : 1;
  const image = same ? blurred : resizeLinear(blurred, shape, outShape);
  const mask = same ? maskSrc : resizeLinear(maskSrc, shape, outShape);
  const frac = same ? lesions.fraction : resizeLinear(lesions.fraction, shape, outShape);

  const m = image.length;
  const label = new Uint8Array(m);
  const sd = profile.noise * knobs.noiseScale * curve(WM);
  const floor = 1e-3 * curve(WM); // a brain voxel must never read as background
  const rng = mulberry32(deriveSeed(seed, 2));
  let lesionVoxels = 0;
  for (let k = 0; k < m; k++) {
    if (mask[k] < 0.5) {
      image[k] = 0;
      continue;
    }
    const re = image[k] + sd * gaussian(rng);
    const im = sd * gaussian(rng);
    image[k] = Math.max(floor, Math.sqrt(re * re + im * im)) * profile.scale;
    if (frac[k] >= 0.5) {
      label[k] = 1;
      lesionVoxels++;
    }
  }
  return { shape: outShape, spacingMm, image, label, lesionVoxels };
}
