/**
 * The corruptions of Models Genesis-style restoration pretraining (Zhou et al. 2019): an encoder–decoder sees a
 * corrupted copy x̃ of an unlabelled patch x and learns to give x back. Each transform is applied with its own
 * probability, in a fixed order, and everything random comes from the caller's rng (a seed fixes the result):
 *
 *   non-linear intensity   a random monotone curve (cubic Bézier through (0,0) and (1,1), as a lookup table) on
 *                          the patch's intensities rescaled to [0, 1], increasing or decreasing with equal odds
 *   local shuffle          voxels shuffled inside many small random blocks (texture without moving anatomy far)
 *   in-painting            a few random boxes filled with uniform noise
 *   out-painting           everything outside a few random boxes filled with uniform noise
 *
 * In- and out-painting exclude each other (one draw decides). Every transform keeps the shape and stays within
 * the patch's own intensity range [min, max], so the decoder never has to restore values it could not know.
 */
import { z } from 'zod';
import { randomInt, type Rng } from '../util/random.ts';

export const RestorationTransformsSchema = z
  .object({
    /** Probability of the non-linear intensity curve. */
    nonLinear: z.number().min(0).max(1).default(0.9),
    /** Probability of local voxel shuffling. */
    localShuffle: z.number().min(0).max(1).default(0.5),
    /** Probability of in-painting (boxes replaced by noise). */
    inPainting: z.number().min(0).max(1).default(0.2),
    /** Probability of out-painting (all but some boxes replaced by noise); inPainting + outPainting ≤ 1. */
    outPainting: z.number().min(0).max(1).default(0.7),
  })
  .strict()
  .refine((t) => t.inPainting + t.outPainting <= 1 + 1e-9, { message: 'inPainting + outPainting must not exceed 1 (one draw picks at most one of them)' });

export type RestorationTransforms = z.infer<typeof RestorationTransformsSchema>;

export const DEFAULT_RESTORATION_TRANSFORMS: RestorationTransforms = RestorationTransformsSchema.parse({});

/** Which transforms a corruption applied (for tests and logs). */
export interface CorruptionApplied {
  nonLinear: boolean;
  localShuffle: boolean;
  painting: 'none' | 'in' | 'out';
}

/** Lookup-table resolution of the intensity curve. */
const CURVE_POINTS = 256;

/**
 * A random monotone map of [0, 1] onto [0, 1] as a lookup table: the cubic Bézier with end points (0,0), (1,1)
 * and two random control points, sampled, sorted by x and made monotone (running maximum) so it never folds.
 */
export function randomIntensityCurve(rng: Rng): Float32Array {
  const [x1, y1, x2, y2] = [rng(), rng(), rng(), rng()];
  const pts: [number, number][] = [];
  for (let i = 0; i <= CURVE_POINTS * 4; i++) {
    const t = i / (CURVE_POINTS * 4);
    // P0 = (0,0) adds nothing; P3 = (1,1) adds t³ to both coordinates.
    const b = 3 * (1 - t) ** 2 * t;
    const c = 3 * (1 - t) * t * t;
    const d = t ** 3;
    pts.push([b * x1 + c * x2 + d, b * y1 + c * y2 + d]);
  }
  pts.sort((p, q) => p[0] - q[0]);
  const lut = new Float32Array(CURVE_POINTS);
  let j = 0;
  let best = 0;
  for (let k = 0; k < CURVE_POINTS; k++) {
    const x = k / (CURVE_POINTS - 1);
    while (j < pts.length - 1 && pts[j + 1][0] <= x) j++;
    best = Math.max(best, Math.min(1, Math.max(0, pts[j][1])));
    lut[k] = best;
  }
  lut[CURVE_POINTS - 1] = 1;
  return lut;
}

function range(image: Float32Array): { min: number; max: number } {
  let min = Infinity;
  let max = -Infinity;
  for (const v of image) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return { min, max };
}

function applyCurve(image: Float32Array, lut: Float32Array, decreasing: boolean, min: number, max: number): void {
  const span = max - min;
  if (!(span > 0)) return;
  const last = lut.length - 1;
  for (let i = 0; i < image.length; i++) {
    const u = (image[i] - min) / span;
    const p = u * last;
    const k = Math.min(last - 1, Math.floor(p));
    const f = lut[k] + (lut[k + 1] - lut[k]) * (p - k);
    image[i] = min + span * (decreasing ? 1 - f : f);
  }
}

/** Shuffles voxels inside random blocks of up to ⅛ of each side; about one block per 32 voxels of the patch. */
function localShuffle(image: Float32Array, shape: readonly [number, number, number], rng: Rng): void {
  const [D, H, W] = shape;
  const maxSide = shape.map((s) => Math.max(1, Math.floor(s / 8)));
  const blocks = Math.max(1, Math.round((D * H * W) / 32));
  const idx: number[] = [];
  const vals: number[] = [];
  for (let b = 0; b < blocks; b++) {
    const [bd, bh, bw] = maxSide.map((m) => 1 + randomInt(rng, m));
    const [z0, y0, x0] = [randomInt(rng, D - bd + 1), randomInt(rng, H - bh + 1), randomInt(rng, W - bw + 1)];
    idx.length = 0;
    for (let z = z0; z < z0 + bd; z++) for (let y = y0; y < y0 + bh; y++) for (let x = x0; x < x0 + bw; x++) idx.push((z * H + y) * W + x);
    vals.length = 0;
    for (const i of idx) vals.push(image[i]);
    for (let i = vals.length - 1; i > 0; i--) {
      const j = randomInt(rng, i + 1);
      [vals[i], vals[j]] = [vals[j], vals[i]];
    }
    idx.forEach((i, k) => { image[i] = vals[k]; });
  }
}

interface Box {
  z0: number;
  y0: number;
  x0: number;
  z1: number;
  y1: number;
  x1: number;
}

/** A random box with each side a fraction in [lo, hi) of the patch side (at least one voxel). */
function randomBox(shape: readonly [number, number, number], lo: number, hi: number, rng: Rng): Box {
  const [s0, s1, s2] = shape.map((s) => Math.max(1, Math.min(s, Math.round(s * (lo + (hi - lo) * rng())))));
  const [D, H, W] = shape;
  const z0 = randomInt(rng, D - s0 + 1);
  const y0 = randomInt(rng, H - s1 + 1);
  const x0 = randomInt(rng, W - s2 + 1);
  return { z0, y0, x0, z1: z0 + s0, y1: y0 + s1, x1: x0 + s2 };
}

function forBox(box: Box, shape: readonly [number, number, number], fn: (i: number) => void): void {
  const [, H, W] = shape;
  for (let z = box.z0; z < box.z1; z++) for (let y = box.y0; y < box.y1; y++) for (let x = box.x0; x < box.x1; x++) fn((z * H + y) * W + x);
}

/** Up to five boxes of ⅙–⅓ of each side filled with uniform noise in [min, max]. */
function inPaint(image: Float32Array, shape: readonly [number, number, number], min: number, max: number, rng: Rng): void {
  const boxes = 1 + randomInt(rng, 5);
  for (let b = 0; b < boxes; b++) forBox(randomBox(shape, 1 / 6, 1 / 3, rng), shape, (i) => { image[i] = min + (max - min) * rng(); });
}

/** Uniform noise everywhere except up to four boxes of ½–⅞ of each side, which keep the original. */
function outPaint(image: Float32Array, shape: readonly [number, number, number], min: number, max: number, rng: Rng): void {
  const original = Float32Array.from(image);
  for (let i = 0; i < image.length; i++) image[i] = min + (max - min) * rng();
  const boxes = 1 + randomInt(rng, 4);
  for (let b = 0; b < boxes; b++) forBox(randomBox(shape, 1 / 2, 7 / 8, rng), shape, (i) => { image[i] = original[i]; });
}

/** The corrupted copy of one single-channel patch [D·H·W] (the input is not changed). */
export function corruptPatch(
  image: Float32Array,
  shape: readonly [number, number, number],
  transforms: RestorationTransforms,
  rng: Rng,
): { image: Float32Array; applied: CorruptionApplied } {
  if (image.length !== shape[0] * shape[1] * shape[2]) throw new Error(`corruptPatch: ${image.length} values for a ${shape.join('×')} patch`);
  const out = Float32Array.from(image);
  const { min, max } = range(image);
  const applied: CorruptionApplied = { nonLinear: false, localShuffle: false, painting: 'none' };
  if (rng() < transforms.nonLinear) {
    applyCurve(out, randomIntensityCurve(rng), rng() < 0.5, min, max);
    applied.nonLinear = true;
  }
  if (rng() < transforms.localShuffle) {
    localShuffle(out, shape, rng);
    applied.localShuffle = true;
  }
  const u = rng();
  if (u < transforms.inPainting) {
    inPaint(out, shape, min, max, rng);
    applied.painting = 'in';
  } else if (u < transforms.inPainting + transforms.outPainting) {
    outPaint(out, shape, min, max, rng);
    applied.painting = 'out';
  }
  return { image: out, applied };
}

/** Corrupts each patch of a batch [N·D·H·W] independently; returns a new array. */
export function corruptBatch(images: Float32Array, batchSize: number, shape: readonly [number, number, number], transforms: RestorationTransforms, rng: Rng): Float32Array {
  const pv = shape[0] * shape[1] * shape[2];
  if (images.length !== batchSize * pv) throw new Error(`corruptBatch: ${images.length} values for ${batchSize} patches of ${shape.join('×')}`);
  const out = new Float32Array(images.length);
  for (let b = 0; b < batchSize; b++) out.set(corruptPatch(images.subarray(b * pv, (b + 1) * pv), shape, transforms, rng).image, b * pv);
  return out;
}
