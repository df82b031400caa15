import { describe, expect, it } from 'vitest';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import { centrePatch, choosePatchStart, extractPatch, foregroundIndices, samplePatch } from '../../site-agent/data/sampler.ts';
import type { PreparedCase } from '../../site-agent/data/types.ts';

/** A case whose channel c at (z, y, x) holds c*10000 + z*100 + y*10 + x... encoded as a unique voxel id. */
function makeCase(shape: [number, number, number], channels = 2, fg: (z: number, y: number, x: number) => boolean = () => false): PreparedCase {
  const [D, H, W] = shape;
  const n = D * H * W;
  const chans = Array.from({ length: channels }, (_, c) => Float32Array.from({ length: n }, (_, i) => c * 1e5 + i + 1));
  const label = new Uint8Array(n);
  for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) label[(z * H + y) * W + x] = fg(z, y, x) ? 1 : 0;
  return { id: 'c', shape, spacing: [1, 1, 1], channels: chans, label, foreground: foregroundIndices(label) };
}

describe('patch sampling', () => {
  it('extracts channels last with the label on the same voxels, zero padding outside', () => {
    const c = makeCase([5, 6, 7], 2, (z, y, x) => (z + y + x) % 3 === 0);
    const p = extractPatch(c, [-1, 2, 3], [4, 3, 5]);
    expect(p.shape).toEqual([4, 3, 5]);
    expect(p.channels).toBe(2);
    for (let z = 0; z < 4; z++) for (let y = 0; y < 3; y++) for (let x = 0; x < 5; x++) {
      const [sz, sy, sx] = [z - 1, y + 2, x + 3];
      const d = (z * 3 + y) * 5 + x;
      const inside = sz >= 0 && sz < 5 && sx < 7;
      const s = (sz * 6 + sy) * 7 + sx;
      expect(p.image[d * 2]).toBe(inside ? c.channels[0][s] : 0);
      expect(p.image[d * 2 + 1]).toBe(inside ? c.channels[1][s] : 0);
      expect(p.label![d]).toBe(inside ? c.label![s] : 0);
    }
  });

  it('with foregroundFraction 1 every patch contains foreground, even a single voxel of it', () => {
    const c = makeCase([30, 30, 30], 1, (z, y, x) => z === 27 && y === 2 && x === 15);
    expect([...c.foreground!]).toEqual([(27 * 30 + 2) * 30 + 15]);
    const rng = mulberry32(5);
    for (let i = 0; i < 50; i++) {
      const p = samplePatch(c, { patch: [8, 8, 8], foregroundFraction: 1 }, rng);
      expect(p.label!.some((v) => v === 1)).toBe(true);
      // Inside the volume (no padding needed when the volume is larger than the patch).
      expect(p.image.every((v) => v > 0)).toBe(true);
    }
  });

  it('oversamples foreground at about the configured share', () => {
    const c = makeCase([40, 40, 40], 1, (z, y, x) => z < 3 && y < 3 && x < 3);
    const rng = mulberry32(11);
    const rate = (share: number): number => {
      let hits = 0;
      for (let i = 0; i < 600; i++) if (samplePatch(c, { patch: [6, 6, 6], foregroundFraction: share }, rng).label!.some((v) => v > 0)) hits++;
      return hits / 600;
    };
    const uniform = rate(0); // a 3-voxel corner cube is rarely hit by uniform placement
    const third = rate(0.33);
    expect(uniform).toBeLessThan(0.05);
    expect(third).toBeGreaterThan(0.25);
    expect(third).toBeLessThan(0.45);
  });

  it('is deterministic in the seed, and different seeds give different patches', () => {
    const c = makeCase([20, 20, 20], 1, (z) => z > 15);
    const starts = (seed: number): number[][] => {
      const rng = mulberry32(seed);
      return Array.from({ length: 10 }, () => choosePatchStart(c, { patch: [8, 8, 8] }, rng));
    };
    expect(starts(3)).toEqual(starts(3));
    expect(starts(3)).not.toEqual(starts(4));
  });

  it('a volume smaller than the patch is centred and padded', () => {
    const c = makeCase([2, 3, 4], 1);
    const p = centrePatch(c, [4, 5, 6]);
    expect(p.image.filter((v) => v > 0).length).toBe(24);
    // Same answer from random sampling: no freedom on any axis.
    const q = samplePatch(c, { patch: [4, 5, 6] }, mulberry32(1));
    expect(q.image).toEqual(p.image);
  });

  it('subsamples long foreground lists evenly', () => {
    const lab = new Uint8Array(100_000).fill(1);
    const f = foregroundIndices(lab, 1000);
    expect(f.length).toBe(1000);
    expect(f[1] - f[0]).toBe(100);
  });
});
