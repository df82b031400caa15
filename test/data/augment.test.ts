import { describe, expect, it } from 'vitest';
import { augmentPatch, drawAugmentation, flipPatch } from '../../site-agent/data/augment.ts';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import type { Patch } from '../../site-agent/data/types.ts';

function makePatch(shape: [number, number, number] = [6, 7, 8], C = 2): Patch {
  const n = shape[0] * shape[1] * shape[2];
  const image = new Float32Array(n * C);
  const label = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    label[i] = (i * 7919) % 5 === 0 ? 1 : (i * 31) % 11 === 0 ? 2 : 0;
    // Channel 0 encodes the label exactly, channel 1 the voxel position.
    image[i * C] = label[i] * 10 + 1;
    if (C > 1) image[i * C + 1] = i;
  }
  return { shape, channels: C, image, label };
}

const NO_INTENSITY = { scaleProbability: 0, shiftProbability: 0, noiseProbability: 0, gammaProbability: 0 };

describe('augmentation', () => {
  it('flipping twice along any axes is the identity', () => {
    const p = makePatch();
    for (const axes of [[true, false, false], [false, true, false], [false, false, true], [true, true, true]] as const) {
      const once = flipPatch(p, axes);
      expect(once.image).not.toEqual(p.image);
      const twice = flipPatch(once, axes);
      expect(twice.image).toEqual(p.image);
      expect(twice.label).toEqual(p.label);
    }
  });

  it('a W flip mirrors x and keeps image and label aligned voxel for voxel', () => {
    const p = makePatch([2, 3, 4], 2);
    const f = flipPatch(p, [false, false, true]);
    // voxel (z=1,y=2,x=0) comes from (1,2,3)
    const d = (1 * 3 + 2) * 4 + 0;
    const s = (1 * 3 + 2) * 4 + 3;
    expect(f.image[d * 2 + 1]).toBe(s);
    expect(f.label![d]).toBe(p.label![s]);
  });

  it('random augmentation keeps label/image alignment under geometric transforms', () => {
    const p = makePatch();
    const rng = mulberry32(99);
    let flippedSome = 0;
    for (let k = 0; k < 20; k++) {
      const a = augmentPatch(p, rng, NO_INTENSITY);
      if (!a.image.every((v, i) => v === p.image[i])) flippedSome++;
      for (let i = 0; i < a.label!.length; i++) expect(a.image[i * 2]).toBe(a.label![i] * 10 + 1);
    }
    expect(flippedSome).toBeGreaterThan(10);
  });

  it('is deterministic in the seed and pure', () => {
    const p = makePatch();
    const before = p.image.slice();
    const a = augmentPatch(p, mulberry32(7), { noiseProbability: 1, scaleProbability: 1 });
    const b = augmentPatch(p, mulberry32(7), { noiseProbability: 1, scaleProbability: 1 });
    const c = augmentPatch(p, mulberry32(8), { noiseProbability: 1, scaleProbability: 1 });
    expect(a.image).toEqual(b.image);
    expect(a.label).toEqual(b.label);
    expect(a.image).not.toEqual(c.image);
    expect(p.image).toEqual(before);
  });

  it('scale, shift and noise change intensity statistics as configured', () => {
    const n = 16 * 16 * 16;
    const base: Patch = { shape: [16, 16, 16], channels: 1, image: Float32Array.from({ length: n }, (_, i) => Math.sin(i) * 2 + 1), label: new Uint8Array(n) };
    const stats = (a: Float32Array): { mean: number; sd: number } => {
      const mean = a.reduce((s, v) => s + v, 0) / a.length;
      return { mean, sd: Math.sqrt(a.reduce((s, v) => s + (v - mean) ** 2, 0) / a.length) };
    };
    const s0 = stats(base.image);
    const off = { flipProbability: 0, noiseProbability: 0, gammaProbability: 0 };
    const scaled = augmentPatch(base, mulberry32(1), { ...off, scaleProbability: 1, scaleRange: [2, 2] });
    expect(stats(scaled.image).sd).toBeCloseTo(2 * s0.sd, 4);
    const shifted = augmentPatch(base, mulberry32(1), { ...off, scaleProbability: 0, shiftProbability: 1, shiftRange: [0.5, 0.5] });
    expect(stats(shifted.image).mean).toBeCloseTo(s0.mean + 0.5, 4);
    expect(stats(shifted.image).sd).toBeCloseTo(s0.sd, 4);
    const noisy = augmentPatch(base, mulberry32(1), { ...off, scaleProbability: 0, noiseProbability: 1, noiseVariance: [0.25, 0.25] });
    const diff = noisy.image.map((v, i) => v - base.image[i]);
    expect(stats(diff).sd).toBeCloseTo(0.5, 1);
    expect(Math.abs(stats(diff).mean)).toBeLessThan(0.03);
    const none = augmentPatch(base, mulberry32(1), { ...off, scaleProbability: 0, noiseProbability: 0 });
    expect(none.image).toEqual(base.image);
  });

  it('draws with the configured probabilities', () => {
    const rng = mulberry32(3);
    let flips = 0;
    let scales = 0;
    for (let i = 0; i < 2000; i++) {
      const d = drawAugmentation(rng, 1, { scaleProbability: 0.15 });
      flips += d.flip.filter(Boolean).length;
      if (d.scale[0] !== 1) {
        scales++;
        expect(d.scale[0]).toBeGreaterThanOrEqual(0.75);
        expect(d.scale[0]).toBeLessThan(1.25);
      }
    }
    expect(flips / 6000).toBeCloseTo(0.5, 1);
    expect(scales / 2000).toBeCloseTo(0.15, 1);
    expect(() => drawAugmentation(rng, 1, { noiseProbability: 2 })).toThrow(/probability/);
  });

  it('a left-right flip swaps lateral label pairs when asked', () => {
    const p: Patch = { shape: [1, 1, 4], channels: 1, image: Float32Array.from([1, 2, 3, 4]), label: Uint8Array.from([0, 1, 2, 3]) };
    const f = flipPatch(p, [false, false, true], [[1, 2]]);
    expect([...f.image]).toEqual([4, 3, 2, 1]);
    expect([...f.label!]).toEqual([3, 1, 2, 0]); // 2->1 and 1->2 after mirroring
    const g = flipPatch(p, [true, false, false], [[1, 2]]);
    expect([...g.label!]).toEqual([0, 1, 2, 3]); // no left-right flip, no swap
  });

  it('works on unlabelled patches (pseudo-labelling pool) without inventing a label', () => {
    const { label: _drop, ...rest } = makePatch([3, 4, 5], 1);
    const a = augmentPatch(rest, mulberry32(2), { flipProbability: 1, noiseProbability: 0, scaleProbability: 0, gammaProbability: 0 });
    expect(a.label).toBeUndefined();
    expect(flipPatch(a, [true, true, true]).image).toEqual(rest.image);
  });
  it('gamma keeps each channel\'s range (min and max stay), changes the mid-tones, and draws γ either side of 1', () => {
    const n = 8 * 8 * 8;
    const base: Patch = { shape: [8, 8, 8], channels: 2, image: Float32Array.from({ length: 2 * n }, (_, i) => (i % 2 === 0 ? Math.sin(i) * 3 - 1 : 5 + (i % 7))) };
    const range = (a: Float32Array, c: number) => {
      let lo = Infinity;
      let hi = -Infinity;
      for (let i = c; i < a.length; i += 2) { lo = Math.min(lo, a[i]); hi = Math.max(hi, a[i]); }
      return [lo, hi];
    };
    const noGamma = { flipProbability: 0, scaleProbability: 0, shiftProbability: 0, noiseProbability: 0, gammaProbability: 0 };
    for (const g of [[0.7, 0.7], [1.5, 1.5]] as const) {
      const a = augmentPatch(base, mulberry32(4), { ...noGamma, gammaProbability: 1, gammaRange: g });
      for (const c of [0, 1]) {
        const [lo, hi] = range(a.image, c);
        const [lo0, hi0] = range(base.image, c);
        expect(lo).toBeCloseTo(lo0, 5);
        expect(hi).toBeCloseTo(hi0, 5);
      }
      // x^0.7 lifts the mid-tones, x^1.5 lowers them.
      const mean = (x: Float32Array) => x.reduce((s, v, i) => s + (i % 2 === 0 ? v : 0), 0) / n;
      if (g[0] < 1) expect(mean(a.image)).toBeGreaterThan(mean(base.image) + 0.05);
      else expect(mean(a.image)).toBeLessThan(mean(base.image) - 0.05);
    }
    const rng = mulberry32(5);
    let below = 0;
    let applied = 0;
    for (let i = 0; i < 2000; i++) {
      const d = drawAugmentation(rng, 1, {});
      if (d.gamma![0] === 1) continue;
      applied++;
      expect(d.gamma![0]).toBeGreaterThanOrEqual(0.7);
      expect(d.gamma![0]).toBeLessThanOrEqual(1.5);
      if (d.gamma![0] < 1) below++;
    }
    expect(applied / 2000).toBeCloseTo(0.3, 1);
    expect(below / applied).toBeCloseTo(0.5, 1);
  });
});
