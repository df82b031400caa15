/**
 * Bring a NIfTI volume to MedFL's one canonical orientation: RAS+ ("closest canonical", as nibabel's
 * as_closest_canonical does). Voxel axis 0 (x, fastest in memory) then points Right, axis 1 Anterior, axis 2
 * Superior. Axes are only permuted and flipped, never interpolated: an oblique scan keeps its obliquity in the
 * affine and each voxel axis goes to the world axis it is closest to.
 *
 * In VolumeCase terms ([D, H, W] = [Z, Y, X], see nifti.ts) a canonical volume has D running inferior→superior,
 * H posterior→anterior and W left→right, and `spacing` (x, y, z) is permuted with the axes.
 */
import type { NiftiVolume } from './nifti.ts';

export type Vec3 = [number, number, number];

/** For each voxel axis j: the world axis (0 = R/L, 1 = A/P, 2 = S/I) it maps to, and whether it runs backwards. */
export interface AxisOrientation {
  readonly worldAxis: Vec3;
  readonly flip: [boolean, boolean, boolean];
}

const POS = ['R', 'A', 'S'];
const NEG = ['L', 'P', 'I'];

/**
 * Closest world axis for each voxel axis of a 4x4 (or 3x4) affine: greedy on the column-normalised 3x3 part,
 * taking the largest remaining |cosine| first, so the result is always a permutation.
 */
export function axisOrientation(affine: readonly (readonly number[])[]): AxisOrientation {
  const m = [0, 1, 2].map((r) => [0, 1, 2].map((c) => affine[r][c]));
  for (let c = 0; c < 3; c++) {
    const n = Math.hypot(m[0][c], m[1][c], m[2][c]);
    if (!(n > 0) || !Number.isFinite(n)) throw new RangeError(`affine column ${c} is zero or not finite`);
    for (let r = 0; r < 3; r++) m[r][c] /= n;
  }
  const worldAxis: Vec3 = [-1, -1, -1];
  const flip: [boolean, boolean, boolean] = [false, false, false];
  const rowUsed = [false, false, false];
  for (let k = 0; k < 3; k++) {
    let best = -1;
    let br = 0;
    let bc = 0;
    for (let c = 0; c < 3; c++) {
      if (worldAxis[c] >= 0) continue;
      for (let r = 0; r < 3; r++) {
        if (rowUsed[r]) continue;
        const v = Math.abs(m[r][c]);
        if (v > best) [best, br, bc] = [v, r, c];
      }
    }
    worldAxis[bc] = br;
    flip[bc] = m[br][bc] < 0;
    rowUsed[br] = true;
  }
  return { worldAxis, flip };
}

/** Orientation codes such as "LAS" (nibabel's aff2axcodes): where each voxel axis points. */
export function axcodes(affine: readonly (readonly number[])[]): string {
  const o = axisOrientation(affine);
  return o.worldAxis.map((w, j) => (o.flip[j] ? NEG[w] : POS[w])).join('');
}

/**
 * Permute/flip an x-fastest [X, Y, Z] buffer so output axis i is world axis i, positive direction.
 * Returns the new dims and data (a fresh buffer of the same type; the input is left alone).
 */
export function reorientData<T extends Float32Array | Uint8Array>(
  data: T,
  dims: readonly [number, number, number],
  o: AxisOrientation,
): { dims: Vec3; data: T } {
  const strides = [1, dims[0], dims[0] * dims[1]];
  const outDims: Vec3 = [0, 0, 0];
  const step: Vec3 = [0, 0, 0];
  let start = 0;
  for (let j = 0; j < 3; j++) {
    const i = o.worldAxis[j];
    outDims[i] = dims[j];
    step[i] = o.flip[j] ? -strides[j] : strides[j];
    if (o.flip[j]) start += (dims[j] - 1) * strides[j];
  }
  const out = new (data.constructor as { new (n: number): T })(data.length);
  const [nx, ny, nz] = outDims;
  let p = 0;
  for (let z = 0; z < nz; z++) {
    const sz = start + z * step[2];
    for (let y = 0; y < ny; y++) {
      let s = sz + y * step[1];
      const sx = step[0];
      for (let x = 0; x < nx; x++, s += sx) out[p++] = data[s];
    }
  }
  return { dims: outDims, data: out };
}

/** The affine of the reoriented grid: columns permuted and negated, origin moved to the new first voxel. */
export function reorientAffine(
  affine: readonly (readonly number[])[],
  dims: readonly [number, number, number],
  o: AxisOrientation,
): number[][] {
  const out = [0, 1, 2].map(() => [0, 0, 0, 0]);
  for (let r = 0; r < 3; r++) out[r][3] = affine[r][3];
  for (let j = 0; j < 3; j++) {
    const i = o.worldAxis[j];
    const s = o.flip[j] ? -1 : 1;
    for (let r = 0; r < 3; r++) {
      out[r][i] = s * affine[r][j];
      if (o.flip[j]) out[r][3] += (dims[j] - 1) * affine[r][j];
    }
  }
  return [...out, [0, 0, 0, 1]];
}

export interface CanonicalVolume extends NiftiVolume {
  /** Orientation codes of the file as stored ("LAS", "PSL", …); the volume itself is now RAS. */
  readonly sourceAxcodes: string;
}

/** The volume in RAS+ closest-canonical orientation (a no-op copy-free pass when it already is). */
export function toCanonical(vol: NiftiVolume): CanonicalVolume {
  const o = axisOrientation(vol.affine);
  const sourceAxcodes = o.worldAxis.map((w, j) => (o.flip[j] ? NEG[w] : POS[w])).join('');
  if (sourceAxcodes === 'RAS') return { ...vol, sourceAxcodes };
  const { dims, data } = reorientData(vol.data, vol.dims, o);
  const spacing: Vec3 = [0, 0, 0];
  for (let j = 0; j < 3; j++) spacing[o.worldAxis[j]] = vol.spacing[j];
  return { ...vol, dims, data, spacing, affine: reorientAffine(vol.affine, vol.dims, o), sourceAxcodes };
}
