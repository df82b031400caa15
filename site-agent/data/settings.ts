/**
 * The data part of a plan, validated at the edge (zod), and its mapping to SiteDataOptions. Every field has a
 * default, so `DataSettingsSchema.parse({})` is a complete setting. Not yet mounted in the plan
 * (shared/plan/schema.ts): until it is, a trainer can parse `{}` or its own overrides.
 */
import { z } from 'zod';
import type { AugmentOptions } from './augment.ts';
import { DEFAULT_CT_WINDOW } from './normalize.ts';
import { DEFAULT_CACHE_BYTES, type DataLogger, type SiteDataOptions } from './site-data.ts';
import type { Shape3 } from './types.ts';

const positive = z.number().positive();
const prob = z.number().min(0).max(1);
const range = z.tuple([z.number(), z.number()]).refine(([a, b]) => a <= b, { message: 'range must be [low, high]' });

export const AugmentSettingsSchema = z
  .object({
    flipProbability: prob.default(0.5),
    /** Label pairs swapped by a left–right flip (laterality), e.g. [[1, 2]]. */
    leftRightPairs: z.array(z.tuple([z.number().int().min(0).max(255), z.number().int().min(0).max(255)])).default([]),
    scaleProbability: prob.default(0.15),
    scaleRange: range.default([0.75, 1.25]),
    shiftProbability: prob.default(0),
    shiftRange: range.default([-0.1, 0.1]),
    noiseProbability: prob.default(0.1),
    noiseVariance: range.default([0, 0.1]),
  })
  .strict();

export const DataSettingsSchema = z
  .object({
    /** Target voxel size [D, H, W] in mm in canonical RAS+ (D = S, H = A, W = R); absent = each case's own. */
    spacing: z.tuple([positive, positive, positive]).optional(),
    /** auto: CT window for channels dataset.json names "CT", MRI z-score over nonzero voxels for the rest. */
    normalization: z.enum(['auto', 'ct', 'mri', 'none']).default('auto'),
    /** CT window [lo, hi] in HU, scaled to [0, 1]. */
    ctWindow: range.default([DEFAULT_CT_WINDOW[0], DEFAULT_CT_WINDOW[1]]),
    /** Share of training patches forced to contain foreground (nnU-Net: 0.33). */
    foregroundFraction: prob.default(0.33),
    /** Memory for prepared cases, MiB. */
    cacheMiB: positive.default(DEFAULT_CACHE_BYTES / 2 ** 20),
    /** false = no augmentation. */
    augment: z.union([z.literal(false), AugmentSettingsSchema]).default(() => AugmentSettingsSchema.parse({})),
  })
  .strict();

export type DataSettings = z.infer<typeof DataSettingsSchema>;

export function siteDataOptions(settings: DataSettings, patch: Shape3, log?: DataLogger): SiteDataOptions {
  return {
    patch,
    ...(settings.spacing ? { spacing: settings.spacing } : {}),
    normalization: settings.normalization,
    ctWindow: settings.ctWindow,
    foregroundFraction: settings.foregroundFraction,
    cacheBytes: Math.round(settings.cacheMiB * 2 ** 20),
    ...(log ? { log } : {}),
  };
}

export function augmentOptions(settings: DataSettings): AugmentOptions | false {
  return settings.augment;
}
