/**
 * `medfl site import-dicom --in DICOM_DIR --out DATA_DIR [--labels DIR] [--map FILE] [--modality CT|MR]`
 *
 * Converts the DICOM series under DICOM_DIR (any folder structure; every file is looked at) into a MedFL site data
 * folder in the MSD layout: DATA_DIR/imagesTr/case_000_0000.nii.gz, …, and DATA_DIR/dataset.json. Series become
 * cases in the order of a hash of their SeriesInstanceUID, so file names, dataset.json and the printed report
 * hold no patient identifier, no UID and no source path. The geometry rules are in site-agent/data/dicom.ts.
 *
 * --labels DIR: segmentations as NIfTI, one per series, named SERIES_INSTANCE_UID.nii(.gz) (what annotation tools
 *   keyed on the series give); each must lie on its series' grid (dims and affine) and becomes labelsTr/case_NNN.
 * DICOM-SEG objects found under DICOM_DIR become the label of the series they reference (segment number = label
 *   value; rules in site-agent/data/dicom-seg.ts), unless a NIfTI label was given for it. Series without either are
 *   unlabelled (the unlabelled pool).
 * --map FILE: a CSV (case, SeriesInstanceUID, StudyInstanceUID) written with mode 0600, for the site to trace a case
 *   back to its study; it holds identifiers, so it is only written on request and never inside DATA_DIR.
 * --modality: import only series of that DICOM modality (a folder of CT and MR series otherwise takes the most
 *   common one and reports the others as skipped: one dataset has one channel meaning).
 *
 * What cannot be converted is skipped and reported with the reason (compressed transfer syntax, missing slices,
 * uneven spacing, gantry tilt, several frames, colour); exit 1 when nothing could be imported.
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { readFile, readdir, stat } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { z } from 'zod';
import { assembleSeries, channelNameOf, DicomError, readDicomSeriesKey, readDicomSlice, type DicomSlice, type DicomVolume } from '../site-agent/data/dicom.ts';
import { isSegModality, readDicomSeg, segToLabel, type DicomSeg } from '../site-agent/data/dicom-seg.ts';
import { NiftiError, readNifti, writeNifti } from '../site-agent/data/nifti.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import type { Logger } from '../shared/util/log.ts';

export const ImportDicomOptionsSchema = z
  .object({
    input: z.string().min(1),
    out: z.string().min(1),
    labels: z.string().min(1).optional(),
    map: z.string().min(1).optional(),
    modality: z
      .string()
      .regex(/^[A-Z]{2}$/, 'a DICOM modality code such as CT or MR')
      .optional(),
    /** Largest DICOM file read (bytes); bigger ones are skipped (default 512 MiB). */
    maxFileBytes: z.number().int().positive().default(512 * 2 ** 20),
  })
  .strict();
export type ImportDicomOptions = z.input<typeof ImportDicomOptionsSchema>;

export interface ImportedCase {
  readonly case: string;
  /** Ordinal of the series in the report (1-based), never its UID. */
  readonly series: number;
  readonly modality: string;
  readonly dims: readonly [number, number, number];
  readonly spacing: readonly [number, number, number];
  readonly labelled: boolean;
}

export interface ImportReport {
  readonly out: string;
  readonly cases: readonly ImportedCase[];
  /** Series not imported: ordinal, modality, image count and why. */
  readonly skippedSeries: readonly { readonly series: number; readonly modality: string; readonly images: number; readonly reason: string }[];
  /** Files not read as images, grouped by reason with a count (paths stay out: they may name patients). */
  readonly skippedFiles: readonly { readonly reason: string; readonly files: number }[];
  readonly labels: { readonly used: number; readonly unmatched: number; readonly problems: readonly string[] };
}

export class ImportDicomError extends Error {
  override name = 'ImportDicomError';
}

/** Every regular file under `dir`, depth first, in name order (symbolic links are not followed). */
async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    const entries = (await readdir(d, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) out.push(p);
    }
  };
  await walk(dir);
  return out;
}

/** The case names' order: a hash of the UID, so neither acquisition order nor the UID shows in the names. */
const orderKey = (uid: string): string => createHash('sha256').update(uid).digest('hex');

const close = (a: number, b: number): boolean => Math.abs(a - b) <= 1e-3 * Math.max(1, Math.abs(a), Math.abs(b));

export async function runImportDicom(opts: ImportDicomOptions, log?: Pick<Logger, 'info' | 'warn'>): Promise<ImportReport> {
  const o = ImportDicomOptionsSchema.parse(opts);
  const input = resolve(o.input);
  const out = resolve(o.out);
  if (!existsSync(input) || !statSync(input).isDirectory()) throw new ImportDicomError(`--in ${o.input}: not a folder`);
  if (!relative(input, out).startsWith('..')) throw new ImportDicomError('--out must not be inside --in (nor the same folder): the import would read its own output');
  if (existsSync(out) && readdirSync(out).length > 0) throw new ImportDicomError(`--out ${o.out}: exists and is not empty (import into a new folder)`);
  if (o.map && resolve(o.map).startsWith(`${out}/`)) throw new ImportDicomError('--map: keep the identifier map outside the data folder (it must never travel with the data)');

  const fileReasons = new Map<string, number>();
  const skipFile = (reason: string) => fileReasons.set(reason, (fileReasons.get(reason) ?? 0) + 1);

  // Labels by SeriesInstanceUID (the file name is only a lookup key; output names are the case's).
  const labelFiles = new Map<string, string>();
  if (o.labels) {
    for (const f of readdirSync(o.labels)) {
      const m = /^(.+?)\.nii(\.gz)?$/.exec(f);
      if (m) labelFiles.set(m[1], join(o.labels, f));
    }
  }
  const labelProblems: string[] = [];
  // DICOM-SEG objects by the series they were drawn on.
  const segsBySeries = new Map<string, DicomSeg[]>();
  const segmentNames = new Map<number, string>();
  const cases: ImportedCase[] = [];
  const mapRows: string[] = ['case,SeriesInstanceUID,StudyInstanceUID'];

  const writeCase = async (series: number, uid: string, studyUid: string | undefined, v: DicomVolume): Promise<void> => {
    const name = `case_${String(cases.length).padStart(3, '0')}`;
    await writeNifti(join(out, 'imagesTr', `${name}_0000.nii.gz`), { data: v.data, dims: v.dims, spacing: v.spacing, affine: v.affine, description: 'medfl import-dicom' });
    let labelled = false;
    const lf = labelFiles.get(uid);
    const segs = segsBySeries.get(uid) ?? [];
    segsBySeries.delete(uid);
    if (lf && segs.length > 0) labelProblems.push(`${name}: has a NIfTI label and a DICOM-SEG; the NIfTI label was used`);
    if (lf) {
      labelFiles.delete(uid);
      try {
        const l = await readNifti(lf);
        const grid = l.dims.every((d, a) => d === v.dims[a]) && [0, 1, 2].every((r) => [0, 1, 2, 3].every((c) => close(l.affine[r][c], v.affine[r][c])));
        if (!grid) labelProblems.push(`${name}: its label is on another grid (dims ${l.dims.join('×')} vs ${v.dims.join('×')}, or another affine); left unlabelled`);
        else if (l.data.some((x) => x < 0 || x > 255 || !Number.isInteger(x))) labelProblems.push(`${name}: its label holds values that are not class indices 0..255; left unlabelled`);
        else {
          await writeNifti(join(out, 'labelsTr', `${name}.nii.gz`), { data: Uint8Array.from(l.data), dims: v.dims, spacing: v.spacing, affine: v.affine, description: 'medfl import-dicom' });
          labelled = true;
        }
      } catch (e) {
        if (!(e instanceof NiftiError)) throw e;
        labelProblems.push(`${name}: its label cannot be read (${e.fault}); left unlabelled`);
      }
    }
    else if (segs.length > 1) labelProblems.push(`${name}: ${segs.length} DICOM-SEG objects reference its series; left unlabelled (keep one)`);
    else if (segs.length === 1) {
      try {
        const label = segToLabel(segs[0], v.grid);
        await writeNifti(join(out, 'labelsTr', `${name}.nii.gz`), { data: label, dims: v.dims, spacing: v.spacing, affine: v.affine, description: 'medfl import-dicom' });
        for (const [n, l] of segs[0].segments) if (!segmentNames.has(n)) segmentNames.set(n, l);
        labelled = true;
      } catch (e) {
        if (!(e instanceof DicomError)) throw e;
        labelProblems.push(`${name}: its DICOM-SEG cannot be used (${e.message}); left unlabelled`);
      }
    }
    cases.push({ case: name, series, modality: v.modality, dims: v.dims, spacing: v.spacing, labelled });
    mapRows.push(`${name},${uid},${studyUid ?? ''}`);
  };

  const addSeg = (seg: DicomSeg): void => {
    segsBySeries.set(seg.referencedSeriesUid, [...(segsBySeries.get(seg.referencedSeriesUid) ?? []), seg]);
  };

  // Pass 1: headers only, files grouped by series; segmentation objects read whole (bit-packed, small) (the series' modality from its first file).
  const bySeries = new Map<string, { modality: string; files: string[] }>();
  for (const file of await listFiles(input)) {
    const size = (await stat(file)).size;
    if (size > o.maxFileBytes) {
      skipFile(`larger than ${o.maxFileBytes} bytes`);
      continue;
    }
    try {
      const bytes = await readFile(file);
      const k = readDicomSeriesKey(bytes);
      if (isSegModality(k.modality)) {
        try {
          addSeg(readDicomSeg(bytes));
        } catch (e) {
          if (!(e instanceof DicomError)) throw e;
          skipFile(`DICOM-SEG not used: ${e.message}`);
        }
        continue;
      }
      const entry = bySeries.get(k.seriesUid);
      if (entry) entry.files.push(file);
      else bySeries.set(k.seriesUid, { modality: k.modality, files: [file] });
    } catch (e) {
      if (!(e instanceof DicomError)) throw e;
      skipFile(e.message);
    }
  }

  const series = [...bySeries.entries()].sort(([a], [b]) => (orderKey(a) < orderKey(b) ? -1 : 1));
  const counts = new Map<string, number>();
  for (const [, s] of series) counts.set(s.modality, (counts.get(s.modality) ?? 0) + 1);
  const modality = o.modality ?? [...counts.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))[0]?.[0];

  // Pass 2: one series' pixels at a time, written before the next is read (memory: one series).
  const skippedSeries: { series: number; modality: string; images: number; reason: string }[] = [];
  for (const [i, [uid, entry]] of series.entries()) {
    const m = entry.modality;
    if (m !== modality) {
      skippedSeries.push({ series: i + 1, modality: m, images: entry.files.length, reason: `modality ${m}, not ${modality}${o.modality ? '' : ' (the most common here; choose with --modality)'}` });
      continue;
    }
    const slices: DicomSlice[] = [];
    for (const file of entry.files) {
      try {
        slices.push(readDicomSlice(await readFile(file)));
      } catch (e) {
        if (!(e instanceof DicomError)) throw e;
        skipFile(e.message);
      }
    }
    let volume: DicomVolume;
    try {
      volume = assembleSeries(slices);
    } catch (e) {
      if (!(e instanceof DicomError)) throw e;
      skippedSeries.push({ series: i + 1, modality: m, images: entry.files.length, reason: e.message });
      continue;
    }
    await writeCase(i + 1, uid, slices[0].studyUid, volume);
  }
  if (cases.length > 0) {
    const labelled = cases.some((c) => c.labelled);
    const json = {
      name: 'imported-dicom',
      description: 'converted from DICOM by medfl site import-dicom; class names are placeholders: edit "labels" to name them',
      tensorImageSize: '3D',
      modality: { '0': channelNameOf(modality!) },
      labels: segmentNames.size > 0 ? segmentLabels(segmentNames) : { '0': 'background', '1': 'class 1' },
      numTraining: cases.length,
      numTest: 0,
      ...(labelled ? {} : { note: 'no labels were supplied: every case is in the unlabelled pool until labelsTr/ holds its segmentation' }),
    };
    writeFileAtomic(join(out, 'dataset.json'), `${JSON.stringify(json, null, 2)}\n`);
    if (o.map) writeFileAtomic(o.map, `${mapRows.join('\n')}\n`, 0o600);
  }
  const report: ImportReport = {
    out,
    cases,
    skippedSeries,
    skippedFiles: [...fileReasons].map(([reason, files]) => ({ reason, files })),
    labels: { used: cases.filter((c) => c.labelled).length, unmatched: labelFiles.size + [...segsBySeries.values()].reduce((a, l) => a + l.length, 0), problems: labelProblems },
  };
  // Counts only: the log may leave the site's console; the printed report is for the people importing.
  log?.info({ cases: cases.length, skippedSeries: skippedSeries.length, skippedFiles: [...fileReasons.values()].reduce((a, v) => a + v, 0), labelled: report.labels.used }, 'DICOM import finished');
  return report;
}

/** dataset.json's labels from the segments seen: value N named by its SegmentLabel (or "segment N"). */
function segmentLabels(names: ReadonlyMap<number, string>): Record<string, string> {
  const labels: Record<string, string> = { '0': 'background' };
  for (const n of [...names.keys()].sort((a, b) => a - b)) labels[String(n)] = names.get(n) || `segment ${n}`;
  return labels;
}

/** Lines for the people at the site. */
export function formatImportReport(r: ImportReport): string {
  const fmt = (v: readonly number[], d = 3) => v.map((x) => +x.toFixed(d)).join(' × ');
  const lines = [`imported ${r.cases.length} series into ${r.out}`];
  for (const c of r.cases) lines.push(`  ${c.case}  series ${c.series}  ${c.modality}  ${fmt(c.dims, 0)} voxels  ${fmt(c.spacing)} mm${c.labelled ? '  labelled' : ''}`);
  if (r.skippedSeries.length > 0) {
    lines.push(`skipped ${r.skippedSeries.length} series:`);
    for (const s of r.skippedSeries) lines.push(`  series ${s.series} (${s.modality}, ${s.images} image(s)): ${s.reason}`);
  }
  if (r.skippedFiles.length > 0) {
    lines.push(`files not imported:`);
    for (const f of r.skippedFiles) lines.push(`  ${f.files} file(s): ${f.reason}`);
  }
  if (r.labels.used > 0 || r.labels.unmatched > 0 || r.labels.problems.length > 0) {
    lines.push(`labels: ${r.labels.used} used, ${r.labels.unmatched} matched no imported series`);
    for (const p of r.labels.problems) lines.push(`  ${p}`);
  }
  if (r.cases.length > 0) lines.push('next: edit the class names in dataset.json, then `medfl site check-data` on the folder');
  return `${lines.join('\n')}\n`;
}
