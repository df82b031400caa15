/**
 * Spatial augmentation (nnU-Net's rotation, scaling and elastic deformation), resampled from the WHOLE prepared
 * case around the patch centre rather than from a cropped patch, whose zero borders a rotation would pull in.
 * The image is interpolated trilinearly, the label by nearest neighbour (outside the volume: image 0, label 0,
 * as the plain crop pads). Angles are physical: offsets go through the voxel spacing, so a rotation of an
 * anisotropic case does not shear it.
 *
 * Output voxel o (offset from the patch centre, in voxels) samples the case at
 *   centre + S⁻¹·R·S·(o + d(o)) / zoom
 * with R the rotation (about D, then H, then W), S the spacing, zoom > 1 magnifying, d a smooth displacement
 * field (elastic: random control-point offsets every `elasticGridSpacing` voxels, cubic B-spline between them).
 */
import { mulberry32, uniform, type Rng } from './prng.ts';
import { voxels, type Patch, type PreparedCase, type Shape3 } from './types.ts';

export interface SpatialAugmentOptions {
  /** Probability that a patch is rotated; then each axis gets an angle from `rotationDegrees`. */
  readonly rotationProbability?: number;
  readonly rotationDegrees?: readonly [number, number];
  /** Probability that a patch is scaled (isotropically) by a factor from `zoomRange` (> 1 magnifies). */
  readonly zoomProbability?: number;
  readonly zoomRange?: readonly [number, number];
  /** Probability of an elastic deformation. */
  readonly elasticProbability?: number;
  /** Standard deviation of the control-point displacements, voxels (drawn per patch from this range). */
  readonly elasticDisplacement?: readonly [number, number];
  /** Voxels between control points: larger = smoother deformation. */
  readonly elasticGridSpacing?: number;
}

/** nnU-Net-like: rotation and scaling on a fifth of the patches; elastic off (nnU-Net v2 turned it off). */
export const DEFAULT_SPATIAL: Required<SpatialAugmentOptions> = {
  rotationProbability: 0.2,
  rotationDegrees: [-15, 15],
  zoomProbability: 0.2,
  zoomRange: [0.85, 1.25],
  elasticProbability: 0,
  elasticDisplacement: [1, 3],
  elasticGridSpacing: 8,
};

export interface SpatialParams {
  /** Rotation angles in radians about the D, H and W axes. */
  readonly angles: readonly [number, number, number];
  readonly zoom: number;
  /** Elastic deformation (its field is rebuilt from `seed`); absent = none. */
  readonly elastic?: { readonly sd: number; readonly gridSpacing: number; readonly seed: number };
}

type Vec3 = [number, number, number];
type Mat3 = [number, number, number, number, number, number, number, number, number];

/** Elastic offsets are clipped to this many standard deviations (so their reach is bounded). */
const ELASTIC_CLIP_SD = 3;

function probability(p: number, what: string): number {
  if (!(p >= 0 && p <= 1)) throw new RangeError(`${what} must be a probability in [0, 1], got ${p}`);
  return p;
}

/** Draw the spatial transform of one patch. */
export function drawSpatial(rng: Rng, options: SpatialAugmentOptions = {}): SpatialParams {
  const o = { ...DEFAULT_SPATIAL, ...options };
  const rad = Math.PI / 180;
  const angles: Vec3 = rng() < probability(o.rotationProbability, 'rotationProbability')
    ? [0, 1, 2].map(() => uniform(rng, o.rotationDegrees[0], o.rotationDegrees[1]) * rad) as Vec3
    : [0, 0, 0];
  const zoom = rng() < probability(o.zoomProbability, 'zoomProbability') ? uniform(rng, o.zoomRange[0], o.zoomRange[1]) : 1;
  if (!(zoom > 0)) throw new RangeError(`zoomRange must be positive, got [${o.zoomRange.join(', ')}]`);
  if (!(o.elasticGridSpacing >= 1)) throw new RangeError(`elasticGridSpacing must be ≥ 1 voxel, got ${o.elasticGridSpacing}`);
  const elastic = rng() < probability(o.elasticProbability, 'elasticProbability')
    ? { sd: Math.max(0, uniform(rng, o.elasticDisplacement[0], o.elasticDisplacement[1])), gridSpacing: o.elasticGridSpacing, seed: Math.floor(rng() * 2 ** 32) }
    : undefined;
  return { angles, zoom, ...(elastic && elastic.sd > 0 ? { elastic } : {}) };
}

export function isIdentity(p: SpatialParams): boolean {
  return p.angles.every((a) => a === 0) && p.zoom === 1 && !p.elastic;
}

const mul = (a: Mat3, b: Mat3): Mat3 => {
  const out = new Array(9).fill(0) as Mat3;
  for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) for (let k = 0; k < 3; k++) out[i * 3 + j] += a[i * 3 + k] * b[k * 3 + j];
  return out;
};

/** Source offset per output offset, in voxels: S⁻¹·R·S / zoom. */
export function sourceMatrix(p: SpatialParams, spacing: Shape3): Mat3 {
  const [a, b, c] = p.angles;
  const aboutD: Mat3 = [1, 0, 0, 0, Math.cos(a), -Math.sin(a), 0, Math.sin(a), Math.cos(a)];
  const aboutH: Mat3 = [Math.cos(b), 0, Math.sin(b), 0, 1, 0, -Math.sin(b), 0, Math.cos(b)];
  const aboutW: Mat3 = [Math.cos(c), -Math.sin(c), 0, Math.sin(c), Math.cos(c), 0, 0, 0, 1];
  const r = mul(mul(aboutD, aboutH), aboutW);
  const m = new Array(9) as Mat3;
  for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) m[i * 3 + j] = (r[i * 3 + j] * spacing[j]) / spacing[i] / p.zoom;
  return m;
}

function invert(m: Mat3): Mat3 {
  const [a, b, c, d, e, f, g, h, i] = m;
  const A = e * i - f * h;
  const B = -(d * i - f * g);
  const C = d * h - e * g;
  const det = a * A + b * B + c * C;
  return [A / det, -(b * i - c * h) / det, (b * f - c * e) / det, B / det, (a * i - c * g) / det, -(a * f - c * d) / det, C / det, -(a * h - b * g) / det, (a * e - b * d) / det];
}

/**
 * Where in the case the transform is centred: the plain crop's centre, shifted (if at all) so that a foreground
 * voxel the sampler aimed at stays inside the patch — exactly on an output voxel when there is no elastic field.
 */
export function transformCentre(start: readonly number[], patch: Shape3, p: SpatialParams, spacing: Shape3, foreground?: readonly number[]): Vec3 {
  const half = patch.map((n) => (n - 1) / 2);
  const centre = start.map((s, a) => s + half[a]) as Vec3;
  if (!foreground) return centre;
  const m = sourceMatrix(p, spacing);
  const inv = invert(m);
  const off = foreground.map((f, a) => f - centre[a]);
  const margin = p.elastic ? ELASTIC_CLIP_SD * p.elastic.sd * Math.sqrt(3) + 1 : 0;
  // Output position of the foreground voxel, kept `margin` inside the patch and snapped to a voxel.
  const q = [0, 1, 2].map((a) => {
    const at = half[a] + inv[a * 3] * off[0] + inv[a * 3 + 1] * off[1] + inv[a * 3 + 2] * off[2];
    const lo = Math.min(margin, half[a]);
    return Math.round(Math.min(patch[a] - 1 - lo, Math.max(lo, at))) - half[a];
  });
  return [0, 1, 2].map((a) => foreground[a] - (m[a * 3] * q[0] + m[a * 3 + 1] * q[1] + m[a * 3 + 2] * q[2])) as Vec3;
}

/** Cubic B-spline weights for fraction t of a control interval (control points i−1 … i+2). */
function bspline(t: number, w: Float64Array): void {
  const t2 = t * t;
  const t3 = t2 * t;
  w[0] = (1 - t) ** 3 / 6;
  w[1] = (3 * t3 - 6 * t2 + 4) / 6;
  w[2] = (-3 * t3 + 3 * t2 + 3 * t + 1) / 6;
  w[3] = t3 / 6;
}

/** Interpolates `data` (dims, C-order) along `axis` from control points to `out` samples every 1/g control. */
function upsampleAxis(data: Float32Array, dims: number[], axis: number, outLen: number, g: number): { data: Float32Array; dims: number[] } {
  const outer = dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const n = dims[axis];
  const out = new Float32Array(outer * outLen * inner);
  const w = new Float64Array(4);
  for (let o = 0; o < outLen; o++) {
    const u = o / g;
    const i = Math.floor(u);
    bspline(u - i, w);
    // Control index k + i − 1 + 1 (the grid starts one point before the patch).
    for (let a = 0; a < outer; a++) {
      const dst = (a * outLen + o) * inner;
      for (let k = 0; k < 4; k++) {
        const src = (a * n + i + k) * inner;
        const wk = w[k];
        for (let j = 0; j < inner; j++) out[dst + j] += wk * data[src + j];
      }
    }
  }
  const nd = [...dims];
  nd[axis] = outLen;
  return { data: out, dims: nd };
}

/** A smooth random displacement field [d_D, d_H, d_W] over the patch, voxels, each component within ±3 sd. */
export function elasticField(patch: Shape3, e: NonNullable<SpatialParams['elastic']>): [Float32Array, Float32Array, Float32Array] {
  const rng = mulberry32(e.seed);
  const ctrl = patch.map((n) => Math.floor((n - 1) / e.gridSpacing) + 4);
  const count = ctrl[0] * ctrl[1] * ctrl[2];
  return [0, 1, 2].map(() => {
    const c = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      // Box–Muller, clipped so the field's reach is bounded.
      const g = Math.sqrt(-2 * Math.log(1 - rng())) * Math.cos(2 * Math.PI * rng());
      c[i] = e.sd * Math.max(-ELASTIC_CLIP_SD, Math.min(ELASTIC_CLIP_SD, g));
    }
    let f: { data: Float32Array; dims: number[] } = { data: c, dims: ctrl };
    // W first: each pass then runs long inner loops over the axes already upsampled (≈ 10× faster than D first).
    for (let axis = 2; axis >= 0; axis--) f = upsampleAxis(f.data, f.dims, axis, patch[axis], e.gridSpacing);
    return f.data;
  }) as [Float32Array, Float32Array, Float32Array];
}

/**
 * The patch of `c` under transform `p`, centred at `centre` (case voxel coordinates, fractional allowed; see
 * transformCentre). Channels interleaved last, as extractPatch cuts them.
 */
export function spatialPatch(c: PreparedCase, centre: readonly number[], patch: Shape3, p: SpatialParams): Patch {
  const [D, H, W] = c.shape;
  const HW = H * W;
  const [pd, ph, pw] = patch;
  const C = c.channels.length;
  const image = new Float32Array(voxels(patch) * C);
  const label = c.label ? new Uint8Array(voxels(patch)) : undefined;
  const m = sourceMatrix(p, c.spacing);
  const field = p.elastic ? elasticField(patch, p.elastic) : undefined;
  const [hz, hy, hx] = patch.map((n) => (n - 1) / 2);
  const src = c.channels;
  const lab = c.label;
  let v = 0;
  for (let z = 0; z < pd; z++) {
    for (let y = 0; y < ph; y++) {
      for (let x = 0; x < pw; x++, v++) {
        let oz = z - hz;
        let oy = y - hy;
        let ox = x - hx;
        if (field) {
          oz += field[0][v];
          oy += field[1][v];
          ox += field[2][v];
        }
        const sz = centre[0] + m[0] * oz + m[1] * oy + m[2] * ox;
        const sy = centre[1] + m[3] * oz + m[4] * oy + m[5] * ox;
        const sx = centre[2] + m[6] * oz + m[7] * oy + m[8] * ox;
        if (label) {
          const nz = Math.round(sz);
          const ny = Math.round(sy);
          const nx = Math.round(sx);
          if (nz >= 0 && nz < D && ny >= 0 && ny < H && nx >= 0 && nx < W) label[v] = lab![nz * HW + ny * W + nx];
        }
        const z0 = Math.floor(sz);
        const y0 = Math.floor(sy);
        const x0 = Math.floor(sx);
        if (z0 < -1 || z0 >= D || y0 < -1 || y0 >= H || x0 < -1 || x0 >= W) continue;
        const tz = sz - z0;
        const ty = sy - y0;
        const tx = sx - x0;
        if (z0 >= 0 && z0 < D - 1 && y0 >= 0 && y0 < H - 1 && x0 >= 0 && x0 < W - 1) {
          const i = z0 * HW + y0 * W + x0;
          for (let ch = 0; ch < C; ch++) {
            const s = src[ch];
            const a = s[i] + tx * (s[i + 1] - s[i]);
            const b = s[i + W] + tx * (s[i + W + 1] - s[i + W]);
            const cc = s[i + HW] + tx * (s[i + HW + 1] - s[i + HW]);
            const d = s[i + HW + W] + tx * (s[i + HW + W + 1] - s[i + HW + W]);
            const e = a + ty * (b - a);
            image[v * C + ch] = e + tz * (cc + ty * (d - cc) - e);
          }
          continue;
        }
        // At the border: corners outside the volume count as 0 (the crop's padding).
        for (let ch = 0; ch < C; ch++) {
          const s = src[ch];
          let acc = 0;
          for (let k = 0; k < 8; k++) {
            const zz = z0 + (k >> 2);
            const yy = y0 + ((k >> 1) & 1);
            const xx = x0 + (k & 1);
            if (zz < 0 || zz >= D || yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            const wgt = (k >> 2 ? tz : 1 - tz) * ((k >> 1) & 1 ? ty : 1 - ty) * (k & 1 ? tx : 1 - tx);
            acc += wgt * s[zz * HW + yy * W + xx];
          }
          image[v * C + ch] = acc;
        }
      }
    }
  }
  return { shape: [pd, ph, pw], channels: C, image, ...(label ? { label } : {}) };
}
