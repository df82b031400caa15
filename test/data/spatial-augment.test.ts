/**
 * Spatial augmentation resampled from the whole case: identity at angle 0 / zoom 1, image and label aligned
 * (trilinear image, nearest-neighbour label), rotations and zoom that do what they say, a smooth bounded elastic
 * field, foreground patches that keep their foreground, determinism in the seed, and its cost per patch.
 */
import { describe, expect, it } from 'vitest';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import { extractPatch, foregroundIndices, samplePatch } from '../../site-agent/data/sampler.ts';
import { drawSpatial, elasticField, isIdentity, spatialPatch, transformCentre, type SpatialParams } from '../../site-agent/data/spatial-augment.ts';
import type { PreparedCase, Shape3 } from '../../site-agent/data/types.ts';

/** A case with a bright labelled box (image 1, label 1) on a dark background; a second channel holds a ramp. */
function boxCase(shape: Shape3, lo: Shape3, hi: Shape3, spacing: Shape3 = [1, 1, 1]): PreparedCase {
  const [D, H, W] = shape;
  const img = new Float32Array(D * H * W);
  const ramp = new Float32Array(D * H * W);
  const label = new Uint8Array(D * H * W);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        const i = (z * H + y) * W + x;
        const inside = z >= lo[0] && z < hi[0] && y >= lo[1] && y < hi[1] && x >= lo[2] && x < hi[2];
        img[i] = inside ? 1 : 0;
        label[i] = inside ? 1 : 0;
        ramp[i] = z + 2 * y + 3 * x;
      }
    }
  }
  return { id: 'box', shape, spacing, channels: [img, ramp], label, foreground: foregroundIndices(label) };
}

const still: SpatialParams = { angles: [0, 0, 0], zoom: 1 };
const deg = Math.PI / 180;

/** Label 1 wherever the image is surely bright, and image > 0 wherever the label is 1 (the NN voxel is a corner). */
function expectAligned(p: { image: Float32Array; label?: Uint8Array; channels: number }): number {
  let fg = 0;
  for (let v = 0; v < p.label!.length; v++) {
    const bright = p.image[v * p.channels];
    if (bright > 0.875 + 1e-6) expect(p.label![v], `voxel ${v}: image ${bright}`).toBe(1);
    if (p.label![v] === 1) {
      expect(bright, `voxel ${v}`).toBeGreaterThan(0.125 - 1e-6);
      fg++;
    }
  }
  return fg;
}

describe('spatial augmentation', () => {
  const c = boxCase([40, 40, 40], [14, 16, 12], [24, 22, 26]);

  it('is the plain crop at angle 0 and zoom 1, padding included', () => {
    for (const start of [[5, 6, 7], [-3, 30, 2], [0, 0, 0]] as const) {
      const a = spatialPatch(c, transformCentre(start, [16, 12, 20], still, c.spacing), [16, 12, 20], still);
      const b = extractPatch(c, start, [16, 12, 20]);
      expect(Array.from(a.image)).toEqual(Array.from(b.image));
      expect(Array.from(a.label!)).toEqual(Array.from(b.label!));
    }
    expect(isIdentity(still)).toBe(true);
  });

  it('keeps image and label aligned under rotation, zoom and elastic deformation', () => {
    const cases: SpatialParams[] = [
      { angles: [12 * deg, -9 * deg, 15 * deg], zoom: 1 },
      { angles: [0, 0, 0], zoom: 1.25 },
      { angles: [-15 * deg, 7 * deg, 3 * deg], zoom: 0.85 },
      { angles: [5 * deg, 5 * deg, -5 * deg], zoom: 1.1, elastic: { sd: 2, gridSpacing: 6, seed: 3 } },
    ];
    for (const t of cases) {
      const p = spatialPatch(c, [19, 19, 19], [24, 24, 24], t);
      const fg = expectAligned(p);
      // Box 10·6·14 = 840 voxels, scaled by zoom³ (and left whole inside a 24³ patch).
      expect(fg / (840 * t.zoom ** 3), JSON.stringify(t)).toBeGreaterThan(0.8);
      expect(fg / (840 * t.zoom ** 3), JSON.stringify(t)).toBeLessThan(1.25);
    }
  });

  it('rotates about the patch centre: 90° about D maps (y, x) offsets to (−x, y) of the source', () => {
    const p = spatialPatch(c, [20, 20, 20], [9, 9, 9], { angles: [90 * deg, 0, 0], zoom: 1 });
    // Ramp channel: source value z + 2y + 3x at source (20 + oz, 20 − ox, 20 + oy).
    for (const [oz, oy, ox] of [[0, 1, 0], [2, -3, 4], [-4, 4, -2]]) {
      const v = ((oz + 4) * 9 + (oy + 4)) * 9 + (ox + 4);
      expect(p.image[v * 2 + 1]).toBeCloseTo(20 + oz + 2 * (20 - ox) + 3 * (20 + oy), 4);
    }
  });

  it('rotates in millimetres: on an anisotropic case a 90° turn in the H–W plane swaps physical extents', () => {
    // Spacing H 2 mm, W 1 mm: an offset of 1 voxel along H (2 mm) turns into 2 voxels along W.
    const aniso = boxCase([20, 20, 40], [0, 0, 0], [1, 1, 1], [1, 2, 1]);
    const p = spatialPatch(aniso, [10, 10, 20], [1, 9, 9], { angles: [90 * deg, 0, 0], zoom: 1 });
    const at = (oy: number, ox: number) => p.image[((oy + 4) * 9 + (ox + 4)) * 2 + 1];
    // Output offset (0, 0, 2) along W (2 mm) samples source H offset −1 voxel: ramp drops by 2·1.
    expect(at(0, 2) - at(0, 0)).toBeCloseTo(-2, 4);
    // Output offset (0, 1, 0) along H (2 mm) samples source W offset +2 voxels: ramp rises by 3·2.
    expect(at(1, 0) - at(0, 0)).toBeCloseTo(6, 4);
  });

  it('elastic field: smooth and within ±3 sd', () => {
    const [dz, dy, dx] = elasticField([24, 24, 24], { sd: 2, gridSpacing: 8, seed: 9 });
    let maxJump = 0;
    let maxAbs = 0;
    for (const f of [dz, dy, dx]) {
      for (let i = 0; i < f.length; i++) {
        maxAbs = Math.max(maxAbs, Math.abs(f[i]));
        if (i % 24 !== 23) maxJump = Math.max(maxJump, Math.abs(f[i + 1] - f[i]));
      }
    }
    expect(maxAbs).toBeGreaterThan(0.3);
    expect(maxAbs).toBeLessThanOrEqual(6 + 1e-5);
    expect(maxJump).toBeLessThan(0.6);
  });

  it('foreground patches keep their foreground, also near the border and with the strongest transforms', () => {
    // A small lesion (3³) in a corner region: the crop is clamped, so the lesion is off the patch centre.
    const small = boxCase([48, 48, 48], [2, 43, 3], [5, 46, 6]);
    const spatial = { rotationProbability: 1, rotationDegrees: [-15, 15] as [number, number], zoomProbability: 1, zoomRange: [0.85, 1.25] as [number, number], elasticProbability: 0.5 };
    const rng = mulberry32(11);
    for (let k = 0; k < 60; k++) {
      const p = samplePatch(small, { patch: [24, 24, 24], foregroundFraction: 1, spatial }, rng);
      expect(p.label!.some((v) => v === 1), `draw ${k}`).toBe(true);
      expectAligned(p);
    }
  });

  it('is deterministic in the seed; without `spatial` the sampler is unchanged', () => {
    const spatial = { rotationProbability: 1, zoomProbability: 1, elasticProbability: 1 };
    const a = samplePatch(c, { patch: [16, 16, 16], spatial }, mulberry32(5));
    const b = samplePatch(c, { patch: [16, 16, 16], spatial }, mulberry32(5));
    const d = samplePatch(c, { patch: [16, 16, 16], spatial }, mulberry32(6));
    expect(Array.from(a.image)).toEqual(Array.from(b.image));
    expect(Array.from(a.label!)).toEqual(Array.from(b.label!));
    expect(Array.from(a.image)).not.toEqual(Array.from(d.image));
    const off = samplePatch(c, { patch: [16, 16, 16], spatial: { rotationProbability: 0, zoomProbability: 0, elasticProbability: 0 } }, mulberry32(5));
    const plain = samplePatch(c, { patch: [16, 16, 16] }, mulberry32(5));
    expect(Array.from(off.image)).toEqual(Array.from(plain.image));
  });

  it('draws with the configured probabilities and ranges', () => {
    const rng = mulberry32(2);
    let rotated = 0;
    let zoomed = 0;
    for (let i = 0; i < 2000; i++) {
      const t = drawSpatial(rng, {});
      if (t.angles.some((a) => a !== 0)) rotated++;
      for (const a of t.angles) expect(Math.abs(a)).toBeLessThanOrEqual(15 * deg + 1e-12);
      if (t.zoom !== 1) {
        zoomed++;
        expect(t.zoom).toBeGreaterThanOrEqual(0.85);
        expect(t.zoom).toBeLessThanOrEqual(1.25);
      }
      expect(t.elastic).toBeUndefined();
    }
    expect(rotated / 2000).toBeCloseTo(0.2, 1);
    expect(zoomed / 2000).toBeCloseTo(0.2, 1);
    expect(() => drawSpatial(rng, { rotationProbability: 1.5 })).toThrow(/probability/);
  });
});
