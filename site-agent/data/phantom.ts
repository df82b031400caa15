/**
 * Synthetic 3D MRI-like phantoms, so a local federation can run without patient data.
 * A body ellipsoid of soft tissue with 1–3 brighter ellipsoid lesions (label 1), a smooth multiplicative
 * bias field, Gaussian noise, and a per-site intensity scale/shift standing in for scanner differences.
 * Layout is VolumeCase's: D*H*W, index (z*H + y)*W + x. Everything is deterministic in the seed.
 */
import { join } from 'node:path';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import { dimsFromShape, writeNifti } from './nifti.ts';
import { deriveSeed, gaussian, mulberry32, uniform } from './prng.ts';

export interface PhantomOptions {
  /** [D, H, W] = [Z, Y, X]. */
  readonly size: readonly [number, number, number];
  readonly seed: number;
  /** Added to every voxel after scaling (a scanner offset). */
  readonly intensityShift: number;
  /** Multiplies every voxel (a scanner gain); default 1. */
  readonly intensityScale?: number;
  /** Noise standard deviation as a fraction of the tissue intensity; default 0.06. */
  readonly noise?: number;
}

export interface PhantomCase {
  readonly image: Float32Array;
  readonly label: Uint8Array;
  /** Number of lesions drawn (1–3). */
  readonly lesions: number;
}

/** Mean soft-tissue intensity before bias, scale and shift (arbitrary MRI-like units). */
export const TISSUE_INTENSITY = 100;

interface Ellipsoid {
  readonly c: readonly [number, number, number];
  readonly r: readonly [number, number, number];
}

function map3(v: readonly number[], f: (n: number, axis: number) => number): [number, number, number] {
  return [f(v[0], 0), f(v[1], 1), f(v[2], 2)];
}

/** Normalised squared distance: <= 1 inside the ellipsoid. */
function inside(e: Ellipsoid, z: number, y: number, x: number): number {
  const dz = (z - e.c[0]) / e.r[0];
  const dy = (y - e.c[1]) / e.r[1];
  const dx = (x - e.c[2]) / e.r[2];
  return dz * dz + dy * dy + dx * dx;
}

export function generatePhantomCase(opts: PhantomOptions): PhantomCase {
  const [D, H, W] = opts.size;
  if (![D, H, W].every((n) => Number.isInteger(n) && n >= 4)) {
    throw new RangeError(`phantom size must be integers >= 4, got [${opts.size.join(', ')}]`);
  }
  const scale = opts.intensityScale ?? 1;
  const noiseSd = (opts.noise ?? 0.06) * TISSUE_INTENSITY;
  const rng = mulberry32(opts.seed);
  const dims = [D, H, W] as const;

  // Body: centred with some jitter, filling 70–90 % of each axis.
  const body: Ellipsoid = {
    c: map3(dims, (n) => (n - 1) / 2 + uniform(rng, -0.04, 0.04) * n),
    r: map3(dims, (n) => uniform(rng, 0.35, 0.45) * n),
  };

  // Lesions: well inside the body (centre within 55 % of its radius), radius 7–14 % of the axis, >= 1.5 voxels
  // so even tiny test volumes get a few labelled voxels. Contrast +25–45 % over tissue: ~4–7 noise SDs,
  // yet the ±15 % bias field makes a single global threshold imperfect.
  const nLesions = 1 + Math.floor(rng() * 3);
  const lesions: { e: Ellipsoid; contrast: number }[] = [];
  for (let k = 0; k < nLesions; k++) {
    const dir = [gaussian(rng), gaussian(rng), gaussian(rng)];
    const norm = Math.hypot(dir[0], dir[1], dir[2]) || 1;
    const rho = 0.55 * Math.cbrt(rng());
    // Centre snapped to a voxel so the centre voxel is always labelled.
    const c = map3(body.c, (bc, a) => Math.round(bc + (dir[a] / norm) * rho * body.r[a]));
    const r = map3(dims, (n) => Math.max(1.5, uniform(rng, 0.07, 0.14) * n));
    lesions.push({ e: { c, r }, contrast: uniform(rng, 0.25, 0.45) });
  }

  // Bias field: a random low-order smooth field, amplitude about ±15 %.
  const bias = {
    g: [uniform(rng, -0.1, 0.1), uniform(rng, -0.1, 0.1), uniform(rng, -0.1, 0.1)],
    f: [uniform(rng, 0.5, 1.5), uniform(rng, 0.5, 1.5), uniform(rng, 0.5, 1.5)],
    p: [uniform(rng, 0, 2 * Math.PI), uniform(rng, 0, 2 * Math.PI), uniform(rng, 0, 2 * Math.PI)],
    s: uniform(rng, 0.03, 0.06),
  };

  const image = new Float32Array(D * H * W);
  const label = new Uint8Array(D * H * W);
  const noiseRng = mulberry32(deriveSeed(opts.seed, 1));
  let i = 0;
  for (let z = 0; z < D; z++) {
    const uz = z / (D - 1) - 0.5;
    for (let y = 0; y < H; y++) {
      const uy = y / (H - 1) - 0.5;
      for (let x = 0; x < W; x++, i++) {
        const ux = x / (W - 1) - 0.5;
        const n = gaussian(noiseRng) * noiseSd;
        let v: number;
        if (inside(body, z, y, x) <= 1) {
          const b =
            1 + bias.g[0] * uz * 2 + bias.g[1] * uy * 2 + bias.g[2] * ux * 2 +
            bias.s * Math.sin(bias.f[0] * Math.PI * uz + bias.p[0]) * Math.sin(bias.f[1] * Math.PI * uy + bias.p[1]) *
              Math.sin(bias.f[2] * Math.PI * ux + bias.p[2]);
          let t = 1;
          for (const l of lesions) {
            if (inside(l.e, z, y, x) <= 1) {
              t = Math.max(t, 1 + l.contrast);
              label[i] = 1;
            }
          }
          v = TISSUE_INTENSITY * t * b + n;
        } else {
          // Air: magnitude of noise, as in MRI (Rayleigh-like, non-negative).
          v = Math.abs(n) * 0.5;
        }
        image[i] = v * scale + opts.intensityShift;
      }
    }
  }
  return { image, label, lesions: nLesions };
}

export interface PhantomSiteOptions {
  readonly siteName: string;
  /** Number of labelled training cases (imagesTr/labelsTr). */
  readonly cases: number;
  /** Number of held-back validation cases (imagesTs/labelsTs). */
  readonly valCases: number;
  /** [D, H, W]. */
  readonly size: readonly [number, number, number];
  readonly seed: number;
  readonly intensityShift: number;
  readonly intensityScale?: number;
  readonly noise?: number;
  /** Voxel size in mm [sx, sy, sz] (NIfTI order); default 1.5 isotropic. */
  readonly spacing?: readonly [number, number, number];
}

export interface PhantomSiteResult {
  readonly datasetJson: string;
  readonly trainCases: readonly string[];
  readonly valCases: readonly string[];
}

/**
 * Write an MSD / nnU-Net (v1 dataset.json) style folder: imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz,
 * and the held-back validation cases in imagesTs/ + labelsTs/.
 */
export async function writePhantomSite(dir: string, opts: PhantomSiteOptions): Promise<PhantomSiteResult> {
  const prefix = opts.siteName.replace(/[^A-Za-z0-9]+/g, '') || 'site';
  const spacing = opts.spacing ?? [1.5, 1.5, 1.5];
  const dims = dimsFromShape(opts.size);
  const caseName = (i: number): string => `${prefix}_${String(i).padStart(3, '0')}`;
  const train: string[] = [];
  const val: string[] = [];
  const total = opts.cases + opts.valCases;
  for (let i = 0; i < total; i++) {
    const isVal = i >= opts.cases;
    const name = caseName(i);
    const ph = generatePhantomCase({
      size: opts.size,
      seed: deriveSeed(opts.seed, 1000 + i),
      intensityShift: opts.intensityShift,
      intensityScale: opts.intensityScale,
      noise: opts.noise,
    });
    const [imgDir, lblDir] = isVal ? ['imagesTs', 'labelsTs'] : ['imagesTr', 'labelsTr'];
    await writeNifti(join(dir, imgDir, `${name}_0000.nii.gz`), { data: ph.image, dims, spacing });
    await writeNifti(join(dir, lblDir, `${name}.nii.gz`), { data: ph.label, dims, spacing });
    (isVal ? val : train).push(name);
  }
  const json = {
    name: opts.siteName,
    description: `MedFL synthetic phantom site ${opts.siteName} (ellipsoid lesions, seed ${opts.seed})`,
    reference: 'synthetic',
    licence: 'CC0',
    tensorImageSize: '3D',
    modality: { '0': 'MRI' },
    labels: { '0': 'background', '1': 'lesion' },
    numTraining: train.length,
    numTest: val.length,
    training: train.map((n) => ({ image: `./imagesTr/${n}.nii.gz`, label: `./labelsTr/${n}.nii.gz` })),
    test: val.map((n) => `./imagesTs/${n}.nii.gz`),
  };
  const datasetJson = join(dir, 'dataset.json');
  writeFileAtomic(datasetJson, JSON.stringify(json, null, 2) + '\n');
  return { datasetJson, trainCases: train, valCases: val };
}

/** Site-specific scanner differences of the generated phantoms (demo, experiment smoke runs): intensity offset and gain. */
export const SITE_PROFILES = [
  { shift: 0, scale: 1 },
  { shift: 40, scale: 1.25 },
  { shift: -25, scale: 0.8 },
  { shift: 15, scale: 1.1 },
  { shift: -10, scale: 0.9 },
];
