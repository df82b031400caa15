/**
 * Read one case (every channel and its label) and check it: readable, complete, finite, channels and label on
 * one grid (dims, spacing, affine), label values integral class indices. Every problem is collected (not only
 * the first) with the file it is in. A usable case comes back in canonical RAS+ orientation (orientation.ts)
 * as [D, H, W] buffers with spacing in [D, H, W] order.
 */
import { join } from 'node:path';
import { NiftiError, readNifti, type NiftiVolume } from './nifti.ts';
import { axcodes, toCanonical } from './orientation.ts';
import type { CaseEntry, DataProblem } from './layout.ts';
import type { Shape3 } from './types.ts';

export interface RawCase {
  readonly shape: Shape3;
  readonly spacing: Shape3;
  readonly channels: Float32Array[];
  readonly label?: Uint8Array;
}

/** What check-data prints about a case (from channel 0, as stored in the file). */
export interface CaseInfo {
  /** [X, Y, Z] as stored. */
  readonly dims?: readonly [number, number, number];
  /** [x, y, z] mm as stored. */
  readonly spacing?: readonly [number, number, number];
  readonly axcodes?: string;
  readonly datatype?: string;
  /** Distinct label values found (sorted), when a label was read. */
  readonly labelValues?: number[];
}

export interface ReadCaseResult {
  /** Present only when the case has no error-level problem. */
  readonly raw?: RawCase;
  readonly info: CaseInfo;
  readonly problems: DataProblem[];
}

function sameGrid(a: NiftiVolume, b: NiftiVolume): string | undefined {
  const fmt = (d: readonly number[]): string => d.map((v) => +v.toFixed(4)).join('x');
  if (a.dims.some((d, i) => d !== b.dims[i])) return `grid ${fmt(b.dims)} differs from the image grid ${fmt(a.dims)}`;
  const close = (x: number, y: number): boolean => Math.abs(x - y) <= 1e-3 * Math.max(1, Math.abs(x), Math.abs(y));
  if (a.spacing.some((s, i) => !close(s, b.spacing[i]))) return `spacing ${fmt(b.spacing)} differs from the image spacing ${fmt(a.spacing)}`;
  for (let r = 0; r < 3; r++) {
    for (let c = 0; c < 4; c++) if (!close(a.affine[r][c], b.affine[r][c])) return 'affine (orientation/origin) differs from the image affine';
  }
  return undefined;
}

/** [X, Y, Z] NIfTI order → [D, H, W] = [Z, Y, X]. */
function dhw(v: readonly [number, number, number]): Shape3 {
  return [v[2], v[1], v[0]];
}

export async function readCase(dir: string, entry: CaseEntry, numClasses: number): Promise<ReadCaseResult> {
  const problems: DataProblem[] = [];
  const err = (file: string | undefined, fault: string): void => void problems.push({ severity: 'error', case: entry.name, file, fault });
  const read = async (file: string): Promise<NiftiVolume | undefined> => {
    try {
      return await readNifti(join(dir, file));
    } catch (e) {
      err(file, e instanceof NiftiError ? e.fault : (e as Error).message);
      return undefined;
    }
  };

  const vols: (NiftiVolume | undefined)[] = [];
  for (const f of entry.images) {
    if (f === undefined) {
      vols.push(undefined); // reported by scanDataset
      continue;
    }
    const v = await read(f);
    if (v) {
      let bad = 0;
      for (let i = 0; i < v.data.length; i++) if (!Number.isFinite(v.data[i])) bad++;
      if (bad > 0) err(f, `${bad} non-finite voxel value(s) (NaN/Inf)`);
    }
    vols.push(v);
  }
  const ref = vols.find((v) => v !== undefined);
  const info: { -readonly [K in keyof CaseInfo]: CaseInfo[K] } = {};
  if (ref) Object.assign(info, { dims: ref.dims, spacing: ref.spacing, axcodes: axcodes(ref.affine), datatype: ref.datatype });
  for (let i = 0; i < vols.length; i++) {
    const v = vols[i];
    if (v && ref && v !== ref) {
      const g = sameGrid(ref, v);
      if (g) err(entry.images[i], `channel ${i}: ${g}`);
    }
  }

  let label: Uint8Array | undefined;
  let labelVol: NiftiVolume | undefined;
  if (entry.label !== undefined) {
    labelVol = await read(entry.label);
    if (labelVol) {
      const g = ref ? sameGrid(ref, labelVol) : undefined;
      if (g) err(entry.label, `label ${g}`);
      const values = new Set<number>();
      let fractional = 0;
      for (let i = 0; i < labelVol.data.length; i++) {
        const v = labelVol.data[i];
        const k = Math.round(v);
        if (!(Math.abs(v - k) < 1e-3)) fractional++;
        else if (values.size < 1000) values.add(k);
      }
      info.labelValues = [...values].sort((a, b) => a - b);
      if (fractional > 0) err(entry.label, `${fractional} label voxel(s) are not integers (resampled with interpolation?)`);
      const unknown = info.labelValues.filter((k) => k < 0 || k >= numClasses);
      if (unknown.length > 0) {
        err(entry.label, `unknown label value(s) ${unknown.slice(0, 10).join(', ')}${unknown.length > 10 ? ', …' : ''} (dataset.json has classes 0..${numClasses - 1})`);
      }
    }
  }

  if (problems.length > 0 || !ref || vols.some((v) => v === undefined)) return { info, problems };

  const canon = vols.map((v) => toCanonical(v!));
  const c0 = canon[0];
  if (labelVol) {
    const lc = toCanonical(labelVol);
    label = new Uint8Array(lc.data.length);
    for (let i = 0; i < label.length; i++) label[i] = Math.round(lc.data[i]);
  }
  const raw: RawCase = {
    shape: dhw(c0.dims),
    spacing: dhw(c0.spacing),
    channels: canon.map((c) => c.data),
    ...(label ? { label } : {}),
  };
  return { raw, info, problems };
}
