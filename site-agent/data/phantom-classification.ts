/**
 * Phantom sites for federated pretraining with per-site heads (site-agent/task-config.ts): a classification
 * site whose case label is the lesion's size class, and a segmentation site with three classes. Both are
 * MRI-like volumes — a body ellipsoid of soft tissue with a smooth bias field, Gaussian noise and a per-site
 * scanner gain/offset — written in the MSD / nnU-Net layout, so the site code reads them like real data.
 *
 * Classification (`writeClassificationPhantomSite`): one lesion near the centre (so a centred patch holds it),
 * case label by lesion size: with 2 classes 0 = no lesion, 1 = lesion; with 3 classes 0 = none, 1 = small,
 * 2 = large. Labels go to classification.csv (`case,label`) or to dataset.json "classification"; there are no
 * voxel labels. Classes are balanced (case i has class i mod classes).
 *
 * Segmentation with three classes (`writeTissuePhantomSite`): label 1 = lesion (1–2 per case), 2 = the rest of
 * the body, 0 = air; a different label set from the two-class phantom of phantom.ts on the same kind of image.
 * Everything is deterministic in the seed.
 */
import { join } from 'node:path';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import { dimsFromShape, writeNifti } from './nifti.ts';
import { deriveSeed, gaussian, mulberry32, uniform, type Rng } from './prng.ts';
import { TISSUE_INTENSITY } from './phantom.ts';

type Vec3 = [number, number, number];

interface Ellipsoid {
  readonly c: Vec3;
  readonly r: Vec3;
}

export interface BodyPhantomOptions {
  /** [D, H, W]. */
  readonly size: readonly [number, number, number];
  readonly seed: number;
  /** Lesion radii as fractions of each axis (one entry per lesion; empty = no lesion). */
  readonly lesionRadii: readonly number[];
  /** How far from the body centre a lesion centre may lie, as a fraction of the body radius (default 0.2). */
  readonly lesionSpread?: number;
  readonly intensityShift?: number;
  readonly intensityScale?: number;
  /** Noise SD as a fraction of tissue intensity (default 0.06). */
  readonly noise?: number;
}

export interface BodyPhantom {
  readonly image: Float32Array;
  /** 1 inside the body ellipsoid. */
  readonly body: Uint8Array;
  /** 1 inside any lesion. */
  readonly lesion: Uint8Array;
}

const norm2 = (e: Ellipsoid, z: number, y: number, x: number) =>
  ((z - e.c[0]) / e.r[0]) ** 2 + ((y - e.c[1]) / e.r[1]) ** 2 + ((x - e.c[2]) / e.r[2]) ** 2;

/** A body with the given lesions (brighter by 40–60 %), bias field and noise; image plus body and lesion masks. */
export function generateBodyPhantom(o: BodyPhantomOptions): BodyPhantom {
  const [D, H, W] = o.size;
  if (![D, H, W].every((n) => Number.isInteger(n) && n >= 4)) throw new RangeError(`phantom size must be integers >= 4, got [${o.size.join(', ')}]`);
  if (o.lesionRadii.some((r) => !(r > 0 && r < 0.5))) throw new RangeError(`lesion radii are fractions of the axis in (0, 0.5), got [${o.lesionRadii.join(', ')}]`);
  const rng: Rng = mulberry32(o.seed);
  const dims: Vec3 = [D, H, W];
  const body: Ellipsoid = {
    c: dims.map((n) => (n - 1) / 2 + uniform(rng, -0.03, 0.03) * n) as Vec3,
    r: dims.map((n) => uniform(rng, 0.38, 0.46) * n) as Vec3,
  };
  const spread = o.lesionSpread ?? 0.2;
  const lesions = o.lesionRadii.map((frac) => {
    const e: Ellipsoid = {
      c: body.c.map((c, a) => Math.round(c + uniform(rng, -spread, spread) * body.r[a])) as Vec3,
      // At least 1.2 voxels so the centre voxel and its neighbours are lesion even in tiny volumes.
      r: dims.map((n) => Math.max(1.2, frac * n * uniform(rng, 0.9, 1.1))) as Vec3,
    };
    return { e, contrast: uniform(rng, 0.4, 0.6) };
  });
  const gain = [uniform(rng, -0.1, 0.1), uniform(rng, -0.1, 0.1), uniform(rng, -0.1, 0.1)];
  const scale = o.intensityScale ?? 1;
  const shift = o.intensityShift ?? 0;
  const noiseSd = (o.noise ?? 0.06) * TISSUE_INTENSITY;
  const noiseRng = mulberry32(deriveSeed(o.seed, 7));
  const n = D * H * W;
  const image = new Float32Array(n);
  const bodyMask = new Uint8Array(n);
  const lesionMask = new Uint8Array(n);
  for (let z = 0, i = 0; z < D; z++) {
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++, i++) {
        const noise = gaussian(noiseRng) * noiseSd;
        let v: number;
        if (norm2(body, z, y, x) <= 1) {
          bodyMask[i] = 1;
          const bias = 1 + gain[0] * (z / (D - 1) - 0.5) * 2 + gain[1] * (y / (H - 1) - 0.5) * 2 + gain[2] * (x / (W - 1) - 0.5) * 2;
          let t = 1;
          for (const l of lesions) {
            if (norm2(l.e, z, y, x) <= 1) {
              t = Math.max(t, 1 + l.contrast);
              lesionMask[i] = 1;
            }
          }
          v = TISSUE_INTENSITY * t * bias + noise;
        } else {
          v = Math.abs(noise) * 0.5;
        }
        image[i] = v * scale + shift;
      }
    }
  }
  return { image, body: bodyMask, lesion: lesionMask };
}

export interface PhantomTaskSiteOptions {
  readonly siteName: string;
  /** Training cases (imagesTr). */
  readonly cases: number;
  /** Held-back validation cases (imagesTs, with labels). */
  readonly valCases: number;
  readonly size: readonly [number, number, number];
  readonly seed: number;
  readonly intensityShift?: number;
  readonly intensityScale?: number;
  readonly noise?: number;
  /** Voxel size in mm [sx, sy, sz] (NIfTI order); default 1.5 isotropic. */
  readonly spacing?: readonly [number, number, number];
}

export interface ClassificationPhantomOptions extends PhantomTaskSiteOptions {
  /** 2: lesion absent / present; 3: none / small / large (default 2). */
  readonly classes?: 2 | 3;
  /** Where the case labels go: classification.csv (default) or dataset.json "classification". */
  readonly labelsIn?: 'csv' | 'json';
}

export interface PhantomTaskSiteResult {
  readonly datasetJson: string;
  readonly trainCases: readonly string[];
  readonly valCases: readonly string[];
  /** Case name → class (classification sites only). */
  readonly classes?: ReadonlyMap<string, number>;
}

/** Lesion radius (fraction of the axis) of each size class: [none, small, large] or [none, lesion]. */
function radiiFor(cls: number, classes: 2 | 3, rng: Rng): number[] {
  if (cls === 0) return [];
  if (classes === 2) return [uniform(rng, 0.12, 0.22)];
  return cls === 1 ? [uniform(rng, 0.08, 0.11)] : [uniform(rng, 0.2, 0.25)];
}

const caseNamer = (site: string) => {
  const prefix = site.replace(/[^A-Za-z0-9]+/g, '') || 'site';
  return (i: number) => `${prefix}_${String(i).padStart(3, '0')}`;
};

/** A classification site: images only, one class per case by lesion size, labels in a CSV or dataset.json. */
export async function writeClassificationPhantomSite(dir: string, o: ClassificationPhantomOptions): Promise<PhantomTaskSiteResult> {
  const classes = o.classes ?? 2;
  const name = caseNamer(o.siteName);
  const spacing = o.spacing ?? [1.5, 1.5, 1.5];
  const dims = dimsFromShape(o.size);
  const train: string[] = [];
  const val: string[] = [];
  const labels = new Map<string, number>();
  for (let i = 0; i < o.cases + o.valCases; i++) {
    const isVal = i >= o.cases;
    // Balanced in both splits: the class cycles within each split.
    const cls = (isVal ? i - o.cases : i) % classes;
    const seed = deriveSeed(o.seed, 2000 + i);
    const ph = generateBodyPhantom({ size: o.size, seed, lesionRadii: radiiFor(cls, classes, mulberry32(deriveSeed(seed, 3))), intensityShift: o.intensityShift, intensityScale: o.intensityScale, noise: o.noise });
    const c = name(i);
    await writeNifti(join(dir, isVal ? 'imagesTs' : 'imagesTr', `${c}_0000.nii.gz`), { data: ph.image, dims, spacing });
    labels.set(c, cls);
    (isVal ? val : train).push(c);
  }
  const classNames = classes === 2 ? ['no lesion', 'lesion'] : ['no lesion', 'small lesion', 'large lesion'];
  const json: Record<string, unknown> = {
    name: o.siteName,
    description: `MedFL synthetic classification phantom site ${o.siteName}: case class = ${classNames.map((n, k) => `${k} ${n}`).join(', ')} (seed ${o.seed})`,
    reference: 'synthetic',
    licence: 'CC0',
    tensorImageSize: '3D',
    modality: { '0': 'MRI' },
    // dataset.json needs a voxel label map even without label files; the case classes are in classification.
    labels: { '0': 'background', '1': 'lesion' },
    numTraining: train.length,
    numTest: val.length,
    // No "training" list: MSD's entries name a label file, and these cases have none (files are found by name).
    test: val.map((n) => `./imagesTs/${n}.nii.gz`),
  };
  if (o.labelsIn === 'json') json.classification = Object.fromEntries(labels);
  else writeFileAtomic(join(dir, 'classification.csv'), ['case,label', ...[...labels].map(([c, k]) => `${c},${k}`)].join('\n') + '\n');
  const datasetJson = join(dir, 'dataset.json');
  writeFileAtomic(datasetJson, JSON.stringify(json, null, 2) + '\n');
  return { datasetJson, trainCases: train, valCases: val, classes: labels };
}

/** A three-class segmentation site: 0 air, 1 lesion (1–2 per case), 2 the rest of the body. */
export async function writeTissuePhantomSite(dir: string, o: PhantomTaskSiteOptions): Promise<PhantomTaskSiteResult> {
  const name = caseNamer(o.siteName);
  const spacing = o.spacing ?? [1.5, 1.5, 1.5];
  const dims = dimsFromShape(o.size);
  const train: string[] = [];
  const val: string[] = [];
  for (let i = 0; i < o.cases + o.valCases; i++) {
    const isVal = i >= o.cases;
    const seed = deriveSeed(o.seed, 3000 + i);
    const r = mulberry32(deriveSeed(seed, 3));
    const radii = Array.from({ length: 1 + Math.floor(r() * 2) }, () => uniform(r, 0.1, 0.16));
    const ph = generateBodyPhantom({ size: o.size, seed, lesionRadii: radii, lesionSpread: 0.5, intensityShift: o.intensityShift, intensityScale: o.intensityScale, noise: o.noise });
    const label = new Uint8Array(ph.image.length);
    for (let v = 0; v < label.length; v++) label[v] = ph.lesion[v] ? 1 : ph.body[v] ? 2 : 0;
    const c = name(i);
    const [imgDir, lblDir] = isVal ? ['imagesTs', 'labelsTs'] : ['imagesTr', 'labelsTr'];
    await writeNifti(join(dir, imgDir, `${c}_0000.nii.gz`), { data: ph.image, dims, spacing });
    await writeNifti(join(dir, lblDir, `${c}.nii.gz`), { data: label, dims, spacing });
    (isVal ? val : train).push(c);
  }
  const json = {
    name: o.siteName,
    description: `MedFL synthetic three-class phantom site ${o.siteName}: lesion and body (seed ${o.seed})`,
    reference: 'synthetic',
    licence: 'CC0',
    tensorImageSize: '3D',
    modality: { '0': 'MRI' },
    labels: { '0': 'background', '1': 'lesion', '2': 'body' },
    numTraining: train.length,
    numTest: val.length,
    training: train.map((n) => ({ image: `./imagesTr/${n}.nii.gz`, label: `./labelsTr/${n}.nii.gz` })),
    test: val.map((n) => `./imagesTs/${n}.nii.gz`),
  };
  const datasetJson = join(dir, 'dataset.json');
  writeFileAtomic(datasetJson, JSON.stringify(json, null, 2) + '\n');
  return { datasetJson, trainCases: train, valCases: val };
}
