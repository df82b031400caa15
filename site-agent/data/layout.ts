/**
 * What is in a site's data folder (MSD / nnU-Net layout), without reading any voxel:
 *   dataset.json                    class names, channel names (modality / channel_names), numTraining
 *   imagesTr/CASE_0000.nii.gz …     one file per channel (_0000, _0001, …); a plain CASE.nii.gz is channel 0
 *   labelsTr/CASE.nii.gz            segmentation label; an image without one is in the unlabelled pool
 *   imagesTs/, labelsTs/            optional local validation (labelled) or more unlabelled images
 *   classification labels           dataset.json "classification": {"CASE": k}, or a CSV with columns case,label
 *                                   (dataset.json "classification_csv", default classification.csv if present)
 * Problems found here (missing channels, labels without images, a bad CSV) are listed, not thrown, so
 * `medfl site check-data` can report all of them; only an unreadable dataset.json throws.
 */
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { classNames, DatasetError, parseDatasetJson, type DatasetJson } from './dataset-json.ts';

export type Severity = 'error' | 'warning';

export interface DataProblem {
  readonly severity: Severity;
  /** Case name as in the file names (local use only: never log it above debug). */
  readonly case?: string;
  /** Path relative to the dataset folder. */
  readonly file?: string;
  readonly fault: string;
}

export interface CaseEntry {
  readonly name: string;
  /** imagesTr/labelsTr or imagesTs/labelsTs. */
  readonly split: 'Tr' | 'Ts';
  /** Relative image path per channel; undefined where that channel's file is missing. */
  readonly images: readonly (string | undefined)[];
  readonly label?: string;
  readonly classLabel?: number;
  /** Channel indices of files beyond dataset.json's channels (an error on the case); absent when none. */
  readonly extraChannels?: readonly number[];
}

export interface DatasetLayout {
  readonly meta: DatasetJson;
  readonly name: string;
  /** Segmentation class names by index, background first. */
  readonly labels: readonly string[];
  /** Channel names by index ("CT", "T1", …); length = number of channels. */
  readonly channelNames: readonly string[];
  readonly cases: readonly CaseEntry[];
  readonly problems: readonly DataProblem[];
}

const NII = /\.nii(\.gz)?$/;

async function ls(dir: string): Promise<string[] | undefined> {
  try {
    // Dot files are skipped: MSD tarballs ship macOS "._CASE.nii.gz" resource forks that are not NIfTI.
    return (await readdir(dir)).filter((f) => NII.test(f) && !f.startsWith('.')).sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

const ClassMap = z.record(z.string(), z.number().int().nonnegative());

/** Parse "case,label" CSV text (header required; quotes around fields allowed; # comments and blank lines skipped). */
export function parseClassCsv(text: string, file: string): { labels: Map<string, number>; problems: DataProblem[] } {
  const labels = new Map<string, number>();
  const problems: DataProblem[] = [];
  const rows = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  const cells = (l: string): string[] => l.split(/[,;\t]/).map((c) => c.trim().replace(/^"(.*)"$/, '$1'));
  if (rows.length === 0) return { labels, problems: [{ severity: 'warning', file, fault: 'empty CSV' }] };
  const head = cells(rows[0]).map((h) => h.toLowerCase());
  const ci = head.findIndex((h) => h === 'case' || h === 'id' || h === 'case_id');
  const li = head.findIndex((h) => h === 'label' || h === 'class');
  if (ci < 0 || li < 0) {
    return { labels, problems: [{ severity: 'error', file, fault: `header must name a "case" and a "label" column, got "${rows[0]}"` }] };
  }
  for (let r = 1; r < rows.length; r++) {
    const c = cells(rows[r]);
    const v = Number(c[li]);
    if (!c[ci] || !Number.isInteger(v) || v < 0) {
      problems.push({ severity: 'error', file, fault: `line ${r + 1}: expected a case and a non-negative integer label, got "${rows[r]}"` });
    } else if (labels.has(c[ci])) {
      problems.push({ severity: 'error', file, fault: `line ${r + 1}: case listed twice` });
    } else {
      labels.set(c[ci], v);
    }
  }
  return { labels, problems };
}

async function classLabels(dir: string, meta: DatasetJson, problems: DataProblem[]): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  const fromJson = (meta as Record<string, unknown>).classification;
  if (fromJson !== undefined) {
    const r = ClassMap.safeParse(fromJson);
    if (r.success) for (const [k, v] of Object.entries(r.data)) out.set(k, v);
    else problems.push({ severity: 'error', file: 'dataset.json', fault: 'field "classification" must map case names to non-negative integers' });
  }
  const named = (meta as Record<string, unknown>).classification_csv;
  const csvName = typeof named === 'string' ? named : 'classification.csv';
  let text: string | undefined;
  try {
    text = await readFile(join(dir, csvName), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT' || typeof named === 'string') {
      problems.push({ severity: 'error', file: csvName, fault: `cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})` });
    }
  }
  if (text !== undefined) {
    const csv = parseClassCsv(text, csvName);
    problems.push(...csv.problems);
    for (const [k, v] of csv.labels) out.set(k, v);
  }
  return out;
}

export interface ScanOptions {
  /**
   * Used when the folder has no dataset.json: a held-out test folder may hold only imagesTs/ + labelsTs/, and
   * takes its labels and channels from the training sites' dataset.json. A folder that has one keeps its own.
   */
  readonly fallbackMeta?: DatasetJson;
}

/** Scan a dataset folder. Throws DatasetError only when dataset.json is missing (with no fallback) or invalid. */
export async function scanDataset(dir: string, opts: ScanOptions = {}): Promise<DatasetLayout> {
  let meta: DatasetJson;
  let testOnly = false;
  try {
    meta = parseDatasetJson(await readFile(join(dir, 'dataset.json'), 'utf8'));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (e instanceof DatasetError) throw e;
    if (code !== 'ENOENT' || !opts.fallbackMeta) throw new DatasetError(`dataset.json: cannot read (${code ?? (e as Error).message})`, { cause: e });
    meta = opts.fallbackMeta;
    testOnly = true;
  }
  const labels = classNames(meta.labels);
  const problems: DataProblem[] = [];
  const declared = meta.channel_names ?? meta.modality ?? {};
  const declaredCount = Object.keys(declared).length;

  const cls = await classLabels(dir, meta, problems);
  const cases: CaseEntry[] = [];
  let foundChannels = 0;
  const perSplit: { split: 'Tr' | 'Ts'; byCase: Map<string, Map<number, string>>; labelFiles: Map<string, string> }[] = [];
  for (const split of ['Tr', 'Ts'] as const) {
    const imgDir = `images${split}`;
    const lblDir = `labels${split}`;
    const images = await ls(join(dir, imgDir));
    const lbls = (await ls(join(dir, lblDir))) ?? [];
    if (images === undefined && split === 'Tr' && !testOnly) problems.push({ severity: 'error', file: imgDir, fault: 'folder missing' });
    if (images === undefined && split === 'Ts' && testOnly) problems.push({ severity: 'error', file: imgDir, fault: 'folder missing (a folder without dataset.json must hold imagesTs/ and labelsTs/)' });
    const byCase = new Map<string, Map<number, string>>();
    for (const f of images ?? []) {
      const base = f.replace(NII, '');
      const m = /^(.+)_(\d{4})$/.exec(base);
      const [name, ch] = m ? [m[1], Number(m[2])] : [base, 0];
      const chans = byCase.get(name) ?? new Map<number, string>();
      if (chans.has(ch)) problems.push({ severity: 'error', case: name, file: join(imgDir, f), fault: `channel ${ch} given twice` });
      chans.set(ch, join(imgDir, f));
      byCase.set(name, chans);
      foundChannels = Math.max(foundChannels, ch + 1);
    }
    const labelFiles = new Map(lbls.map((f) => [f.replace(NII, ''), join(lblDir, f)]));
    for (const [name, file] of labelFiles) {
      if (!byCase.has(name)) problems.push({ severity: 'warning', case: name, file, fault: 'label without an image (ignored)' });
    }
    perSplit.push({ split, byCase, labelFiles });
  }
  // dataset.json's channel list is the truth when it has one: a file beyond it is that case's fault (a misnamed file,
  // a modality the other cases lack), reported on the case, rather than a channel every other case then misses.
  const channels = declaredCount > 0 ? declaredCount : Math.max(1, foundChannels);
  if (declaredCount > 0 && foundChannels > declaredCount) {
    problems.push({ severity: 'warning', file: 'dataset.json', fault: `declares ${declaredCount} channel(s) but files for ${foundChannels} were found` });
  }
  const channelNames = Array.from({ length: channels }, (_, i) => declared[String(i)] ?? `channel ${i}`);

  for (const { split, byCase, labelFiles } of perSplit) {
    for (const name of [...byCase.keys()].sort()) {
      const chans = byCase.get(name)!;
      const images = Array.from({ length: channels }, (_, i) => chans.get(i));
      const missing = images.flatMap((f, i) => (f === undefined ? [`_${String(i).padStart(4, '0')}`] : []));
      if (missing.length > 0) {
        problems.push({ severity: 'error', case: name, file: `images${split}/${name}`, fault: `missing channel file(s) ${missing.join(', ')} (dataset has ${channels} channels)` });
      }
      const extra = [...chans.keys()].filter((i) => i >= channels).sort((a, b) => a - b);
      if (extra.length > 0) {
        problems.push({
          severity: 'error',
          case: name,
          file: `images${split}/${name}`,
          fault: `channel file(s) ${extra.map((i) => `_${String(i).padStart(4, '0')}`).join(', ')} beyond the ${channels} channel(s) dataset.json names (modality / channel_names)`,
        });
      }
      cases.push({ name, split, images, label: labelFiles.get(name), classLabel: cls.get(name), ...(extra.length > 0 ? { extraChannels: extra } : {}) });
    }
  }
  const known = new Set(cases.map((c) => c.name));
  for (const k of cls.keys()) {
    if (!known.has(k)) problems.push({ severity: 'warning', case: k, fault: 'has a classification label but no image' });
  }
  const numTr = cases.filter((c) => c.split === 'Tr').length;
  if (!testOnly && numTr !== meta.numTraining) {
    problems.push({ severity: 'warning', file: 'dataset.json', fault: `numTraining is ${meta.numTraining} but imagesTr holds ${numTr} case(s)` });
  }
  return { meta, name: meta.name ?? 'unnamed', labels, channelNames, cases, problems };
}
