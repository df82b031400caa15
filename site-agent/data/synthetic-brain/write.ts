/**
 * Store a canonical RAS+ [D, H, W] volume as a NIfTI-1 file in a profile's axis order ("LPS", "ASL", …): the
 * voxels are permuted/flipped and the sform/qform say so, so the project's loader (orientation.ts) brings the
 * case back to exactly the canonical buffer. Images are float32 or int16 (with scl_slope), labels uint8.
 */
import { promisify } from 'node:util';
import { gzip } from 'node:zlib';
import { writeFileAtomic } from '../../../shared/util/fs-atomic.ts';
import { encodeNifti } from '../nifti.ts';
import type { Shape3 } from '../types.ts';

const gzipAsync = promisify(gzip);

interface StoredAxis {
  /** Canonical axis in NIfTI order: 0 = x (R), 1 = y (A), 2 = z (S). */
  readonly world: number;
  readonly flip: boolean;
}

/** Parse "LPS"-style codes into one (world axis, flip) per stored voxel axis; throws unless a permutation. */
export function parseAxcodes(codes: string): StoredAxis[] {
  const table: Record<string, StoredAxis> = {
    R: { world: 0, flip: false }, L: { world: 0, flip: true },
    A: { world: 1, flip: false }, P: { world: 1, flip: true },
    S: { world: 2, flip: false }, I: { world: 2, flip: true },
  };
  const axes = [...codes.toUpperCase()].map((c) => table[c]);
  if (axes.length !== 3 || axes.some((a) => !a) || new Set(axes.map((a) => a.world)).size !== 3) {
    throw new RangeError(`axis codes must name each of R/L, A/P, S/I once, got "${codes}"`);
  }
  return axes;
}

export interface StoredVolume<T extends Float32Array | Uint8Array> {
  readonly data: T;
  /** [X, Y, Z] as stored. */
  readonly dims: [number, number, number];
  readonly spacing: [number, number, number];
  readonly affine: number[][];
}

/** Reorder a canonical buffer into the stored axis order and build the matching affine (brain centre near 0 mm). */
export function toStored<T extends Float32Array | Uint8Array>(data: T, shape: Shape3, spacingMm: Shape3, codes: string): StoredVolume<T> {
  const axes = parseAxcodes(codes);
  const cDims = [shape[2], shape[1], shape[0]]; // canonical [X, Y, Z]
  const cSpacing = [spacingMm[2], spacingMm[1], spacingMm[0]];
  const cStride = [1, cDims[0], cDims[0] * cDims[1]];
  const dims = axes.map((a) => cDims[a.world]) as [number, number, number];
  const spacing = axes.map((a) => cSpacing[a.world]) as [number, number, number];
  let start = 0;
  const step = axes.map((a) => {
    if (a.flip) start += (cDims[a.world] - 1) * cStride[a.world];
    return a.flip ? -cStride[a.world] : cStride[a.world];
  });
  const out = new (data.constructor as { new (n: number): T })(data.length);
  let p = 0;
  for (let k = 0; k < dims[2]; k++) {
    for (let j = 0; j < dims[1]; j++) {
      let s = start + k * step[2] + j * step[1];
      for (let i = 0; i < dims[0]; i++, s += step[0]) out[p++] = data[s];
    }
  }
  // Canonical world: x = (cx − (X−1)/2)·sx etc. A stored axis runs along its world axis, backwards when flipped.
  const affine = [0, 1, 2].map(() => [0, 0, 0, 0]);
  for (let w = 0; w < 3; w++) affine[w][3] = (-(cDims[w] - 1) / 2) * cSpacing[w];
  axes.forEach((a, j) => {
    affine[a.world][j] = (a.flip ? -1 : 1) * cSpacing[a.world];
    if (a.flip) affine[a.world][3] += (cDims[a.world] - 1) * cSpacing[a.world];
  });
  affine.push([0, 0, 0, 1]);
  return { data: out, dims, spacing, affine };
}

export interface WriteOptions {
  readonly datatype: 'float32' | 'int16' | 'uint8';
  /** int16: stored integer × slope = intensity (header scl_slope). */
  readonly slope?: number;
  readonly description?: string;
}

/** Encode and gzip (deterministic: fixed level, no timestamps), then write atomically. */
export async function writeStored(path: string, vol: StoredVolume<Float32Array | Uint8Array>, o: WriteOptions): Promise<void> {
  let data: Float32Array | Uint8Array | Int16Array;
  const slope = o.slope ?? 1;
  if (o.datatype === 'int16') {
    const q = new Int16Array(vol.data.length);
    for (let i = 0; i < q.length; i++) {
      const v = vol.data[i];
      // Rounding must not turn a dim brain voxel into background: keep nonzero voxels at least 1.
      q[i] = v === 0 ? 0 : Math.max(1, Math.min(32767, Math.round(v / slope)));
    }
    data = q;
  } else if (o.datatype === 'uint8') {
    data = vol.data instanceof Uint8Array ? vol.data : Uint8Array.from(vol.data);
  } else {
    data = vol.data instanceof Float32Array ? vol.data : Float32Array.from(vol.data);
  }
  const raw = encodeNifti({ data, dims: vol.dims, spacing: vol.spacing, affine: vol.affine, description: o.description });
  if (o.datatype === 'int16' && slope !== 1) raw.writeFloatLE(slope, 112); // scl_slope; scl_inter stays 0 so background stays 0
  writeFileAtomic(path, await gzipAsync(raw, { level: 6 }));
}
