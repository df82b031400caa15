/**
 * From a read, checked, canonical case (case-reader.ts) to a PreparedCase: optional MRI bias-field correction
 * (bias-field.ts), per-channel intensity normalisation (normalize.ts), then resampling to the plan's spacing (resample.ts: trilinear for images,
 * nearest for the label), then the foreground index list the patch sampler draws from (sampler.ts).
 * Normalising before resampling is nnU-Net's order; it keeps the MRI foreground mask (nonzero voxels) exact.
 */
import type { RawCase } from './case-reader.ts';
import { correctBiasField } from './bias-field.ts';
import { normalize, type Modality } from './normalize.ts';
import { resampledShape, resizeLinear, resizeNearest } from './resample.ts';
import { foregroundIndices } from './sampler.ts';
import type { PreparedCase, Shape3 } from './types.ts';

export interface PreprocessOptions {
  /** Target voxel size [D, H, W] in mm (canonical: S, A, R). Absent: keep each case's own spacing. */
  readonly spacing?: Shape3;
  /** Normalisation per channel; a missing entry uses the last one given, or 'mri'. */
  readonly modalities?: readonly Modality[];
  /** CT window [lo, hi] in HU (normalize.ts DEFAULT_CT_WINDOW when absent). */
  readonly ctWindow?: readonly [number, number];
  /** Divide out a fitted bias field (bias-field.ts) from every MRI-type channel before normalising it. */
  readonly biasCorrection?: boolean;
}

export function preprocessCase(id: string, raw: RawCase, opts: PreprocessOptions = {}, classLabel?: number): PreparedCase {
  const mods = opts.modalities ?? [];
  const modality = (i: number): Modality => mods[i] ?? mods[mods.length - 1] ?? 'mri';
  const shape: Shape3 = opts.spacing ? resampledShape(raw.shape, raw.spacing, opts.spacing) : raw.shape;
  const same = shape.every((n, a) => n === raw.shape[a]);
  const channels = raw.channels.map((ch, i) => {
    const m = modality(i);
    const corrected = opts.biasCorrection && (m === 'mri' || m === 'quantile') ? correctBiasField(ch, raw.shape, raw.spacing).image : ch;
    const n = normalize(corrected, m, opts.ctWindow);
    return same ? n : resizeLinear(n, raw.shape, shape);
  });
  const label = raw.label ? (same ? raw.label : resizeNearest(raw.label, raw.shape, shape)) : undefined;
  // Report the spacing actually obtained (rounding the shape changes it slightly).
  const spacing = [0, 1, 2].map((a) => (raw.shape[a] * raw.spacing[a]) / shape[a]) as unknown as Shape3;
  return {
    id,
    shape,
    spacing,
    channels,
    ...(label ? { label, foreground: foregroundIndices(label) } : {}),
    ...(classLabel !== undefined ? { classLabel } : {}),
  };
}
