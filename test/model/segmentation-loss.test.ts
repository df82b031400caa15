/**
 * The training loss both trainers use (segmentationLossJs): ½·(cross-entropy + 1 − mean foreground soft Dice),
 * Dice summed over the whole batch (nnU-Net's batch Dice) and over foreground classes only. Checked against a
 * direct float64 evaluation and its gradient against central finite differences.
 */
import { describe, expect, it } from 'vitest';
import { DICE_SMOOTH, segmentationLossJs } from '../../shared/model/tfjs-trainer.ts';
import { mulberry32 } from '../../shared/util/random.ts';

/** Logits and one-hot targets for `samples` patches of `nv` voxels; sample 1 has no foreground at all. */
function batch(seed: number, C: number, samples: number, nv: number): { z: Float32Array; g: Float32Array } {
  const rng = mulberry32(seed);
  const z = new Float32Array(samples * nv * C).map(() => (rng() - 0.5) * 4);
  const g = new Float32Array(samples * nv * C);
  for (let s = 0; s < samples; s++) {
    for (let v = 0; v < nv; v++) {
      const k = s === 1 ? 0 : v % 5 === 0 ? 1 + (v % (C - 1)) : 0;
      g[(s * nv + v) * C + k] = 1;
    }
  }
  return { z, g };
}

/** Softmax probabilities in float64. */
function probs(z: Float32Array, C: number): Float64Array {
  const p = new Float64Array(z.length);
  for (let o = 0; o < z.length; o += C) {
    let se = 0;
    for (let c = 0; c < C; c++) se += Math.exp(z[o + c]);
    for (let c = 0; c < C; c++) p[o + c] = Math.exp(z[o + c]) / se;
  }
  return p;
}

/** Soft Dice of class c over voxels [from, to). */
function dice(p: Float64Array, g: Float32Array, C: number, c: number, from: number, to: number): number {
  let inter = 0;
  let ps = 0;
  let gs = 0;
  for (let v = from; v < to; v++) {
    inter += p[v * C + c] * g[v * C + c];
    ps += p[v * C + c];
    gs += g[v * C + c];
  }
  return (2 * inter + DICE_SMOOTH) / (ps + gs + DICE_SMOOTH);
}

describe('segmentation loss', () => {
  for (const C of [2, 3]) {
    it(`${C} classes: Dice over the whole batch, foreground classes only (not per sample, not background)`, () => {
      const nv = 30;
      const { z, g } = batch(C, C, 2, nv);
      const p = probs(z, C);
      let ce = 0;
      for (let v = 0; v < 2 * nv; v++) for (let c = 0; c < C; c++) if (g[v * C + c] > 0) ce -= Math.log(p[v * C + c]);
      ce /= 2 * nv;
      let batchDice = 0;
      let perSample = 0;
      for (let c = 1; c < C; c++) {
        batchDice += dice(p, g, C, c, 0, 2 * nv) / (C - 1);
        perSample += (dice(p, g, C, c, 0, nv) + dice(p, g, C, c, nv, 2 * nv)) / 2 / (C - 1);
      }
      const { loss } = segmentationLossJs(z, g, C);
      expect(loss).toBeCloseTo(0.5 * (ce + 1 - batchDice), 6);
      // Per-sample Dice would be a different loss (the empty sample's Dice is ≈ 1/(1 + Σp), unstable).
      expect(Math.abs(loss - 0.5 * (ce + 1 - perSample))).toBeGreaterThan(1e-3);
    });

    it(`${C} classes: gradient matches central finite differences`, () => {
      const { z, g } = batch(10 + C, C, 2, 20);
      const { grad } = segmentationLossJs(z, g, C);
      const h = 1e-2;
      for (let i = 0; i < z.length; i += 7) {
        const up = z.slice();
        const dn = z.slice();
        up[i] += h;
        dn[i] -= h;
        const fd = (segmentationLossJs(up, g, C).loss - segmentationLossJs(dn, g, C).loss) / (2 * h);
        expect(grad[i], `logit ${i}`).toBeCloseTo(fd, 4);
      }
    });
  }

  it('a batch without any foreground stays finite and pushes foreground probability down', () => {
    const C = 2;
    const nv = 16;
    const z = new Float32Array(nv * C);
    const g = new Float32Array(nv * C);
    for (let v = 0; v < nv; v++) g[v * C] = 1;
    const { loss, grad } = segmentationLossJs(z, g, C);
    expect(Number.isFinite(loss)).toBe(true);
    for (let v = 0; v < nv; v++) {
      expect(grad[v * C + 1]).toBeGreaterThan(0);
      expect(grad[v * C]).toBeLessThan(0);
    }
  });
});
