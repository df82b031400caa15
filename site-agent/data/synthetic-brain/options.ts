/**
 * Options of the synthetic brain-lesion benchmark, validated with zod at the edge (CLI flags and library
 * callers alike). Every field has a default; the "knobs" are the difficulty controls docs/benchmark.md explains.
 */
import { z } from 'zod';

const range = (lo: number, hi: number) =>
  z
    .tuple([z.number().min(lo).max(hi), z.number().min(lo).max(hi)])
    .refine(([a, b]) => a <= b, { message: 'range must be [low, high] with low <= high' });

export const KnobsSchema = z.object({
  /** Lesion brightness over white matter in the phantom's tissue units, per lesion: 0.35 = 35 % brighter. */
  lesionContrast: range(0, 5).default([0.35, 1.0]),
  /** Starting lesion radius in mm (equivalent sphere); radii are then scaled together to meet lesionFraction. */
  lesionRadiusMm: range(0.5, 40).default([3, 12]),
  /** Lesions per case. */
  lesionCount: range(1, 20).default([1, 6]),
  /** Total lesion volume as a fraction of the whole volume (checked on the written grid; cases are redrawn to meet it). */
  lesionFraction: range(0.0001, 0.2).default([0.001, 0.01]),
  /** Share of lesions centred next to a lateral ventricle (MS-like periventricular lesions). */
  periventricularShare: z.number().min(0).max(1).default(0.5),
  /** Unlabelled bright look-alikes: 0 = none, 1 = default (periventricular caps, vessels, dots), 2 = twice as many/strong. */
  distractors: z.number().min(0).max(4).default(1),
  /** Multiplies every site profile's noise level. */
  noiseScale: z.number().min(0).max(10).default(1),
  /** Multiplies every site profile's bias-field strength. */
  biasScale: z.number().min(0).max(10).default(1),
  /** Multiplies every site profile's blur (point-spread function) width. */
  blurScale: z.number().min(0).max(10).default(1),
  /** Within-tissue texture amplitude (1 = about 4 % of the tissue intensity). */
  textureScale: z.number().min(0).max(10).default(1),
});

export type BenchmarkKnobs = z.infer<typeof KnobsSchema>;

export const BenchmarkOptionsSchema = z
  .object({
    seed: z.number().int().min(0).max(2 ** 32 - 1).default(1),
    /** Number of sites; site i uses scanner profile i mod the number of profiles. */
    sites: z.number().int().min(1).max(26).default(3),
    /** Labelled training cases per site (imagesTr + labelsTr). */
    labelled: z.number().int().min(1).max(1000).default(12),
    /** Unlabelled cases per site (imagesTr without a label: the pool). */
    unlabelled: z.number().int().min(0).max(1000).default(6),
    /** Test subjects per site profile, all written to the shared test folder. */
    testPerSite: z.number().int().min(0).max(1000).default(3),
    /** Phantom grid [D, H, W] (inferior→superior, posterior→anterior, left→right) before any site resampling. */
    shape: z.tuple([z.number().int().min(24).max(512), z.number().int().min(24).max(512), z.number().int().min(24).max(512)]).default([80, 96, 80]),
    /** Isotropic phantom voxel size in mm (a profile may write its cases on a coarser grid). */
    spacingMm: z.number().positive().max(20).default(2),
    /** Replace the image/label folders of an earlier run in the same place (otherwise a non-empty target is refused). */
    overwrite: z.boolean().default(false),
    knobs: KnobsSchema.default(KnobsSchema.parse({})),
  })
  .strict();

export type BenchmarkOptions = z.infer<typeof BenchmarkOptionsSchema>;
export type BenchmarkOptionsInput = z.input<typeof BenchmarkOptionsSchema>;
