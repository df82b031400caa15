import { describe, expect, it } from 'vitest';
import { resampledShape, resampleImage, resampleLabel, resizeLinear, resizeNearest } from '../../site-agent/data/resample.ts';

function volume(shape: readonly [number, number, number], f: (z: number, y: number, x: number) => number): Float32Array {
  const [D, H, W] = shape;
  const a = new Float32Array(D * H * W);
  for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) a[(z * H + y) * W + x] = f(z, y, x);
  return a;
}

describe('resampling', () => {
  it('computes the output shape from spacing, keeping the physical extent', () => {
    expect(resampledShape([10, 20, 30], [3, 1, 0.5], [1.5, 1, 1])).toEqual([20, 20, 15]);
    expect(resampledShape([1, 2, 3], [1, 1, 1], [10, 10, 10])).toEqual([1, 1, 1]);
  });

  it('same shape is an exact copy (a new buffer)', () => {
    const a = volume([3, 4, 5], (z, y, x) => z * 100 + y * 10 + x);
    const b = resizeLinear(a, [3, 4, 5], [3, 4, 5]);
    expect(b).toEqual(a);
    expect(b).not.toBe(a);
  });

  it('trilinear reproduces a linear field exactly away from the clamped border', () => {
    // f = 2z + 3y - x in voxel-centre coordinates of the source; upsample 2x on every axis.
    const src = volume([6, 6, 6], (z, y, x) => 2 * z + 3 * y - x);
    const out = resizeLinear(src, [6, 6, 6], [12, 12, 12]);
    const c = (i: number): number => (i + 0.5) / 2 - 0.5; // output centre in source voxels
    for (let z = 1; z < 11; z++) {
      for (let y = 1; y < 11; y++) {
        for (let x = 1; x < 11; x++) {
          expect(out[(z * 12 + y) * 12 + x]).toBeCloseTo(2 * c(z) + 3 * c(y) - c(x), 5);
        }
      }
    }
  });

  it('downsampling a constant stays constant; mean of a smooth field is kept', () => {
    const k = resizeLinear(new Float32Array(8 * 8 * 8).fill(4.25), [8, 8, 8], [3, 5, 2]);
    expect(k.every((v) => Math.abs(v - 4.25) < 1e-6)).toBe(true);
    const s = volume([16, 16, 16], (z, y, x) => Math.sin(z / 3) + Math.cos(y / 4) + x / 16);
    const d = resampleImage(s, [16, 16, 16], [1, 1, 1], [2, 2, 2]);
    expect(d.shape).toEqual([8, 8, 8]);
    const mean = (a: Float32Array): number => a.reduce((p, v) => p + v, 0) / a.length;
    expect(Math.abs(mean(d.data) - mean(s))).toBeLessThan(0.02);
  });

  it('nearest keeps label values in the input set and the label volume fraction', () => {
    const shape = [20, 20, 20] as const;
    const lab = new Uint8Array(8000);
    for (let z = 0; z < 20; z++) for (let y = 0; y < 20; y++) for (let x = 0; x < 20; x++) {
      const r = Math.hypot(z - 9.5, y - 9.5, x - 9.5);
      lab[(z * 20 + y) * 20 + x] = r < 4 ? 2 : r < 7 ? 1 : 0;
    }
    const up = resampleLabel(lab, shape, [1, 1, 1], [0.5, 0.7, 0.5]);
    expect(up.shape).toEqual([40, 29, 40]);
    expect(new Set(up.data)).toEqual(new Set([0, 1, 2]));
    const frac = (a: Uint8Array, v: number): number => a.filter((x) => x === v).length / a.length;
    expect(Math.abs(frac(up.data, 2) - frac(lab, 2))).toBeLessThan(0.01);
    expect(Math.abs(frac(up.data, 1) - frac(lab, 1))).toBeLessThan(0.02);
    // Downsample by 2 exactly: every output voxel is one of its 8 source voxels.
    const down = resizeNearest(lab, shape, [10, 10, 10]);
    for (let z = 0; z < 10; z++) for (let y = 0; y < 10; y++) for (let x = 0; x < 10; x++) {
      const block = new Set<number>();
      for (let dz = 0; dz < 2; dz++) for (let dy = 0; dy < 2; dy++) for (let dx = 0; dx < 2; dx++) block.add(lab[((2 * z + dz) * 20 + 2 * y + dy) * 20 + 2 * x + dx]);
      expect(block.has(down[(z * 10 + y) * 10 + x])).toBe(true);
    }
  });

  it('image and label resampled to the same spacing stay aligned', () => {
    const shape = [12, 10, 14] as const;
    const lab = new Uint8Array(12 * 10 * 14);
    const img = volume(shape, (z, y, x) => (z >= 4 && z < 8 && y >= 3 && y < 7 && x >= 5 && x < 10 ? 100 : 0));
    for (let i = 0; i < lab.length; i++) lab[i] = img[i] > 0 ? 1 : 0;
    const ri = resampleImage(img, shape, [2, 1.5, 1], [1, 1, 0.8]);
    const rl = resampleLabel(lab, shape, [2, 1.5, 1], [1, 1, 0.8]);
    expect(ri.shape).toEqual(rl.shape);
    let agree = 0;
    for (let i = 0; i < rl.data.length; i++) if ((ri.data[i] >= 50 ? 1 : 0) === rl.data[i]) agree++;
    expect(agree / rl.data.length).toBeGreaterThan(0.98);
  });
});
