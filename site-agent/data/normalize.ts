/**
 * Intensity normalisation per modality, applied per channel before patches are cut:
 *   CT      clip to a HU window [lo, hi], then scale linearly to [0, 1] (air below the window is 0).
 *   MRI     z-score with mean and std over the foreground (voxels != 0); voxels outside it are set to 0,
 *           nnU-Net's "use mask for norm". With less than 1 % nonzero voxels the whole volume is used.
 *   none    values kept as read (after scl_slope/scl_inter).
 * Padding added later is 0 in every case, i.e. "outside the body" for both CT and MRI.
 */

export type Modality = 'ct' | 'mri' | 'none';

/** Default CT window [lo, hi] in HU: the abdominal window of methods.md §1.5 (LiTS, [−200, 250]). */
export const DEFAULT_CT_WINDOW: readonly [number, number] = [-200, 250];

/** Modality for a channel name from dataset.json ("CT" → ct; anything else, e.g. "T1", "FLAIR", "MRI" → mri). */
export function modalityOf(channelName: string | undefined): Modality {
  return channelName !== undefined && /^\s*ct\s*$/i.test(channelName) ? 'ct' : 'mri';
}

export function normalizeCt(data: Float32Array, window: readonly [number, number] = DEFAULT_CT_WINDOW): Float32Array {
  const [lo, hi] = window;
  if (!(Number.isFinite(lo) && Number.isFinite(hi) && hi > lo)) throw new RangeError(`CT window must be [lo, hi] with lo < hi, got [${lo}, ${hi}]`);
  const out = new Float32Array(data.length);
  const inv = 1 / (hi - lo);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    out[i] = v <= lo ? 0 : v >= hi ? 1 : (v - lo) * inv;
  }
  return out;
}

export interface ZscoreStats {
  readonly mean: number;
  readonly std: number;
  readonly foregroundVoxels: number;
}

/** z-score over nonzero voxels (see the module comment). */
export function normalizeMri(data: Float32Array): { data: Float32Array; stats: ZscoreStats } {
  let n = 0;
  let sum = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i] !== 0) {
      n++;
      sum += data[i];
    }
  }
  const useMask = n >= 0.01 * data.length && n > 1;
  const count = useMask ? n : data.length;
  if (!useMask) {
    sum = 0;
    for (let i = 0; i < data.length; i++) sum += data[i];
  }
  const mean = sum / Math.max(1, count);
  let ss = 0;
  for (let i = 0; i < data.length; i++) {
    if (!useMask || data[i] !== 0) {
      const d = data[i] - mean;
      ss += d * d;
    }
  }
  const sd = Math.sqrt(ss / Math.max(1, count));
  const std = sd > 1e-8 ? sd : 1;
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) {
    out[i] = useMask && data[i] === 0 ? 0 : (data[i] - mean) / std;
  }
  return { data: out, stats: { mean, std, foregroundVoxels: count } };
}

export function normalize(data: Float32Array, modality: Modality, ctWindow?: readonly [number, number]): Float32Array {
  if (modality === 'ct') return normalizeCt(data, ctWindow);
  if (modality === 'mri') return normalizeMri(data).data;
  return data;
}
