import { describe, expect, it } from 'vitest';
import { augmentPatch, drawAugmentation } from '../../site-agent/data/augment.ts';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import { applyScannerAugmentation, drawScannerAugmentation } from '../../site-agent/data/scanner-augment.ts';
import { AugmentSettingsSchema } from '../../shared/plan/data-settings.ts';

const SHAPE: [number, number, number] = [8, 10, 12];
const N = SHAPE[0] * SHAPE[1] * SHAPE[2];
const at = (z: number, y: number, x: number) => (z * SHAPE[1] + y) * SHAPE[2] + x;

/** Channel 0 as given, channel 1 constant 5 (a constant image must survive blur, coarsening and contrast). */
function twoChannels(fill: (z: number, y: number, x: number) => number): Float32Array {
  const img = new Float32Array(N * 2);
  for (let z = 0; z < SHAPE[0]; z++)
    for (let y = 0; y < SHAPE[1]; y++)
      for (let x = 0; x < SHAPE[2]; x++) {
        img[at(z, y, x) * 2] = fill(z, y, x);
        img[at(z, y, x) * 2 + 1] = 5;
      }
  return img;
}

describe('scanner-difference augmentation', () => {
  it('is off by default and then leaves the other augmentations and their random stream as they were', () => {
    const a = mulberry32(11);
    const b = mulberry32(11);
    const plain = drawAugmentation(a, 1, {});
    const zeroed = drawAugmentation(b, 1, { biasProbability: 0, blurProbability: 0, lowResProbability: 0, contrastProbability: 0 });
    expect(plain.scanner).toBeUndefined();
    expect(zeroed).toEqual(plain);
    expect(a()).toBe(b());
    // Switched on, it is drawn after the others: their parameters do not move.
    const c = mulberry32(11);
    const on = drawAugmentation(c, 1, { biasProbability: 1, blurProbability: 1, lowResProbability: 1, contrastProbability: 1 });
    expect({ ...on, scanner: undefined }).toEqual({ ...plain, scanner: undefined });
    expect(on.scanner?.bias).toHaveLength(9);
    expect(on.scanner?.blur?.some((s) => s > 0)).toBe(true);
    expect(on.scanner?.lowRes?.some((z) => z < 1)).toBe(true);
  });

  it('a bias field multiplies the signal above the darkest voxel smoothly, its largest log-gain within the drawn strength', () => {
    const img = twoChannels((z, y, x) => (x + y + z === 0 ? 0 : 1)); // min 0, signal 1 elsewhere
    const p = drawScannerAugmentation(mulberry32(3), 2, { biasProbability: 1, biasStrength: [0.3, 0.3] });
    applyScannerAugmentation(img, SHAPE, 2, { bias: p.bias });
    let peak = 0;
    let jump = 0;
    for (let z = 0; z < SHAPE[0]; z++)
      for (let y = 0; y < SHAPE[1]; y++)
        for (let x = 1; x < SHAPE[2]; x++) {
          if (x + y + z === 0) continue;
          const g = Math.log(img[at(z, y, x) * 2]);
          peak = Math.max(peak, Math.abs(g));
          if (x > 1 || y + z > 0) jump = Math.max(jump, Math.abs(g - Math.log(img[at(z, y, x - 1) * 2])));
        }
    expect(peak).toBeGreaterThan(0.15);
    expect(peak).toBeLessThanOrEqual(0.3 + 1e-6);
    expect(jump).toBeLessThan(0.2); // smooth: neighbours differ by a fraction of the range
    expect(img[0]).toBe(0); // the darkest voxel stays where it was
  });

  it('blur spreads an impulse only along the blurred axes and keeps its mass; a constant channel stays constant', () => {
    const img = twoChannels((z, y, x) => (z === 4 && y === 5 && x === 6 ? 1 : 0));
    applyScannerAugmentation(img, SHAPE, 2, { blur: [0, 1.2, 0] });
    let mass = 0;
    for (let i = 0; i < N; i++) mass += img[i * 2];
    expect(mass).toBeCloseTo(1, 5);
    expect(img[at(4, 4, 6) * 2]).toBeGreaterThan(0.1); // along H
    expect(img[at(4, 5, 5) * 2]).toBe(0); // not along W
    expect(img[at(3, 5, 6) * 2]).toBe(0); // not along D
    for (let i = 0; i < N; i++) expect(img[i * 2 + 1]).toBeCloseTo(5, 5);
  });

  it('a coarser grid removes detail finer than the grid along that axis only and keeps a ramp a ramp', () => {
    const img = twoChannels((z, _y, x) => (x % 2) + 0.1 * z); // alternating along W, a ramp along D
    applyScannerAugmentation(img, SHAPE, 2, { lowRes: [1, 1, 0.5] });
    // Each W line was sampled at 6 points: every second voxel, so the alternation is gone.
    for (let x = 0; x < SHAPE[2]; x++) expect(img[at(2, 3, x) * 2]).toBeCloseTo(img[at(2, 3, 0) * 2], 5);
    // D untouched: the ramp is exact.
    for (let z = 1; z < SHAPE[0]; z++) expect(img[at(z, 3, 4) * 2] - img[at(z - 1, 3, 4) * 2]).toBeCloseTo(0.1, 5);
    for (let i = 0; i < N; i++) expect(img[i * 2 + 1]).toBeCloseTo(5, 5);
  });

  it('contrast scales deviations about the mean, never beyond the patch range', () => {
    const img = twoChannels((z, y, x) => ((x + 2 * y + 3 * z) % 7) - 3);
    const before = Array.from({ length: N }, (_, i) => img[i * 2]);
    applyScannerAugmentation(img, SHAPE, 2, { contrast: [0.5, 1.2] });
    const mean = before.reduce((a, v) => a + v, 0) / N;
    for (let i = 0; i < N; i++) {
      expect(img[i * 2]).toBeCloseTo((before[i] - mean) * 0.5 + mean, 5);
      expect(img[i * 2 + 1]).toBe(5); // factor 1.2 on a constant: still the constant (range kept)
    }
  });

  it('through augmentPatch the label is untouched and every value finite', () => {
    const label = new Uint8Array(N).map((_, i) => (i % 13 === 0 ? 1 : 0));
    const image = twoChannels((z, y, x) => Math.sin(x + y) + z);
    const rng = mulberry32(5);
    for (let k = 0; k < 20; k++) {
      const out = augmentPatch({ shape: SHAPE, channels: 2, image, label }, rng, {
        flipProbability: 0, biasProbability: 1, blurProbability: 1, lowResProbability: 1, contrastProbability: 1,
      });
      expect(out.label).toEqual(label);
      expect(out.image.every(Number.isFinite)).toBe(true);
      expect(out.image).not.toEqual(image);
    }
  });

  it('the plan validates the new fields', () => {
    expect(AugmentSettingsSchema.parse({}).biasProbability).toBe(0);
    expect(AugmentSettingsSchema.parse({ blurProbability: 0.3, lowResZoom: [0.4, 1] }).lowResZoom).toEqual([0.4, 1]);
    expect(() => AugmentSettingsSchema.parse({ biasProbability: 1.5 })).toThrow();
    expect(() => AugmentSettingsSchema.parse({ lowResZoom: [0.5, 1.5] })).toThrow();
    expect(() => AugmentSettingsSchema.parse({ blurSigma: [0, 1] })).toThrow();
  });
});
