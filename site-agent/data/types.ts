/**
 * Data types shared by the site data pipeline (reading → preprocessing → sampling → augmentation).
 * Layout everywhere: [D, H, W] with index (z*H + y)*W + x — VolumeCase's layout (shared/model/types.ts) and
 * NIfTI's memory order. After `toCanonical` (orientation.ts) D runs inferior→superior, H posterior→anterior,
 * W left→right, and every spacing below is in the same [D, H, W] order, in mm.
 */

export type Shape3 = readonly [number, number, number];

/** A case after preprocessing (canonical orientation, plan spacing, normalised), ready for patch sampling. */
export interface PreparedCase {
  /** Opaque id ("train-3"); never a path or a file-derived name. */
  readonly id: string;
  readonly shape: Shape3;
  /** Voxel size [D, H, W] in mm after resampling. */
  readonly spacing: Shape3;
  /** One normalised D*H*W volume per input channel (_0000, _0001, …). */
  readonly channels: readonly Float32Array[];
  /** Segmentation label per voxel (class index); absent for unlabelled or classification-only cases. */
  readonly label?: Uint8Array;
  /** Voxel indices with label > 0 (subsampled when there are many), for foreground oversampling. */
  readonly foreground?: Uint32Array;
  /** Case-level class (classification tasks), when given in dataset.json or a CSV. */
  readonly classLabel?: number;
}

/** A training patch: channels-last image and a label on the same grid. */
export interface Patch {
  readonly shape: Shape3;
  readonly channels: number;
  /** D*H*W*C, index ((z*H + y)*W + x)*C + c. */
  readonly image: Float32Array;
  /** D*H*W class indices, same grid as `image`; absent for unlabelled patches. */
  readonly label?: Uint8Array;
  /** The case's class (classification tasks), carried from PreparedCase.classLabel. */
  readonly classLabel?: number;
}

/** Bytes a prepared case holds (what the case cache counts). */
export function preparedBytes(c: PreparedCase): number {
  let n = 0;
  for (const ch of c.channels) n += ch.byteLength;
  if (c.label) n += c.label.byteLength;
  if (c.foreground) n += c.foreground.byteLength;
  return n;
}

export function voxels(s: Shape3): number {
  return s[0] * s[1] * s[2];
}

export function checkShape(s: readonly number[], what: string): void {
  if (s.length !== 3 || s.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new RangeError(`${what} must be 3 positive integers, got [${s.join(', ')}]`);
  }
}
