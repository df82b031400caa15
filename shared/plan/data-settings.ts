/**
 * The plan's `data` section: how every site prepares its scans (spacing, intensity normalisation, patch
 * sampling, augmentation, cache budget). Validated at the edge; every field has a default, so
 * `DataSettingsSchema.parse({})` is a complete setting. Sites map it to their loader in
 * site-agent/data/settings.ts.
 */
import { z } from 'zod';

/** CT window in HU (soft-tissue window), scaled to [0, 1]. */
export const DEFAULT_CT_WINDOW: readonly [number, number] = [-200, 250];
/** Memory for prepared cases at a site. */
export const DEFAULT_CACHE_MIB = 1024;

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
    /** Gamma on the patch rescaled to [0, 1] (range restored), per channel; γ drawn below 1 as often as above. */
    gammaProbability: prob.default(0.3),
    gammaRange: range.refine(([a]) => a > 0, { message: 'gamma must be positive' }).default([0.7, 1.5]),
    /** Rotation about each axis by an angle from rotationDegrees, resampled from the whole case (nnU-Net: 0.2). */
    rotationProbability: prob.default(0.2),
    rotationDegrees: range.default([-15, 15]),
    /** Isotropic spatial scaling (> 1 magnifies); not the intensity `scale` above. */
    zoomProbability: prob.default(0.2),
    zoomRange: range.refine(([a]) => a > 0, { message: 'zoom must be positive' }).default([0.85, 1.25]),
    /** Elastic deformation: control points every elasticGridSpacing voxels, displaced with sd from elasticDisplacement (voxels). */
    elasticProbability: prob.default(0),
    elasticDisplacement: range.refine(([a]) => a >= 0, { message: 'displacement must be ≥ 0' }).default([1, 3]),
    elasticGridSpacing: z.number().min(1).default(8),
    /**
     * Scanner differences (docs/data.md): a smooth bias field of the given largest |log multiplier|, blur of σ voxels
     * along random axes, a coarser grid along random axes (zoom = fineness), contrast about the patch mean.
     */
    biasProbability: prob.default(0),
    biasStrength: range.refine(([a]) => a >= 0, { message: 'bias strength must be ≥ 0' }).default([0.1, 0.4]),
    blurProbability: prob.default(0),
    blurSigma: range.refine(([a]) => a > 0, { message: 'blur σ must be positive' }).default([0.5, 1.5]),
    lowResProbability: prob.default(0),
    lowResZoom: range.refine(([a, b]) => a > 0 && b <= 1, { message: 'zoom must be in (0, 1]' }).default([0.5, 1]),
    contrastProbability: prob.default(0),
    contrastRange: range.refine(([a]) => a > 0, { message: 'contrast factor must be positive' }).default([0.75, 1.25]),
  })
  .strict();

export const DataSettingsSchema = z
  .object({
    /** Target voxel size [D, H, W] in mm in canonical RAS+ (D = S, H = A, W = R); absent = each case's own. */
    spacing: z.tuple([positive, positive, positive]).optional(),
    /**
     * auto: CT window for channels dataset.json names "CT", MRI z-score over nonzero voxels for the rest. quantile:
     * every channel rank-based inverse-normal over its foreground, which removes monotone contrast differences
     * between scanners (docs/data.md).
     */
    normalization: z.enum(['auto', 'ct', 'mri', 'quantile', 'none']).default('auto'),
    /**
     * MRI bias-field correction before normalisation: 'polynomial' fits a smooth multiplicative field (a degree-3
     * polynomial of the log intensity, by N3-style histogram sharpening, no tissue classes) per scan and divides it
     * out (docs/data.md). CT channels are never corrected.
     */
    biasCorrection: z.enum(['none', 'polynomial']).default('none'),
    /** CT window [lo, hi] in HU, scaled to [0, 1]. */
    ctWindow: range.default([DEFAULT_CT_WINDOW[0], DEFAULT_CT_WINDOW[1]]),
    /** Share of training patches forced to contain foreground (nnU-Net: 0.33). */
    foregroundFraction: prob.default(0.33),
    /** Memory for prepared cases, MiB. */
    cacheMiB: positive.default(DEFAULT_CACHE_MIB),
    /** false = no augmentation. */
    augment: z.union([z.literal(false), AugmentSettingsSchema]).default(() => AugmentSettingsSchema.parse({})),
  })
  .strict();

export type DataSettings = z.infer<typeof DataSettingsSchema>;
