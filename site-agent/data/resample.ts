/**
 * Resampling a D*H*W volume to a target voxel spacing: trilinear for images, nearest neighbour for labels.
 * Grids are aligned on their outer edges (the volume keeps its physical extent; voxel centres at
 * (i + 0.5)·n/n′ − 0.5 in source voxels, clamped at the border), the convention of scikit-image's resize
 * that nnU-Net uses. Trilinear is done separably (W, then H, then D), which is the same interpolant.
 */
import { checkShape, type Shape3 } from './types.ts';

/** Output shape for `shape` at `spacing` resampled to `target` (both [D, H, W] mm): round(n·s/t), at least 1. */
export function resampledShape(shape: Shape3, spacing: Shape3, target: Shape3): [number, number, number] {
  return [0, 1, 2].map((a) => Math.max(1, Math.round((shape[a] * spacing[a]) / target[a]))) as [number, number, number];
}

interface Axis {
  readonly i0: Int32Array;
  readonly i1: Int32Array;
  readonly w: Float32Array;
}

function axisTable(n: number, m: number): Axis {
  const i0 = new Int32Array(m);
  const i1 = new Int32Array(m);
  const w = new Float32Array(m);
  const scale = n / m;
  for (let i = 0; i < m; i++) {
    const c = Math.min(n - 1, Math.max(0, (i + 0.5) * scale - 0.5));
    const f = Math.floor(c);
    i0[i] = f;
    i1[i] = Math.min(n - 1, f + 1);
    w[i] = c - f;
  }
  return { i0, i1, w };
}

function nearestTable(n: number, m: number): Int32Array {
  const t = new Int32Array(m);
  const scale = n / m;
  for (let i = 0; i < m; i++) t[i] = Math.min(n - 1, Math.max(0, Math.round((i + 0.5) * scale - 0.5)));
  return t;
}

/** Trilinear resize of a float volume to `out` voxels per axis. */
export function resizeLinear(src: Float32Array, shape: Shape3, out: Shape3): Float32Array {
  checkShape(shape, 'shape');
  checkShape(out, 'output shape');
  const [D, H, W] = shape;
  const [d, h, w] = out;
  if (src.length !== D * H * W) throw new RangeError(`volume has ${src.length} voxels, shape needs ${D * H * W}`);
  if (D === d && H === h && W === w) return src.slice();
  // Pass 1: along W -> D*H*w
  const ax = axisTable(W, w);
  const a = new Float32Array(D * H * w);
  for (let r = 0; r < D * H; r++) {
    const s = r * W;
    const o = r * w;
    for (let x = 0; x < w; x++) {
      const v0 = src[s + ax.i0[x]];
      a[o + x] = v0 + (src[s + ax.i1[x]] - v0) * ax.w[x];
    }
  }
  // Pass 2: along H -> D*h*w
  const ay = axisTable(H, h);
  const b = new Float32Array(D * h * w);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < h; y++) {
      const r0 = (z * H + ay.i0[y]) * w;
      const r1 = (z * H + ay.i1[y]) * w;
      const o = (z * h + y) * w;
      const t = ay.w[y];
      for (let x = 0; x < w; x++) b[o + x] = a[r0 + x] + (a[r1 + x] - a[r0 + x]) * t;
    }
  }
  // Pass 3: along D -> d*h*w
  const az = axisTable(D, d);
  const c = new Float32Array(d * h * w);
  const plane = h * w;
  for (let z = 0; z < d; z++) {
    const p0 = az.i0[z] * plane;
    const p1 = az.i1[z] * plane;
    const o = z * plane;
    const t = az.w[z];
    for (let i = 0; i < plane; i++) c[o + i] = b[p0 + i] + (b[p1 + i] - b[p0 + i]) * t;
  }
  return c;
}

/** Nearest-neighbour resize of a label volume: every output value is one of the input values. */
export function resizeNearest(src: Uint8Array, shape: Shape3, out: Shape3): Uint8Array {
  checkShape(shape, 'shape');
  checkShape(out, 'output shape');
  const [D, H, W] = shape;
  const [d, h, w] = out;
  if (src.length !== D * H * W) throw new RangeError(`volume has ${src.length} voxels, shape needs ${D * H * W}`);
  const tz = nearestTable(D, d);
  const ty = nearestTable(H, h);
  const tx = nearestTable(W, w);
  const dst = new Uint8Array(d * h * w);
  let p = 0;
  for (let z = 0; z < d; z++) {
    for (let y = 0; y < h; y++) {
      const s = (tz[z] * H + ty[y]) * W;
      for (let x = 0; x < w; x++) dst[p++] = src[s + tx[x]];
    }
  }
  return dst;
}

/** Resample an image to `target` spacing (trilinear). Returns the new shape with the data. */
export function resampleImage(src: Float32Array, shape: Shape3, spacing: Shape3, target: Shape3): { shape: Shape3; data: Float32Array } {
  const out = resampledShape(shape, spacing, target);
  return { shape: out, data: resizeLinear(src, shape, out) };
}

/** Resample a label map to `target` spacing (nearest). */
export function resampleLabel(src: Uint8Array, shape: Shape3, spacing: Shape3, target: Shape3): { shape: Shape3; data: Uint8Array } {
  const out = resampledShape(shape, spacing, target);
  return { shape: out, data: resizeNearest(src, shape, out) };
}
