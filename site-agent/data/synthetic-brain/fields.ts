/**
 * Cheap 3D fields for the synthetic brain: smooth random noise (a coarse Gaussian lattice upsampled with
 * smoothstep weights, so it costs a few lookups per voxel instead of a full-resolution filter) and a separable
 * Gaussian blur with its own sigma per axis (the scanner's point-spread function, e.g. thick slices).
 * Layout everywhere: [D, H, W], index (z*H + y)*W + x.
 */
import type { Shape3 } from '../types.ts';
import { gaussian, type Rng } from '../prng.ts';

/** Per-axis lattice cell and smoothstep weight of every voxel coordinate along one axis. */
function axisLookup(n: number, cells: number, offset: number): { i0: Int32Array; w: Float32Array } {
  const i0 = new Int32Array(n);
  const w = new Float32Array(n);
  for (let v = 0; v < n; v++) {
    const t = ((v + 0.5) / n) * cells + offset;
    const f = Math.floor(t);
    const r = t - f;
    i0[v] = f;
    w[v] = r * r * (3 - 2 * r); // smoothstep: no creases at lattice planes
  }
  return { i0, w };
}

/**
 * Smooth noise with about `cells` features per axis, rescaled to zero mean and unit standard deviation over
 * the volume (so amplitudes elsewhere are in "standard deviations" whatever the cell count).
 */
export function smoothNoise(shape: Shape3, cells: Shape3, rng: Rng): Float32Array {
  const [D, H, W] = shape;
  // One extra lattice point per axis plus a random sub-cell offset, so the lattice never lines up with the grid.
  const L = [cells[0] + 2, cells[1] + 2, cells[2] + 2];
  const lattice = new Float32Array(L[0] * L[1] * L[2]);
  for (let i = 0; i < lattice.length; i++) lattice[i] = gaussian(rng);
  const az = axisLookup(D, cells[0], rng());
  const ay = axisLookup(H, cells[1], rng());
  const ax = axisLookup(W, cells[2], rng());
  const out = new Float32Array(D * H * W);
  // Interpolate along z into one lattice plane, then along y into one lattice row, so each voxel costs one lerp.
  const plane = new Float32Array(L[1] * L[2]);
  const row = new Float32Array(L[2]);
  const sZ = L[1] * L[2];
  let p = 0;
  let sum = 0;
  let sumSq = 0;
  for (let z = 0; z < D; z++) {
    const wz = az.w[z];
    const bz = az.i0[z] * sZ;
    for (let j = 0; j < sZ; j++) plane[j] = lattice[bz + j] + (lattice[bz + sZ + j] - lattice[bz + j]) * wz;
    for (let y = 0; y < H; y++) {
      const wy = ay.w[y];
      const by = ay.i0[y] * L[2];
      for (let i = 0; i < L[2]; i++) row[i] = plane[by + i] + (plane[by + L[2] + i] - plane[by + i]) * wy;
      for (let x = 0; x < W; x++, p++) {
        const i = ax.i0[x];
        const v = row[i] + (row[i + 1] - row[i]) * ax.w[x];
        out[p] = v;
        sum += v;
        sumSq += v * v;
      }
    }
  }
  const n = out.length;
  const mean = sum / n;
  const sd = Math.sqrt(Math.max(sumSq / n - mean * mean, 1e-12));
  for (let i = 0; i < n; i++) out[i] = (out[i] - mean) / sd;
  return out;
}

function kernel(sigma: number): Float32Array {
  const r = Math.max(1, Math.ceil(3 * sigma));
  const k = new Float32Array(2 * r + 1);
  let s = 0;
  for (let i = -r; i <= r; i++) {
    const v = Math.exp(-(i * i) / (2 * sigma * sigma));
    k[i + r] = v;
    s += v;
  }
  for (let i = 0; i < k.length; i++) k[i] /= s;
  return k;
}

/** 1D convolution along one axis (stride), edges clamped: no dark rim at the border of the grid. */
function blurAxis(src: Float32Array, dst: Float32Array, shape: Shape3, axis: 0 | 1 | 2, k: Float32Array): void {
  const [D, H, W] = shape;
  const n = [D, H, W][axis];
  const stride = axis === 0 ? H * W : axis === 1 ? W : 1;
  const r = (k.length - 1) >> 1;
  // Iterate over every line along `axis`: the other two indices enumerate line starts.
  const outerA = axis === 0 ? H : D;
  const outerB = axis === 2 ? H : W;
  const strideA = axis === 0 ? W : H * W;
  const strideB = axis === 2 ? W : 1;
  // Each line is copied into a buffer padded with its end values, so the inner loop has no bounds checks.
  const line = new Float32Array(n + 2 * r);
  for (let a = 0; a < outerA; a++) {
    for (let b = 0; b < outerB; b++) {
      const base = a * strideA + b * strideB;
      let any = false;
      for (let i = 0; i < n; i++) {
        const v = src[base + i * stride];
        line[i + r] = v;
        if (v !== 0) any = true;
      }
      if (!any) {
        // Most lines of a skull-stripped head are all background: nothing to spread.
        for (let i = 0; i < n; i++) dst[base + i * stride] = 0;
        continue;
      }
      for (let i = 0; i < r; i++) {
        line[i] = line[r];
        line[n + r + i] = line[n + r - 1];
      }
      for (let i = 0; i < n; i++) {
        let acc = 0;
        for (let j = 0; j < k.length; j++) acc += k[j] * line[i + j];
        dst[base + i * stride] = acc;
      }
    }
  }
}

/** Separable Gaussian blur, sigma in voxels per axis [D, H, W]; sigma < 0.2 skips that axis. Returns a new buffer. */
export function gaussianBlur(src: Float32Array, shape: Shape3, sigma: Shape3): Float32Array {
  let cur = Float32Array.from(src);
  let tmp = new Float32Array(src.length);
  for (const axis of [0, 1, 2] as const) {
    if (!(sigma[axis] >= 0.2)) continue;
    blurAxis(cur, tmp, shape, axis, kernel(sigma[axis]));
    [cur, tmp] = [tmp, cur];
  }
  return cur;
}
