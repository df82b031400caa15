/**
 * The trainer inputs noisy-student training adds: per-voxel weights and soft targets in the loss and in
 * batches, with the old behaviour unchanged when neither is given.
 */
import { describe, expect, it } from 'vitest';
import { segmentationLossJs } from '../../shared/model/tfjs-trainer.ts';
import { sampleBatch } from '../../shared/model/batch.ts';
import { poolTargets, poolWeightedTargets } from '../../shared/model/med3d-trainer.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import type { VolumeCase } from '../../shared/model/types.ts';

function randomCase(seed: number, C: number): { z: Float32Array; g: Float32Array } {
  const rng = mulberry32(seed);
  const nv = 40;
  const z = new Float32Array(nv * C).map(() => (rng() - 0.5) * 4);
  const g = new Float32Array(nv * C);
  for (let v = 0; v < nv; v++) {
    // Soft rows that sum to 1.
    let s = 0;
    for (let c = 0; c < C; c++) s += (g[v * C + c] = rng());
    for (let c = 0; c < C; c++) g[v * C + c] /= s;
  }
  return { z, g };
}

describe('weighted segmentation loss', () => {
  it('with weights all 1 gives exactly the unweighted loss and gradient', () => {
    const { z, g } = randomCase(1, 3);
    const a = segmentationLossJs(z, g, 3);
    const b = segmentationLossJs(z, g, 3, new Float32Array(z.length / 3).fill(1));
    expect(b.loss).toBe(a.loss);
    expect(Array.from(b.grad)).toEqual(Array.from(a.grad));
  });

  it('masks a voxel out: zero gradient there, and its logits do not change the loss', () => {
    const { z, g } = randomCase(2, 3);
    const w = new Float32Array(z.length / 3).fill(1);
    w[5] = 0;
    const a = segmentationLossJs(z, g, 3, w);
    expect(Array.from(a.grad.subarray(15, 18)).map(Math.abs)).toEqual([0, 0, 0]);
    const z2 = z.slice();
    z2[15] += 3;
    z2[17] -= 2;
    expect(segmentationLossJs(z2, g, 3, w).loss).toBeCloseTo(a.loss, 12);
    // Without the mask, the same change moves the loss.
    expect(Math.abs(segmentationLossJs(z2, g, 3).loss - segmentationLossJs(z, g, 3).loss)).toBeGreaterThan(1e-4);
  });

  it('has the gradient of its value (finite differences, soft targets, fractional weights)', () => {
    const { z, g } = randomCase(3, 3);
    const rng = mulberry32(9);
    const w = new Float32Array(z.length / 3).map(() => rng() * 2);
    const { grad } = segmentationLossJs(z, g, 3, w);
    const z64 = Float64Array.from(z);
    for (const i of [0, 7, 31, 64, 119]) {
      const h = 1e-2;
      const up = Float32Array.from(z64.map((v, j) => (j === i ? v + h : v)));
      const dn = Float32Array.from(z64.map((v, j) => (j === i ? v - h : v)));
      const fd = (segmentationLossJs(up, g, 3, w).loss - segmentationLossJs(dn, g, 3, w).loss) / (2 * h);
      expect(grad[i]).toBeCloseTo(fd, 3);
    }
  });
});

describe('batches with soft targets and weights', () => {
  const shape: [number, number, number] = [4, 4, 4];
  const nv = 64;
  const labelled: VolumeCase = { id: 'l', shape, image: new Float32Array(nv).map((_, i) => i), label: new Uint8Array(nv).map((_, i) => i % 2) };

  it('a labelled-only batch has no weight field and one-hot rows, as before', () => {
    const b = sampleBatch([labelled], 2, shape, 2, mulberry32(4));
    expect(b.weight).toBeUndefined();
    for (let v = 0; v < 2 * nv; v++) expect(b.oneHot[v * 2] + b.oneHot[v * 2 + 1]).toBe(1);
  });

  it('copies soft rows and weights voxel for voxel; labelled entries in the same batch get weight 1', () => {
    const target = new Float32Array(nv * 2).map((_, i) => (i % 2 === 0 ? 0.25 : 0.75));
    const weight = new Float32Array(nv).map((_, i) => (i % 3 === 0 ? 0 : 0.5));
    const pseudo: VolumeCase = { id: 'p', shape, image: new Float32Array(nv).fill(7), target, weight };
    const b = sampleBatch([labelled, pseudo], 2, shape, 2, mulberry32(5), { inOrder: true, flip: false });
    expect(b.weight).toBeDefined();
    expect(Array.from(b.weight!.subarray(0, nv))).toEqual(new Array(nv).fill(1));
    expect(Array.from(b.weight!.subarray(nv))).toEqual(Array.from(weight));
    expect(Array.from(b.oneHot.subarray(nv * 2))).toEqual(Array.from(target));
    expect(Array.from(b.image.subarray(nv))).toEqual(new Array(nv).fill(7));
  });

  it('refuses a soft target of the wrong size', () => {
    const bad: VolumeCase = { id: 'bad', shape, image: new Float32Array(nv), target: new Float32Array(nv) };
    expect(() => sampleBatch([bad], 1, shape, 2, mulberry32(1))).toThrow(/soft target holds 64 values, expected 128/);
  });

  it('pools weighted targets onto the Med3D head grid: masked voxels do not pull the soft label', () => {
    const C = 2;
    const oneHot = new Float32Array(4 * 4 * 4 * C);
    const weight = new Float32Array(64).fill(1);
    for (let v = 0; v < 64; v++) {
      const fg = v < 32;
      oneHot[v * C + (fg ? 1 : 0)] = 1;
      if (fg) weight[v] = 0; // the foreground half is uncertain
    }
    const plain = poolTargets(oneHot, [1, 4, 4, 4], C, 4);
    expect(plain[1]).toBeCloseTo(0.5, 6);
    const pooled = poolWeightedTargets(oneHot, weight, [1, 4, 4, 4], C, 4);
    expect(pooled.weight[0]).toBeCloseTo(0.5, 6);
    expect(pooled.target[0]).toBeCloseTo(1, 6);
    expect(pooled.target[1]).toBeCloseTo(0, 6);
  });
});
