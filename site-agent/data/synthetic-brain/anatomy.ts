/**
 * A skull-stripped brain phantom on an isotropic grid, as a tissue-class map plus texture.
 *
 * Geometry lives in "head coordinates" u: the voxel position relative to the brain centre, rotated by a small
 * random rotation and divided by the brain radii, so |u| = 1 is the (undeformed) brain surface whatever the
 * grid. Every structure is placed in u and then deformed by smooth noise, so cases differ in size, shape,
 * position and pose, and the phantom scales with the grid (a 48-voxel test grid is a coarse 80-voxel brain).
 *   - brain: ellipsoid, anterior narrower and inferior flatter, radius modulated by low-frequency noise;
 *   - cortex: a grey-matter ribbon whose inner boundary is modulated by 3D noise (folding), sulcal CSF wedges
 *     cutting in from the surface lined by grey matter, a thin outer CSF shell, the interhemispheric fissure;
 *   - lateral ventricles: two bent, noise-deformed ellipsoids near the centre (size varies: "atrophy"), a thin
 *     third ventricle, deep grey nuclei lateral to them;
 *   - unlabelled bright distractors: periventricular caps at the ventricle horns and a rim along them,
 *     vessel-like tubes (random walks) and a few bright dots.
 * Tissue intensities are not decided here (profiles.ts maps the tissue property to a scanner's contrast).
 */
import type { Shape3 } from '../types.ts';
import { deriveSeed, gaussian, mulberry32, uniform, type Rng } from '../prng.ts';
import { smoothNoise } from './fields.ts';

export const Tissue = { background: 0, csf: 1, grey: 2, white: 3, deepGrey: 4, cap: 5, vessel: 6 } as const;
export type TissueClass = (typeof Tissue)[keyof typeof Tissue];

/**
 * FLAIR-like tissue property per class (index = Tissue value), before a scanner's contrast curve: CSF
 * suppressed, white matter darker than grey matter, caps and vessels bright enough to pass for lesions.
 */
export const TISSUE_PROPERTY: readonly number[] = [0, 0.15, 0.68, 0.5, 0.6, 0.8, 0.92];

export interface Vec3 {
  z: number;
  y: number;
  x: number;
}

export interface Anatomy {
  readonly shape: Shape3;
  readonly spacingMm: number;
  readonly tissue: Uint8Array;
  /** Smooth unit-SD noise used as within-tissue texture. */
  readonly texture: Float32Array;
  /** Voxels inside the brain (tissue > 0). */
  readonly brainVoxels: number;
  /** Ventricle centres and radii in head coordinates (for periventricular lesion placement). */
  readonly ventricles: readonly { centre: Vec3; radii: Vec3 }[];
  /** Head coordinates → voxel coordinates. */
  toVoxel(u: Vec3): Vec3;
}

export interface AnatomyOptions {
  readonly shape: Shape3;
  readonly spacingMm: number;
  readonly seed: number;
  /** 0 = no distractors, 1 = default. */
  readonly distractors: number;
}

/** Noise cells for features of about `mm` millimetres on this grid. */
function cellsFor(shape: Shape3, spacingMm: number, mm: number): Shape3 {
  return [0, 1, 2].map((a) => Math.max(1, Math.round((shape[a] * spacingMm) / mm))) as unknown as Shape3;
}

/** Rotation matrix (rows) from three small angles, acting on [z, y, x] vectors. */
function rotation(a: number, b: number, c: number): number[][] {
  const [ca, sa, cb, sb, cc, sc] = [Math.cos(a), Math.sin(a), Math.cos(b), Math.sin(b), Math.cos(c), Math.sin(c)];
  const rx = [[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]]; // about x: mixes z and y
  const ry = [[cb, 0, -sb], [0, 1, 0], [sb, 0, cb]]; // about y: mixes z and x
  const rz = [[1, 0, 0], [0, cc, -sc], [0, sc, cc]]; // about z: mixes y and x
  const mul = (p: number[][], q: number[][]) => p.map((row) => [0, 1, 2].map((j) => row[0] * q[0][j] + row[1] * q[1][j] + row[2] * q[2][j]));
  return mul(mul(rx, ry), rz);
}

export function makeAnatomy(opts: AnatomyOptions): Anatomy {
  const { shape, spacingMm } = opts;
  const [D, H, W] = shape;
  const rng = mulberry32(opts.seed);
  const noise = (mm: number, k: number) => smoothNoise(shape, cellsFor(shape, spacingMm, mm), mulberry32(deriveSeed(opts.seed, k)));
  const shapeNoise = noise(60, 1);
  const foldNoise = noise(14, 2);
  const sulcNoise = noise(11, 3);
  const deepNoise = noise(25, 4);
  const texture = noise(9, 5);

  // Brain pose: radii as fractions of the grid (≈ 60 × 82 × 64 mm half-axes on the default 160 × 192 × 160 mm grid).
  const centre = { z: (D - 1) / 2 + uniform(rng, -0.04, 0.04) * D, y: (H - 1) / 2 + uniform(rng, -0.04, 0.04) * H, x: (W - 1) / 2 + uniform(rng, -0.03, 0.03) * W };
  const radii = { z: 0.37 * D * uniform(rng, 0.92, 1.06), y: 0.42 * H * uniform(rng, 0.92, 1.06), x: 0.4 * W * uniform(rng, 0.92, 1.06) };
  const R = rotation(uniform(rng, -0.1, 0.1), uniform(rng, -0.06, 0.06), uniform(rng, -0.06, 0.06));
  const shapeAmp = uniform(rng, 0.03, 0.06);
  const gmDepth = uniform(rng, 0.1, 0.13);
  const foldAmp = uniform(rng, 0.4, 0.7);

  const atrophy = uniform(rng, 0.85, 1.35);
  const ventShift = uniform(rng, -0.02, 0.02);
  const ventricles = [-1, 1].map((side) => ({
    centre: { z: 0.12 + uniform(rng, -0.02, 0.02), y: ventShift + uniform(rng, -0.03, 0.03), x: side * (0.1 + 0.02 * (atrophy - 1)) },
    radii: { z: 0.14 * atrophy * uniform(rng, 0.92, 1.08), y: 0.36 * uniform(rng, 0.92, 1.08), x: 0.075 * atrophy ** 1.5 * uniform(rng, 0.9, 1.1) },
  }));
  const deep = [-1, 1].map((side) => ({
    centre: { z: -0.03 + uniform(rng, -0.02, 0.02), y: -0.03 + uniform(rng, -0.03, 0.03), x: side * uniform(rng, 0.25, 0.29) },
    radii: { z: 0.2 * uniform(rng, 0.9, 1.1), y: 0.28 * uniform(rng, 0.9, 1.1), x: 0.12 * uniform(rng, 0.9, 1.1) },
  }));
  const capScale = Math.min(opts.distractors, 2);
  const capReach = 0.35 * capScale * uniform(rng, 0.7, 1.3);
  const rimReach = 0.1 * capScale;

  const tissue = new Uint8Array(D * H * W);
  let i = 0;
  for (let z = 0; z < D; z++) {
    const dz = z - centre.z;
    for (let y = 0; y < H; y++) {
      const dy = y - centre.y;
      for (let x = 0; x < W; x++, i++) {
        const dx = x - centre.x;
        const uz = (R[0][0] * dz + R[0][1] * dy + R[0][2] * dx) / radii.z;
        const uy = (R[1][0] * dz + R[1][1] * dy + R[1][2] * dx) / radii.y;
        const ux = (R[2][0] * dz + R[2][1] * dy + R[2][2] * dx) / radii.x;
        // Anterior narrower, inferior flatter: an egg rather than a rugby ball.
        const ex = ux * (1 + 0.12 * uy);
        const ez = uz < 0 ? uz * 1.15 : uz;
        const q = Math.sqrt(ez * ez + uy * uy + ex * ex) / (1 + shapeAmp * shapeNoise[i]);
        if (q >= 1) continue;
        const depth = 1 - q;

        let cls: TissueClass = Tissue.white;
        let deepHit = false;
        for (const v of ventricles) {
          const wy = (uy - v.centre.y) / v.radii.y;
          const wz = (uz - (v.centre.z - 0.08 * wy * wy)) / v.radii.z; // bent down towards the horns
          const wx = (ux - v.centre.x) / v.radii.x;
          const qv = Math.sqrt(wz * wz + wy * wy + wx * wx) / (1 + 0.12 * deepNoise[i]);
          if (qv < 1) {
            cls = Tissue.csf;
            deepHit = true;
            break;
          }
          if ((Math.abs(wy) > 0.5 && qv < 1 + capReach) || qv < 1 + rimReach) {
            cls = Tissue.cap;
            deepHit = true;
          }
        }
        if (!deepHit) {
          if (Math.abs(ux) < 0.02 && uz > -0.12 && uz < 0.08 && Math.abs(uy) < 0.12) {
            cls = Tissue.csf; // third ventricle
            deepHit = true;
          } else {
            for (const g of deep) {
              const gz = (uz - g.centre.z) / g.radii.z;
              const gy = (uy - g.centre.y) / g.radii.y;
              const gx = (ux - g.centre.x) / g.radii.x;
              if (Math.sqrt(gz * gz + gy * gy + gx * gx) < 1 + 0.15 * deepNoise[i]) {
                cls = Tissue.deepGrey;
                deepHit = true;
                break;
              }
            }
          }
        }
        if (!deepHit) {
          const s = sulcNoise[i];
          const fissure = uz > 0.3 || Math.abs(uy) > 0.55;
          if (depth < 0.025 || s > 0.9 + 6 * depth || (fissure && Math.abs(ux) < 0.025)) cls = Tissue.csf;
          else if (depth < gmDepth * Math.min(1.7, Math.max(0.35, 1 + foldAmp * foldNoise[i])) || s > 0.3 + 6 * depth || (fissure && Math.abs(ux) < 0.08)) cls = Tissue.grey;
        }
        tissue[i] = cls;
      }
    }
  }

  const toVoxel = (u: Vec3): Vec3 => {
    // Inverse of the forward map: p = centre + Rᵀ (u ⊙ radii).
    const a = [u.z * radii.z, u.y * radii.y, u.x * radii.x];
    return {
      z: centre.z + R[0][0] * a[0] + R[1][0] * a[1] + R[2][0] * a[2],
      y: centre.y + R[0][1] * a[0] + R[1][1] * a[1] + R[2][1] * a[2],
      x: centre.x + R[0][2] * a[0] + R[1][2] * a[1] + R[2][2] * a[2],
    };
  };

  addVessels(tissue, shape, spacingMm, mulberry32(deriveSeed(opts.seed, 6)), opts.distractors);
  let brainVoxels = 0;
  for (let k = 0; k < tissue.length; k++) if (tissue[k] !== Tissue.background) brainVoxels++;
  return { shape, spacingMm, tissue, texture, brainVoxels, ventricles, toVoxel };
}

/** Stamp a ball of `cls` (only over brain voxels: vessels never leave the skull-stripped mask). */
function stampBall(tissue: Uint8Array, shape: Shape3, c: Vec3, r: number, cls: TissueClass): void {
  const [D, H, W] = shape;
  const r2 = r * r;
  const rr = Math.ceil(r);
  for (let z = Math.max(0, Math.floor(c.z - rr)); z <= Math.min(D - 1, Math.ceil(c.z + rr)); z++) {
    for (let y = Math.max(0, Math.floor(c.y - rr)); y <= Math.min(H - 1, Math.ceil(c.y + rr)); y++) {
      for (let x = Math.max(0, Math.floor(c.x - rr)); x <= Math.min(W - 1, Math.ceil(c.x + rr)); x++) {
        const d2 = (z - c.z) ** 2 + (y - c.y) ** 2 + (x - c.x) ** 2;
        const k = (z * H + y) * W + x;
        if (d2 <= r2 && tissue[k] !== Tissue.background) tissue[k] = cls;
      }
    }
  }
}

/** A random brain voxel (rejection sampling), optionally restricted to one class. */
export function randomVoxelOf(tissue: Uint8Array, shape: Shape3, rng: Rng, cls?: TissueClass): Vec3 | undefined {
  const [D, H, W] = shape;
  for (let t = 0; t < 2000; t++) {
    const z = Math.floor(rng() * D);
    const y = Math.floor(rng() * H);
    const x = Math.floor(rng() * W);
    const v = tissue[(z * H + y) * W + x];
    if (cls === undefined ? v !== Tissue.background : v === cls) return { z, y, x };
  }
  return undefined;
}

/** Vessel-like bright tubes (smooth random walks about 1 voxel thick) and a few bright dots, all unlabelled. */
function addVessels(tissue: Uint8Array, shape: Shape3, spacingMm: number, rng: Rng, amount: number): void {
  const [D, H, W] = shape;
  const tubes = Math.round(amount * uniform(rng, 4, 10));
  const mmToVox = 1 / spacingMm;
  for (let t = 0; t < tubes; t++) {
    const start = randomVoxelOf(tissue, shape, rng);
    if (!start) return;
    let p = { ...start };
    let d = { z: gaussian(rng), y: gaussian(rng), x: gaussian(rng) };
    const radius = Math.max(0.6, uniform(rng, 1.2, 2.4) * mmToVox);
    const steps = Math.round(uniform(rng, 20, 70) * mmToVox);
    for (let s = 0; s < steps; s++) {
      const n = Math.hypot(d.z, d.y, d.x) || 1;
      p = { z: p.z + d.z / n, y: p.y + d.y / n, x: p.x + d.x / n };
      if (p.z < 0 || p.y < 0 || p.x < 0 || p.z > D - 1 || p.y > H - 1 || p.x > W - 1) break;
      if (tissue[(Math.round(p.z) * H + Math.round(p.y)) * W + Math.round(p.x)] === Tissue.background) break;
      stampBall(tissue, shape, p, radius, Tissue.vessel);
      d = { z: d.z / n + 0.25 * gaussian(rng), y: d.y / n + 0.25 * gaussian(rng), x: d.x / n + 0.25 * gaussian(rng) };
    }
  }
  const dots = Math.round(amount * uniform(rng, 2, 6));
  for (let k = 0; k < dots; k++) {
    const c = randomVoxelOf(tissue, shape, rng, Tissue.white);
    if (c) stampBall(tissue, shape, c, Math.max(0.6, uniform(rng, 1.5, 3) * mmToVox), Tissue.vessel);
  }
}
