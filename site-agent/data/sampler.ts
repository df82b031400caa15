/**
 * Patch sampling with foreground oversampling (nnU-Net style): with probability `foregroundFraction` a patch
 * is placed so that it contains a voxel drawn uniformly from the case's foreground (label > 0), otherwise
 * uniformly at random inside the volume. A volume smaller than the patch is centred and padded with 0 (image)
 * and 0 (label). Everything random comes from the `rng` passed in, so a seed fixes every patch.
 */
import { randomInt, type Rng } from './prng.ts';
import { drawSpatial, isIdentity, spatialPatch, transformCentre, type SpatialAugmentOptions } from './spatial-augment.ts';
import { checkShape, voxels, type Patch, type PreparedCase, type Shape3 } from './types.ts';

export interface SampleOptions {
  /** Patch shape [D, H, W]. */
  readonly patch: Shape3;
  /** Share of patches forced to contain foreground; nnU-Net uses 0.33. */
  readonly foregroundFraction?: number;
  /**
   * Rotation / zoom / elastic deformation, resampled from the whole case about the patch centre (spatial-augment.ts);
   * absent = plain crops.
   */
  readonly spatial?: SpatialAugmentOptions;
}

/** At most this many foreground voxel indices are kept per case (evenly strided). */
export const MAX_FOREGROUND_INDICES = 20_000;

/** Indices of label > 0 voxels, evenly subsampled to at most `max`. */
export function foregroundIndices(label: Uint8Array, max = MAX_FOREGROUND_INDICES): Uint32Array {
  let n = 0;
  for (let i = 0; i < label.length; i++) if (label[i] > 0) n++;
  const stride = Math.max(1, Math.ceil(n / max));
  const out = new Uint32Array(Math.ceil(n / stride));
  for (let i = 0, k = 0, j = 0; i < label.length; i++) {
    if (label[i] > 0) {
      if (k % stride === 0) out[j++] = i;
      k++;
    }
  }
  return out;
}

/** Start of a window of `p` voxels on an axis of `n` voxels that contains `c` (clamped inside when n ≥ p). */
function startAround(c: number, n: number, p: number): number {
  if (n <= p) return Math.floor((n - p) / 2);
  return Math.min(n - p, Math.max(0, c - Math.floor(p / 2)));
}

/** Where to cut a patch: its start corner [z, y, x] (negative = padding before the volume). */
export function choosePatchStart(c: PreparedCase, opts: SampleOptions, rng: Rng): [number, number, number] {
  return placePatch(c, opts, rng).start;
}

/** The start corner, and the foreground voxel [z, y, x] the patch was placed around (when it was). */
function placePatch(c: PreparedCase, opts: SampleOptions, rng: Rng): { start: [number, number, number]; foreground?: [number, number, number] } {
  const p = opts.patch;
  const fgShare = opts.foregroundFraction ?? 0.33;
  const fg = c.foreground;
  if (fg && fg.length > 0 && rng() < fgShare) {
    const idx = fg[randomInt(rng, fg.length)];
    const [, H, W] = c.shape;
    const x = idx % W;
    const y = Math.floor(idx / W) % H;
    const z = Math.floor(idx / (W * H));
    return { start: [startAround(z, c.shape[0], p[0]), startAround(y, c.shape[1], p[1]), startAround(x, c.shape[2], p[2])], foreground: [z, y, x] };
  }
  const start = [0, 1, 2].map((a) => {
    const n = c.shape[a];
    return n <= p[a] ? Math.floor((n - p[a]) / 2) : randomInt(rng, n - p[a] + 1);
  }) as [number, number, number];
  return { start };
}

/** Cut the patch starting at `start` (channels interleaved last), padding outside the volume with 0. */
export function extractPatch(c: PreparedCase, start: readonly [number, number, number], patch: Shape3): Patch {
  checkShape(patch, 'patch');
  const [D, H, W] = c.shape;
  const [d, h, w] = patch;
  const C = c.channels.length;
  const image = new Float32Array(voxels(patch) * C);
  const label = c.label ? new Uint8Array(voxels(patch)) : undefined;
  const [z0, y0, x0] = start;
  const xa = Math.max(0, -x0);
  const xb = Math.min(w, W - x0);
  for (let z = 0; z < d; z++) {
    const sz = z + z0;
    if (sz < 0 || sz >= D) continue;
    for (let y = 0; y < h; y++) {
      const sy = y + y0;
      if (sy < 0 || sy >= H) continue;
      const sRow = (sz * H + sy) * W + x0;
      const dRow = (z * h + y) * w;
      for (let ch = 0; ch < C; ch++) {
        const src = c.channels[ch];
        for (let x = xa; x < xb; x++) image[(dRow + x) * C + ch] = src[sRow + x];
      }
      if (label) label.set(c.label!.subarray(sRow + xa, sRow + xb), dRow + xa);
    }
  }
  return { shape: [d, h, w], channels: C, image, ...(label ? { label } : {}) };
}

/**
 * One random patch of a case (see the module comment); with `spatial`, transformed about its centre, a
 * foreground patch keeping the voxel it was placed around.
 */
export function samplePatch(c: PreparedCase, opts: SampleOptions, rng: Rng): Patch {
  const { start, foreground } = placePatch(c, opts, rng);
  if (!opts.spatial) return extractPatch(c, start, opts.patch);
  const t = drawSpatial(rng, opts.spatial);
  if (isIdentity(t)) return extractPatch(c, start, opts.patch);
  return spatialPatch(c, transformCentre(start, opts.patch, t, c.spacing, foreground), opts.patch, t);
}

/** The centred patch (deterministic; for validation). */
export function centrePatch(c: PreparedCase, patch: Shape3): Patch {
  const start = [0, 1, 2].map((a) => Math.floor((c.shape[a] - patch[a]) / 2)) as [number, number, number];
  return extractPatch(c, start, patch);
}
