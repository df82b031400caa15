/**
 * Load a Medical Segmentation Decathlon / nnU-Net style folder into VolumeCases:
 *   dataset.json, imagesTr/CASE_0000.nii.gz + labelsTr/CASE.nii.gz (training),
 *   imagesTs/CASE_0000.nii.gz + labelsTs/CASE.nii.gz (held-back validation; unlabelled ones are only counted).
 * Preprocessing is MRI style: canonical RAS+ orientation, z-score over the foreground, then centre crop/pad
 * to the patch. This loader is eager (every case in memory); for large sites use SiteData (site-data.ts),
 * which reads lazily through a byte-bounded cache, resamples, and samples patches.
 *
 * Privacy: case ids are opaque ("train-3", "val-0"); file paths are only logged at debug level and never put
 * into a VolumeCase. A corrupt case is skipped with its reason so a training run can go on.
 */
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import type { VolumeCase } from '../../shared/model/types.ts';
import { NiftiError, readNifti, shapeFromDims, type NiftiVolume } from './nifti.ts';
import { toCanonical } from './orientation.ts';

/** The subset of a pino logger this module uses. */
export interface DatasetLogger {
  debug(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface LoadMsdOptions {
  /** Output shape [D, H, W]; every case is centre-cropped/padded to it. */
  readonly patch: readonly [number, number, number];
  readonly log?: DatasetLogger;
  /**
   * Foreground for the z-score statistics: 'auto' (default) = voxels above 10 % of the 1st..99th percentile
   * range, which separates air from tissue in MRI whatever the scanner offset; 'nonzero' = voxels != 0.
   */
  readonly foreground?: 'auto' | 'nonzero';
}

export interface SkippedCase {
  /** Opaque id the case would have had ("train-3"). */
  readonly id: string;
  /** Path relative to the dataset folder; local only, never send or log it at info. */
  readonly file: string;
  readonly reason: string;
}

export interface MsdDataset {
  readonly name: string;
  /** Class names by index, background first. */
  readonly labels: readonly string[];
  readonly train: VolumeCase[];
  readonly val: VolumeCase[];
  /** Images without a label file (training or test), not loaded. */
  readonly unlabelled: number;
  readonly skipped: SkippedCase[];
}

export class DatasetError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DatasetError';
  }
}

const FileEntry = z.object({ image: z.string().min(1), label: z.string().min(1) });

/** MSD / nnU-Net v1 dataset.json, tolerant of nnU-Net v2 (channel_names, labels name -> index). */
export const DatasetJsonSchema = z
  .looseObject({
    name: z.string().min(1).optional(),
    description: z.string().optional(),
    tensorImageSize: z.enum(['3D', '4D']).optional(),
    modality: z.record(z.string().regex(/^\d+$/, 'keys must be channel indices'), z.string()).optional(),
    channel_names: z.record(z.string().regex(/^\d+$/, 'keys must be channel indices'), z.string()).optional(),
    labels: z.union([
      z.record(z.string().regex(/^\d+$/, 'keys must be class indices'), z.string()),
      z.record(z.string(), z.number().int().nonnegative()),
    ]),
    numTraining: z.number().int().nonnegative(),
    numTest: z.number().int().nonnegative().optional(),
    training: z.array(FileEntry).optional(),
    test: z.array(z.union([z.string(), FileEntry])).optional(),
  })
  .refine((d) => d.modality !== undefined || d.channel_names !== undefined, {
    message: 'one of "modality" (MSD) or "channel_names" (nnU-Net v2) is required',
    path: ['modality'],
  });

export type DatasetJson = z.infer<typeof DatasetJsonSchema>;

/** Parse and validate dataset.json text; errors name the offending field. */
export function parseDatasetJson(text: string, file = 'dataset.json'): DatasetJson {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new DatasetError(`${file}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  const r = DatasetJsonSchema.safeParse(raw);
  if (!r.success) {
    const issues = r.error.issues.map((i) => `field "${i.path.join('.') || '(root)'}": ${i.message}`);
    throw new DatasetError(`${file}: ${issues.join('; ')}`);
  }
  return r.data;
}

/** Class names indexed by class, from either label-map orientation; checks they are 0..n-1 with no gaps. */
export function classNames(labels: DatasetJson['labels']): string[] {
  const byIndex = new Map<number, string>();
  for (const [k, v] of Object.entries(labels)) {
    if (typeof v === 'number') byIndex.set(v, k);
    else byIndex.set(Number(k), v);
  }
  const n = byIndex.size;
  const names: string[] = [];
  for (let i = 0; i < n; i++) {
    const name = byIndex.get(i);
    if (name === undefined) throw new DatasetError(`dataset.json: field "labels": class indices must be 0..${n - 1} without gaps`);
    names.push(name);
  }
  if (n < 2) throw new DatasetError('dataset.json: field "labels": need background and at least one class');
  return names;
}

const NII = /\.nii(\.gz)?$/;

interface CaseFiles {
  readonly name: string;
  readonly image: string; // relative to dataset dir
  readonly label?: string;
}

/** List cases in imagesX/labelsX: nnU-Net names CASE_0000.nii.gz (channel 0), or plain CASE.nii.gz. */
async function listCases(dir: string, images: string, labels: string): Promise<{ cases: CaseFiles[]; channels: number }> {
  const ls = async (sub: string): Promise<string[]> => {
    try {
      // Dot files are skipped: MSD tarballs ship macOS "._CASE.nii.gz" resource forks that are not NIfTI.
      return (await readdir(join(dir, sub))).filter((f) => NII.test(f) && !f.startsWith('.'));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw e;
    }
  };
  const imageFiles = await ls(images);
  const labelFiles = new Map((await ls(labels)).map((f) => [f.replace(NII, ''), f]));
  const byCase = new Map<string, string>();
  const channelSet = new Set<string>();
  for (const f of imageFiles) {
    const base = f.replace(NII, '');
    const m = /^(.+)_(\d{4})$/.exec(base);
    if (m) {
      channelSet.add(m[2]);
      if (m[2] === '0000') byCase.set(m[1], f);
    } else if (!byCase.has(base)) {
      byCase.set(base, f);
    }
  }
  const cases = [...byCase.keys()].sort().map((name) => {
    const lf = labelFiles.get(name);
    return { name, image: join(images, byCase.get(name)!), label: lf === undefined ? undefined : join(labels, lf) };
  });
  return { cases, channels: Math.max(1, channelSet.size) };
}

export async function loadMsdDataset(dir: string, options: LoadMsdOptions): Promise<MsdDataset> {
  const { patch, log } = options;
  if (patch.length !== 3 || patch.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new RangeError(`patch must be 3 positive integers, got [${patch.join(', ')}]`);
  }
  let text: string;
  try {
    text = await readFile(join(dir, 'dataset.json'), 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new DatasetError(`dataset.json: cannot read (${code ?? (e as Error).message})`, { cause: e });
  }
  const meta = parseDatasetJson(text);
  const labels = classNames(meta.labels);

  const tr = await listCases(dir, 'imagesTr', 'labelsTr');
  const ts = await listCases(dir, 'imagesTs', 'labelsTs');
  const declaredChannels = Object.keys(meta.channel_names ?? meta.modality ?? {}).length;
  if (Math.max(declaredChannels, tr.channels) > 1) {
    log?.warn({ channels: Math.max(declaredChannels, tr.channels) }, 'dataset has several input channels; only channel 0 (_0000) is used');
  }
  if (tr.cases.length !== meta.numTraining) {
    log?.warn({ found: tr.cases.length, numTraining: meta.numTraining }, 'imagesTr case count differs from dataset.json numTraining');
  }

  const skipped: SkippedCase[] = [];
  let unlabelled = 0;
  const load = async (files: CaseFiles[], prefix: 'train' | 'val'): Promise<VolumeCase[]> => {
    const out: VolumeCase[] = [];
    for (let i = 0; i < files.length; i++) {
      const f = files[i];
      const id = `${prefix}-${i}`;
      if (f.label === undefined) {
        unlabelled++;
        log?.debug({ case: id, file: f.image }, 'image without label, not loaded');
        continue;
      }
      log?.debug({ case: id, image: f.image, label: f.label }, 'loading case');
      const r = await loadCase(dir, f, id, labels.length, patch, options.foreground ?? 'auto');
      if ('reason' in r) {
        skipped.push(r);
        log?.warn({ case: id, fault: r.reason }, 'skipping unreadable case');
        log?.debug({ case: id, file: r.file }, 'skipped case file');
      } else {
        out.push(r);
      }
    }
    return out;
  };
  const train = await load(tr.cases, 'train');
  const val = await load(ts.cases, 'val');
  return { name: meta.name ?? 'unnamed', labels, train, val, unlabelled, skipped };
}

async function loadCase(
  dir: string,
  f: CaseFiles,
  id: string,
  numClasses: number,
  patch: readonly [number, number, number],
  foreground: 'auto' | 'nonzero',
): Promise<VolumeCase | SkippedCase> {
  let img: NiftiVolume;
  let lbl: NiftiVolume;
  try {
    img = await readNifti(join(dir, f.image));
  } catch (e) {
    return { id, file: f.image, reason: faultOf(e, 'image') };
  }
  try {
    lbl = await readNifti(join(dir, f.label!));
  } catch (e) {
    return { id, file: f.label!, reason: faultOf(e, 'label') };
  }
  const gridFault = compareGrids(img, lbl);
  if (gridFault) return { id, file: f.label!, reason: gridFault };
  // One orientation for every site (RAS+, orientation.ts); a no-op for files already stored that way.
  img = toCanonical(img);
  lbl = toCanonical(lbl);

  const nonFinite = countNonFinite(img.data);
  if (nonFinite > 0) return { id, file: f.image, reason: `image: ${nonFinite} non-finite voxel values` };

  const label = new Uint8Array(lbl.data.length);
  for (let i = 0; i < label.length; i++) {
    const v = lbl.data[i];
    const k = Math.round(v);
    // Labels resampled with interpolation end up fractional; that silently corrupts training, so refuse it.
    if (!(Math.abs(v - k) < 1e-3) || k < 0 || k >= numClasses) {
      return { id, file: f.label!, reason: `label: value ${v} is not a class index 0..${numClasses - 1}` };
    }
    label[i] = k;
  }

  const shape = shapeFromDims(img.dims);
  const norm = zscoreForeground(img.data, foreground);
  const image = centerCropPad(norm.image, shape, patch, norm.backgroundValue);
  const labelOut = centerCropPad(label, shape, patch, 0);
  return { id, shape: [patch[0], patch[1], patch[2]], image, label: labelOut };
}

function faultOf(e: unknown, what: 'image' | 'label'): string {
  if (e instanceof NiftiError) return `${what}: ${e.fault}`;
  return `${what}: ${(e as Error).message ?? String(e)}`;
}

function compareGrids(img: NiftiVolume, lbl: NiftiVolume): string | undefined {
  const fmt = (d: readonly number[]): string => d.join('x');
  if (img.dims.some((d, i) => d !== lbl.dims[i])) {
    return `label grid ${fmt(lbl.dims)} differs from image grid ${fmt(img.dims)}`;
  }
  const close = (a: number, b: number): boolean => Math.abs(a - b) <= 1e-3 * Math.max(1, Math.abs(a), Math.abs(b));
  if (img.spacing.some((s, i) => !close(s, lbl.spacing[i]))) {
    return `label spacing ${fmt(lbl.spacing)} differs from image spacing ${fmt(img.spacing)}`;
  }
  for (let r = 0; r < 3; r++) {
    for (let c = 0; c < 4; c++) {
      if (!close(img.affine[r][c], lbl.affine[r][c])) return 'label affine (orientation/origin) differs from image affine';
    }
  }
  return undefined;
}

function countNonFinite(a: Float32Array): number {
  let n = 0;
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i])) n++;
  return n;
}

export interface NormaliseResult {
  readonly image: Float32Array;
  readonly mean: number;
  readonly std: number;
  readonly foregroundVoxels: number;
  /** Normalised mean of the non-foreground voxels: what padding should look like (air). */
  readonly backgroundValue: number;
}

/** Foreground mask used for the z-score statistics (see LoadMsdOptions.foreground). */
export function foregroundMask(data: Float32Array, mode: 'auto' | 'nonzero' = 'auto'): Uint8Array {
  const mask = new Uint8Array(data.length);
  if (mode === 'nonzero') {
    for (let i = 0; i < data.length; i++) mask[i] = data[i] !== 0 ? 1 : 0;
  } else {
    const [lo, hi] = percentiles(data, 0.01, 0.99);
    const thr = lo + 0.1 * (hi - lo);
    for (let i = 0; i < data.length; i++) mask[i] = data[i] > thr ? 1 : 0;
  }
  return mask;
}

/**
 * z-score over the foreground, applied to every voxel. Falls back to whole-volume statistics when the
 * foreground is tiny (< 1 %, e.g. a nearly empty or constant image), and to std 1 for a constant image.
 */
export function zscoreForeground(data: Float32Array, mode: 'auto' | 'nonzero' = 'auto'): NormaliseResult {
  let mask = foregroundMask(data, mode);
  let count = 0;
  for (let i = 0; i < mask.length; i++) count += mask[i];
  if (count < 0.01 * data.length) {
    mask = new Uint8Array(data.length).fill(1);
    count = data.length;
  }
  let sum = 0;
  for (let i = 0; i < data.length; i++) if (mask[i]) sum += data[i];
  const mean = sum / count;
  let ss = 0;
  for (let i = 0; i < data.length; i++) {
    if (mask[i]) {
      const d = data[i] - mean;
      ss += d * d;
    }
  }
  const sd = Math.sqrt(ss / count);
  const std = sd > 1e-8 ? sd : 1;
  const image = new Float32Array(data.length);
  let bgSum = 0;
  let bgCount = 0;
  for (let i = 0; i < data.length; i++) {
    const v = (data[i] - mean) / std;
    image[i] = v;
    if (!mask[i]) {
      bgSum += v;
      bgCount++;
    }
  }
  const min = image.reduce((m, v) => (v < m ? v : m), Infinity);
  return { image, mean, std, foregroundVoxels: count, backgroundValue: bgCount > 0 ? bgSum / bgCount : min };
}

/** Approximate percentiles from a strided sample (exact enough for a threshold, O(n) on big volumes). */
function percentiles(data: Float32Array, ...qs: number[]): number[] {
  const stride = Math.max(1, Math.floor(data.length / 200_000));
  const sample = new Float32Array(Math.ceil(data.length / stride));
  for (let i = 0, j = 0; i < data.length; i += stride, j++) sample[j] = data[i];
  sample.sort();
  return qs.map((q) => sample[Math.min(sample.length - 1, Math.max(0, Math.round(q * (sample.length - 1))))]);
}

/** Centre crop and/or pad each axis of a D*H*W volume to `out`, padding with `fill`. */
export function centerCropPad<T extends Float32Array | Uint8Array>(
  src: T,
  shape: readonly [number, number, number],
  out: readonly [number, number, number],
  fill: number,
): T {
  const [D, H, W] = shape;
  const [d, h, w] = out;
  if (D === d && H === h && W === w) return src;
  const dst = (src instanceof Float32Array ? new Float32Array(d * h * w) : new Uint8Array(d * h * w)) as T;
  dst.fill(fill);
  // Offset of the output window in source coordinates: positive = crop, negative = pad.
  const oz = Math.floor((D - d) / 2);
  const oy = Math.floor((H - h) / 2);
  const ox = Math.floor((W - w) / 2);
  const x0 = Math.max(0, -ox);
  const x1 = Math.min(w, W - ox);
  for (let z = 0; z < d; z++) {
    const sz = z + oz;
    if (sz < 0 || sz >= D) continue;
    for (let y = 0; y < h; y++) {
      const sy = y + oy;
      if (sy < 0 || sy >= H) continue;
      const sBase = (sz * H + sy) * W + ox;
      const dBase = (z * h + y) * w;
      dst.set(src.subarray(sBase + x0, sBase + x1), dBase + x0);
    }
  }
  return dst;
}
