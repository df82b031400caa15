/**
 * A site's data folder opened lazily: the layout is scanned at open (no voxels read); a case is read,
 * checked, reoriented, normalised and resampled the first time it is needed and kept in a cache bounded in
 * bytes (lru-cache.ts), so a 200-case site never holds 200 volumes. Bad cases are skipped with a warning
 * (case id and fault at warn, file path only at debug) and never retried; training goes on without them.
 *
 * Trainer entry points: `SiteData.open(dir, opts)`, then `sampleBatch(data.train, batchSize, rng)` for
 * augmented training patches, `load(ref)` for a whole prepared case, `patchToVolumeCase` and
 * `preparedToVolumeCase` to feed the Trainer interface (channels last, one or more channels).
 */
import { createHash } from 'node:crypto';
import type { VolumeCase } from '../../shared/model/types.ts';
import type { DatasetJson } from './dataset-json.ts';
import { augmentPatch, type AugmentOptions } from './augment.ts';
import { readCase } from './case-reader.ts';
import { scanDataset, type CaseEntry, type DataProblem, type DatasetLayout } from './layout.ts';
import { ByteLruCache, type CacheStats } from './lru-cache.ts';
import { modalityOf, type Modality } from './normalize.ts';
import { preprocessCase, type PreprocessOptions } from './preprocess.ts';
import { randomInt, type Rng } from './prng.ts';
import { centrePatch, samplePatch } from './sampler.ts';
import { checkShape, preparedBytes, type Patch, type PreparedCase, type Shape3 } from './types.ts';
import { DEFAULT_CACHE_MIB } from '../../shared/plan/data-settings.ts';

/** The subset of a pino logger used here. */
export interface DataLogger {
  debug(obj: object, msg?: string): void;
  info?(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface SiteDataOptions {
  /** Patch shape [D, H, W] the sampler cuts. */
  readonly patch: Shape3;
  /** Target spacing [D, H, W] mm (canonical S, A, R); absent = keep each case's spacing. */
  readonly spacing?: Shape3;
  /** 'auto' (default): CT for channels named "CT" in dataset.json, MRI z-score otherwise. */
  readonly normalization?: 'auto' | Modality;
  /** MRI bias-field correction before normalisation (bias-field.ts); default none. */
  readonly biasCorrection?: 'none' | 'polynomial';
  readonly ctWindow?: readonly [number, number];
  /** Share of training patches forced to contain foreground (default 0.33). */
  readonly foregroundFraction?: number;
  /** Cache budget for prepared cases, bytes (default 1 GiB). */
  readonly cacheBytes?: number;
  readonly log?: DataLogger;
  /**
   * With no labelled validation case (imagesTs + labelsTs), hold back a fixed share of the labelled training
   * cases as validation (validationCarve), so model selection and the teacher gate never run blind.
   */
  readonly carveValidation?: boolean;
  /** For a folder without dataset.json (a test folder of imagesTs/ + labelsTs/): labels and channels to assume. */
  readonly fallbackMeta?: DatasetJson;
}

export interface CaseRef {
  /** Opaque id: train-i (labelled imagesTr), val-i (labelled imagesTs, or imagesTr held back by validationCarve), pool-i (no label). */
  readonly id: string;
  readonly split: 'train' | 'val' | 'pool';
  readonly classLabel?: number;
  /** Has a segmentation label file. */
  readonly segmentation: boolean;
}

export interface SkippedCase {
  readonly id: string;
  /** What is wrong, with the file relative to the data folder; local only, never send it. */
  readonly reason: string;
}

export const DEFAULT_CACHE_BYTES = DEFAULT_CACHE_MIB * 2 ** 20;

export class SiteData {
  readonly train: readonly CaseRef[];
  readonly val: readonly CaseRef[];
  readonly unlabelled: readonly CaseRef[];
  /** How many validation cases were carved from the labelled training cases (0: none, or the folder had its own). */
  readonly carved: number;
  readonly modalities: readonly Modality[];
  private readonly entries = new Map<string, CaseEntry>();
  private readonly bad = new Map<string, string>();
  private readonly cache: ByteLruCache<string, PreparedCase>;
  private readonly pre: PreprocessOptions;

  private constructor(
    readonly dir: string,
    readonly layout: DatasetLayout,
    private readonly opts: SiteDataOptions,
  ) {
    checkShape(opts.patch, 'patch');
    const norm = opts.normalization ?? 'auto';
    this.modalities = layout.channelNames.map((n) => (norm === 'auto' ? modalityOf(n) : norm));
    this.pre = { spacing: opts.spacing, modalities: this.modalities, ctWindow: opts.ctWindow, biasCorrection: opts.biasCorrection === 'polynomial' };
    this.cache = new ByteLruCache(opts.cacheBytes ?? DEFAULT_CACHE_BYTES, preparedBytes);

    const errorsByCase = new Map<string, DataProblem>();
    for (const p of layout.problems) if (p.severity === 'error' && p.case !== undefined && !errorsByCase.has(p.case)) errorsByCase.set(p.case, p);
    const train: CaseRef[] = [];
    const val: CaseRef[] = [];
    const pool: CaseRef[] = [];
    const labelledTs = layout.cases.filter((e) => e.split === 'Ts' && (e.label !== undefined || e.classLabel !== undefined)).length;
    const carve = opts.carveValidation && labelledTs === 0 ? validationCarve(layout.cases.filter((e) => e.split === 'Tr' && (e.label !== undefined || e.classLabel !== undefined)).map((e) => e.name)) : new Set<string>();
    this.carved = carve.size;
    for (const e of layout.cases) {
      const labelled = e.label !== undefined || e.classLabel !== undefined;
      const [list, prefix, split] = !labelled ? [pool, 'pool', 'pool'] as const : e.split === 'Tr' && !carve.has(e.name) ? [train, 'train', 'train'] as const : [val, 'val', 'val'] as const;
      const ref: CaseRef = { id: `${prefix}-${list.length}`, split, segmentation: e.label !== undefined, ...(e.classLabel !== undefined ? { classLabel: e.classLabel } : {}) };
      list.push(ref);
      this.entries.set(ref.id, e);
      const p = errorsByCase.get(e.name);
      if (p) this.markBad(ref.id, `${p.file ? `${p.file}: ` : ''}${p.fault}`, p.fault);
    }
    this.train = train;
    this.val = val;
    this.unlabelled = pool;
  }

  /** Scan the folder (dataset.json and file names only). Throws DatasetError for a missing/invalid dataset.json. */
  static async open(dir: string, opts: SiteDataOptions): Promise<SiteData> {
    const layout = await scanDataset(dir, opts.fallbackMeta ? { fallbackMeta: opts.fallbackMeta } : {});
    const d = new SiteData(dir, layout, opts);
    opts.log?.info?.(
      { train: d.train.length, val: d.val.length, unlabelled: d.unlabelled.length, channels: layout.channelNames.length, skipped: d.bad.size },
      'site data opened',
    );
    if (d.carved > 0) {
      opts.log?.info?.({ carved: d.carved, train: d.train.length }, 'no labelled validation cases (imagesTs + labelsTs): a fixed share of the labelled training cases is held back as validation');
    }
    return d;
  }

  get labels(): readonly string[] {
    return this.layout.labels;
  }

  /** Cases found unusable so far (at open or when first read). */
  skipped(): SkippedCase[] {
    return [...this.bad].map(([id, reason]) => ({ id, reason }));
  }

  isBad(ref: CaseRef): boolean {
    return this.bad.has(ref.id);
  }

  cacheStats(): CacheStats {
    return this.cache.stats();
  }

  /** The prepared case, or undefined when it is unusable (then logged once and remembered). */
  async load(ref: CaseRef): Promise<PreparedCase | undefined> {
    if (this.bad.has(ref.id)) return undefined;
    const entry = this.entries.get(ref.id);
    if (!entry) throw new RangeError(`unknown case ${ref.id}`);
    try {
      return await this.cache.getOrLoad(ref.id, async () => {
        this.opts.log?.debug({ case: ref.id, images: entry.images, label: entry.label }, 'reading case');
        const r = await readCase(this.dir, entry, this.layout.labels.length);
        if (!r.raw) {
          const p = r.problems.find((q) => q.severity === 'error');
          throw new CaseUnusable(p ? `${p.file ? `${p.file}: ` : ''}${p.fault}` : 'unusable', p?.fault ?? 'unusable');
        }
        return preprocessCase(ref.id, r.raw, this.pre, entry.classLabel);
      });
    } catch (e) {
      if (!(e instanceof CaseUnusable)) throw e;
      this.markBad(ref.id, e.message, e.fault);
      return undefined;
    }
  }

  /**
   * `batchSize` training patches from random cases of `refs` (default the labelled training cases): foreground
   * oversampled, then augmented (pass `augment: false` for none). Unusable cases are skipped and replaced by
   * others; throws when none of `refs` is usable.
   */
  async sampleBatch(
    refs: readonly CaseRef[] | undefined,
    batchSize: number,
    rng: Rng,
    o: { augment?: AugmentOptions | false; foregroundFraction?: number } = {},
  ): Promise<Patch[]> {
    const from = refs ?? this.train;
    const out: Patch[] = [];
    while (out.length < batchSize) {
      const live = from.filter((r) => !this.bad.has(r.id));
      if (live.length === 0) throw new Error(`no usable case to sample from (${from.length} case(s), all unusable; run \`medfl site check-data\`)`);
      const c = await this.load(live[randomInt(rng, live.length)]);
      if (!c) continue;
      // Rotation, zoom and elastic deformation are resampled from the whole case while cutting; the rest below.
      const spatial = o.augment === false ? {} : { spatial: o.augment ?? {} };
      const p = samplePatch(c, { patch: this.opts.patch, foregroundFraction: o.foregroundFraction ?? this.opts.foregroundFraction ?? 0.33, ...spatial }, rng);
      out.push(withClass(o.augment === false ? p : augmentPatch(p, rng, o.augment ?? {}), c));
    }
    return out;
  }

  /** The centred patch of each usable case (validation), read one at a time through the cache. */
  async centrePatches(refs: readonly CaseRef[]): Promise<{ id: string; patch: Patch }[]> {
    const out: { id: string; patch: Patch }[] = [];
    for (const r of refs) {
      const c = await this.load(r);
      if (c) out.push({ id: r.id, patch: withClass(centrePatch(c, this.opts.patch), c) });
    }
    return out;
  }

  private markBad(id: string, reason: string, fault: string): void {
    if (this.bad.has(id)) return;
    this.bad.set(id, reason);
    this.opts.log?.warn({ case: id, fault }, 'skipping unusable case');
    this.opts.log?.debug({ case: id, reason }, 'skipped case detail');
  }
}

/**
 * The labelled training cases held back as validation when a folder has none of its own: about one in six
 * (nnU-Net's 5-fold holds back one in five; a dozen cases cannot spare more), at least one when there are five
 * or more, none below that. Chosen by a hash of each case's name, so the same folder always gives the same
 * split — in a real federation, across restarts, and in `medfl experiment`, whose pooled arm leaves these out.
 */
export function validationCarve(names: readonly string[]): Set<string> {
  if (names.length < 5) return new Set();
  const k = Math.max(1, Math.round(names.length / 6));
  const ranked = [...names].sort((a, b) => {
    const ha = createHash('sha256').update(a).digest('hex');
    const hb = createHash('sha256').update(b).digest('hex');
    return ha < hb ? -1 : ha > hb ? 1 : a < b ? -1 : 1;
  });
  return new Set(ranked.slice(0, k));
}

class CaseUnusable extends Error {
  constructor(message: string, readonly fault: string) {
    super(message);
  }
}

/** The patch with its case's class label (classification tasks); unchanged when the case has none. */
function withClass(p: Patch, c: PreparedCase): Patch {
  return c.classLabel === undefined ? p : { ...p, classLabel: c.classLabel };
}

/**
 * A patch as a VolumeCase (the Trainer input). Both keep channels last, so the image is passed on as it is; a
 * one-channel case carries no `channels` field, exactly as before multi-channel inputs existed.
 */
export function patchToVolumeCase(patch: Patch, id: string): VolumeCase {
  return {
    id,
    shape: [patch.shape[0], patch.shape[1], patch.shape[2]],
    image: patch.image,
    ...(patch.channels !== 1 ? { channels: patch.channels } : {}),
    ...(patch.label ? { label: patch.label } : {}),
    ...(patch.classLabel !== undefined ? { classLabel: patch.classLabel } : {}),
  };
}

/**
 * A whole prepared case (image and segmentation label) as a VolumeCase: its per-channel volumes interleaved channels last
 * (the layout patches and the encoders use). A one-channel case hands over its volume without a copy.
 */
export function preparedToVolumeCase(c: PreparedCase, id: string = c.id): VolumeCase {
  const C = c.channels.length;
  const shape: [number, number, number] = [c.shape[0], c.shape[1], c.shape[2]];
  const extra = c.label ? { label: c.label } : {};
  if (C === 1) return { id, shape, image: c.channels[0], ...extra };
  const n = c.channels[0].length;
  const image = new Float32Array(n * C);
  for (let ch = 0; ch < C; ch++) {
    const src = c.channels[ch];
    for (let v = 0; v < n; v++) image[v * C + ch] = src[v];
  }
  return { id, shape, image, channels: C, ...extra };
}
