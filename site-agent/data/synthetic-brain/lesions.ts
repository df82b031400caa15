/**
 * MS-like lesions for a brain phantom (anatomy.ts): 1–6 per case, centred in white matter (a share of them
 * next to a lateral ventricle), each an ellipsoid, a lobulated union of spheres or a noise-deformed blob, with
 * its own contrast. Each lesion is drawn as a partial-volume fraction (a ramp about 1.5 voxels wide across its
 * boundary) so the image blends lesion and tissue at the edge; the label is fraction >= 0.5. Lesions never
 * cover CSF or background (they are parenchymal). Radii are scaled together until the total lesion volume
 * hits a target drawn inside the requested fraction range.
 */
import type { Shape3 } from '../types.ts';
import { deriveSeed, gaussian, mulberry32, randomInt, uniform, type Rng } from '../prng.ts';
import { randomVoxelOf, Tissue, type Anatomy, type Vec3 } from './anatomy.ts';
import { smoothNoise } from './fields.ts';

export interface LesionOptions {
  readonly seed: number;
  /** Lesion intensity over white matter per lesion, e.g. [0.3, 1.0]. */
  readonly contrast: readonly [number, number];
  readonly radiusMm: readonly [number, number];
  readonly count: readonly [number, number];
  /** Total lesion volume / whole-volume voxels. */
  readonly fraction: readonly [number, number];
  readonly periventricularShare: number;
}

export type LesionKind = 'ellipsoid' | 'lobulated' | 'blob';

export interface LesionSpec {
  readonly kind: LesionKind;
  readonly centre: Vec3;
  /** Equivalent-sphere radius in voxels before the volume fit. */
  readonly radius: number;
  readonly contrast: number;
  readonly periventricular: boolean;
  /** ellipsoid: rotation rows and axis ratios (product 1). */
  readonly axes?: { rot: number[][]; ratio: [number, number, number] };
  /** lobulated: extra spheres as (offset in radii, radius in radii). */
  readonly lobes?: { offset: Vec3; r: number }[];
}

export interface LesionMap {
  /** Partial-volume lesion fraction per voxel, 0..1. */
  readonly fraction: Float32Array;
  /** Contrast of the lesion that dominates each voxel (0 where there is none). */
  readonly contrast: Float32Array;
  readonly label: Uint8Array;
  readonly lesions: readonly LesionSpec[];
  /** Labelled voxels. */
  readonly voxels: number;
}

const EDGE_VOXELS = 1.5;

function randomRotation(rng: Rng): number[][] {
  // Gram–Schmidt on two Gaussian vectors: uniform enough for lesion orientation.
  const a = [gaussian(rng), gaussian(rng), gaussian(rng)];
  const na = Math.hypot(a[0], a[1], a[2]) || 1;
  const e1 = a.map((v) => v / na);
  const b = [gaussian(rng), gaussian(rng), gaussian(rng)];
  const dot = b[0] * e1[0] + b[1] * e1[1] + b[2] * e1[2];
  const b2 = b.map((v, i) => v - dot * e1[i]);
  const nb = Math.hypot(b2[0], b2[1], b2[2]) || 1;
  const e2 = b2.map((v) => v / nb);
  const e3 = [e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0]];
  return [e1, e2, e3];
}

function pickCentre(anatomy: Anatomy, rng: Rng, periventricular: boolean): { c: Vec3; periventricular: boolean } | undefined {
  const [, H, W] = anatomy.shape;
  const at = (p: Vec3) => anatomy.tissue[(Math.round(p.z) * H + Math.round(p.y)) * W + Math.round(p.x)];
  const inGrid = (p: Vec3) => [p.z, p.y, p.x].every((v, a) => v >= 0 && Math.round(v) <= anatomy.shape[a] - 1);
  if (periventricular) {
    for (let t = 0; t < 40; t++) {
      const v = anatomy.ventricles[randomInt(rng, anatomy.ventricles.length)];
      const d = { z: gaussian(rng), y: gaussian(rng), x: gaussian(rng) };
      const n = Math.hypot(d.z, d.y, d.x) || 1;
      const k = uniform(rng, 1.15, 1.7);
      const u = { z: v.centre.z + (d.z / n) * v.radii.z * k, y: v.centre.y + (d.y / n) * v.radii.y * k, x: v.centre.x + (d.x / n) * v.radii.x * k };
      const p = anatomy.toVoxel(u);
      if (inGrid(p) && (at(p) === Tissue.white || at(p) === Tissue.cap)) return { c: p, periventricular: true };
    }
  }
  const c = randomVoxelOf(anatomy.tissue, anatomy.shape, rng, Tissue.white);
  return c ? { c, periventricular: false } : undefined;
}

function drawSpec(anatomy: Anatomy, rng: Rng, o: LesionOptions): LesionSpec | undefined {
  const at = pickCentre(anatomy, rng, rng() < o.periventricularShare);
  if (!at) return undefined;
  const [lo, hi] = o.radiusMm;
  const radius = Math.exp(uniform(rng, Math.log(lo), Math.log(hi))) / anatomy.spacingMm;
  const contrast = uniform(rng, o.contrast[0], o.contrast[1]);
  const u = rng();
  const base = { centre: at.c, radius, contrast, periventricular: at.periventricular };
  if (u < 0.4) {
    // Periventricular lesions are often ovoid (elongated); others less so.
    const e = uniform(rng, 1, at.periventricular ? 2.2 : 1.6);
    const f = uniform(rng, 0.8, 1.25);
    const ratio: [number, number, number] = [e, f, 1 / (e * f)];
    return { ...base, kind: 'ellipsoid', axes: { rot: randomRotation(rng), ratio } };
  }
  if (u < 0.7) {
    const lobes = Array.from({ length: 1 + randomInt(rng, 3) }, () => {
      const d = { z: gaussian(rng), y: gaussian(rng), x: gaussian(rng) };
      const n = Math.hypot(d.z, d.y, d.x) || 1;
      const dist = uniform(rng, 0.5, 0.9);
      return { offset: { z: (d.z / n) * dist, y: (d.y / n) * dist, x: (d.x / n) * dist }, r: uniform(rng, 0.4, 0.75) };
    });
    return { ...base, kind: 'lobulated', lobes };
  }
  return { ...base, kind: 'blob' };
}

/** Signed distance (voxels, negative inside) of voxel (z, y, x) to lesion `s` scaled by `scale`. */
function signedDistance(s: LesionSpec, scale: number, z: number, y: number, x: number, blobNoise: number): number {
  const r = s.radius * scale;
  const dz = z - s.centre.z;
  const dy = y - s.centre.y;
  const dx = x - s.centre.x;
  if (s.kind === 'ellipsoid' && s.axes) {
    const { rot, ratio } = s.axes;
    let q = 0;
    for (let a = 0; a < 3; a++) {
      const v = (rot[a][0] * dz + rot[a][1] * dy + rot[a][2] * dx) / (r * ratio[a]);
      q += v * v;
    }
    return (Math.sqrt(q) - 1) * r;
  }
  if (s.kind === 'lobulated' && s.lobes) {
    let best = Math.sqrt(dz * dz + dy * dy + dx * dx) - r;
    for (const l of s.lobes) {
      const ez = dz - l.offset.z * r;
      const ey = dy - l.offset.y * r;
      const ex = dx - l.offset.x * r;
      const d = Math.sqrt(ez * ez + ey * ey + ex * ex) - l.r * r;
      if (d < best) best = d;
    }
    return best;
  }
  return Math.sqrt(dz * dz + dy * dy + dx * dx) - r * (1 + 0.35 * blobNoise);
}

function render(anatomy: Anatomy, specs: readonly LesionSpec[], scale: number, blobNoise: Float32Array, out: { fraction: Float32Array; contrast: Float32Array }): void {
  const [D, H, W] = anatomy.shape;
  const background = Tissue.background;
  const csf = Tissue.csf;
  out.fraction.fill(0);
  out.contrast.fill(0);
  for (const s of specs) {
    const reach = s.radius * scale * 2.6 + EDGE_VOXELS + 1; // covers elongated ellipsoids, lobes and blob bulges
    const z0 = Math.max(0, Math.floor(s.centre.z - reach));
    const z1 = Math.min(D - 1, Math.ceil(s.centre.z + reach));
    const y0 = Math.max(0, Math.floor(s.centre.y - reach));
    const y1 = Math.min(H - 1, Math.ceil(s.centre.y + reach));
    const x0 = Math.max(0, Math.floor(s.centre.x - reach));
    const x1 = Math.min(W - 1, Math.ceil(s.centre.x + reach));
    for (let z = z0; z <= z1; z++) {
      for (let y = y0; y <= y1; y++) {
        for (let x = x0; x <= x1; x++) {
          const k = (z * H + y) * W + x;
          const t = anatomy.tissue[k];
          if (t === background || t === csf) continue;
          const sd = signedDistance(s, scale, z, y, x, blobNoise[k]);
          const f = Math.min(1, Math.max(0, 0.5 - sd / EDGE_VOXELS));
          if (f > out.fraction[k]) {
            out.fraction[k] = f;
            out.contrast[k] = s.contrast;
          }
        }
      }
    }
  }
}

/** Draw and render the lesions of one case; the total labelled volume is fitted into `fraction` when it can be. */
export function placeLesions(anatomy: Anatomy, o: LesionOptions): LesionMap {
  const rng = mulberry32(o.seed);
  const shape: Shape3 = anatomy.shape;
  const total = shape[0] * shape[1] * shape[2];
  const blobNoise = smoothNoise(shape, shape.map((n) => Math.max(1, Math.round((n * anatomy.spacingMm) / 7))) as unknown as Shape3, mulberry32(deriveSeed(o.seed, 1)));
  const n = o.count[0] + randomInt(rng, o.count[1] - o.count[0] + 1);
  const specs: LesionSpec[] = [];
  for (let k = 0; k < n; k++) {
    const s = drawSpec(anatomy, rng, o);
    if (s) specs.push(s);
  }
  // Aim inside the range with a margin: resampling to a site's grid moves the count by a few per cent.
  const [lo, hi] = o.fraction;
  const target = Math.exp(uniform(rng, Math.log(lo * 1.2), Math.log(hi * 0.8))) * total;
  const out = { fraction: new Float32Array(total), contrast: new Float32Array(total) };
  const label = new Uint8Array(total);
  let scale = 1;
  let voxels = 0;
  for (let iter = 0; iter < 10; iter++) {
    render(anatomy, specs, scale, blobNoise, out);
    voxels = 0;
    for (let k = 0; k < total; k++) voxels += out.fraction[k] >= 0.5 ? 1 : 0;
    if (Math.abs(voxels / target - 1) < 0.08) break;
    scale *= voxels === 0 ? 1.6 : Math.min(1.6, Math.max(0.6, Math.cbrt(target / voxels)));
  }
  for (let k = 0; k < total; k++) label[k] = out.fraction[k] >= 0.5 ? 1 : 0;
  return { fraction: out.fraction, contrast: out.contrast, label, lesions: specs, voxels };
}
