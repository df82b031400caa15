/**
 * Models Genesis-style restoration: the corruptions are seeded, keep shape and intensity range, and do what
 * their names say; the Med3D trainer's restore objective lowers the restoration loss on small volumes, never
 * needs a label, and refuses a model that is not the restoration model.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { corruptBatch, corruptPatch, DEFAULT_RESTORATION_TRANSFORMS, randomIntensityCurve, RestorationTransformsSchema, type RestorationTransforms } from '../../shared/model/genesis-corruption.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';
import { restorationArchitecture, restorationLoss } from '../../shared/model/restoration.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { sphereCase } from '../helpers/volumes.ts';

const SHAPE = [16, 16, 16] as const;
const only = (t: Partial<RestorationTransforms>): RestorationTransforms => ({ nonLinear: 0, localShuffle: 0, inPainting: 0, outPainting: 0, ...t });

/** A smooth patch with distinct values: a ramp plus a ball. */
function patch(): Float32Array {
  const v = sphereCase(4, 16, 0.2, [4, 6]).image;
  return Float32Array.from(v, (x, i) => x + (i % 16) / 16);
}

const range = (a: Float32Array) => [Math.min(...a), Math.max(...a)];

describe('restoration corruptions', () => {
  it('are deterministic in the seed and differ between seeds', () => {
    const x = patch();
    const a = corruptPatch(x, SHAPE, DEFAULT_RESTORATION_TRANSFORMS, mulberry32(7));
    const b = corruptPatch(x, SHAPE, DEFAULT_RESTORATION_TRANSFORMS, mulberry32(7));
    const c = corruptPatch(x, SHAPE, DEFAULT_RESTORATION_TRANSFORMS, mulberry32(8));
    expect(a.image).toEqual(b.image);
    expect(a.applied).toEqual(b.applied);
    expect(a.image).not.toEqual(c.image);
  });

  it('keep the shape and the patch intensity range, and leave the input untouched', () => {
    const x = patch();
    const before = Float32Array.from(x);
    const [lo, hi] = range(x);
    for (let s = 0; s < 40; s++) {
      const { image } = corruptPatch(x, SHAPE, { nonLinear: 1, localShuffle: 1, inPainting: 0.5, outPainting: 0.5 }, mulberry32(s));
      expect(image.length).toBe(x.length);
      const [a, b] = range(image);
      expect(a).toBeGreaterThanOrEqual(lo - 1e-5);
      expect(b).toBeLessThanOrEqual(hi + 1e-5);
    }
    expect(x).toEqual(before);
    expect(() => corruptPatch(x, [8, 8, 8], DEFAULT_RESTORATION_TRANSFORMS, mulberry32(1))).toThrow(/values for a 8×8×8 patch/);
  });

  it('the intensity curve is monotone from 0 to 1; the non-linear transform keeps the voxel order (or reverses it)', () => {
    for (let s = 0; s < 20; s++) {
      const lut = randomIntensityCurve(mulberry32(s));
      expect(lut[0]).toBeGreaterThanOrEqual(0);
      expect(lut[lut.length - 1]).toBe(1);
      for (let i = 1; i < lut.length; i++) expect(lut[i]).toBeGreaterThanOrEqual(lut[i - 1]);
    }
    const x = patch();
    const { image, applied } = corruptPatch(x, SHAPE, only({ nonLinear: 1 }), mulberry32(3));
    expect(applied).toEqual({ nonLinear: true, localShuffle: false, painting: 'none' });
    expect(image).not.toEqual(x);
    const order = [...x.keys()].sort((i, j) => x[i] - x[j]);
    const mapped = order.map((i) => image[i]);
    const up = mapped.every((v, k) => k === 0 || v >= mapped[k - 1] - 1e-6);
    const down = mapped.every((v, k) => k === 0 || v <= mapped[k - 1] + 1e-6);
    expect(up || down).toBe(true);
  });

  it('local shuffling permutes values (same multiset) without touching most of the patch', () => {
    const x = patch();
    const { image, applied } = corruptPatch(x, SHAPE, only({ localShuffle: 1 }), mulberry32(5));
    expect(applied.localShuffle).toBe(true);
    expect([...image].sort((a, b) => a - b)).toEqual([...x].sort((a, b) => a - b));
    const changed = image.filter((v, i) => v !== x[i]).length;
    expect(changed).toBeGreaterThan(0);
  });

  it('in-painting replaces boxes (a minority of voxels) with noise; out-painting replaces most of the patch', () => {
    const x = patch();
    const inp = corruptPatch(x, SHAPE, only({ inPainting: 1 }), mulberry32(11));
    expect(inp.applied.painting).toBe('in');
    const inChanged = inp.image.filter((v, i) => v !== x[i]).length / x.length;
    expect(inChanged).toBeGreaterThan(0.001);
    expect(inChanged).toBeLessThan(0.5);
    const out = corruptPatch(x, SHAPE, only({ outPainting: 1 }), mulberry32(11));
    expect(out.applied.painting).toBe('out');
    const outKept = out.image.filter((v, i) => v === x[i]).length / x.length;
    expect(outKept).toBeGreaterThan(0.05);
    expect(outKept).toBeLessThan(0.95);
    // Nothing applied at probability 0.
    expect(corruptPatch(x, SHAPE, only({}), mulberry32(1)).image).toEqual(x);
  });

  it('corrupts each patch of a batch on its own; in + out painting probabilities above 1 are refused', () => {
    const x = patch();
    const batch = new Float32Array(2 * x.length);
    batch.set(x, 0);
    batch.set(x, x.length);
    const y = corruptBatch(batch, 2, SHAPE, DEFAULT_RESTORATION_TRANSFORMS, mulberry32(2));
    expect(y.subarray(0, x.length)).not.toEqual(y.subarray(x.length));
    expect(RestorationTransformsSchema.safeParse({ inPainting: 0.6, outPainting: 0.6 }).success).toBe(false);
  });

  it('the loss is the mean squared error with its exact gradient', () => {
    const { loss, grad } = restorationLoss(Float32Array.from([1, 2, 4]), Float32Array.from([1, 0, 1]));
    expect(loss).toBeCloseTo((0 + 4 + 9) / 3, 6);
    expect([...grad].map((g) => +g.toFixed(6))).toEqual([0, +(4 / 3).toFixed(6), 2]);
  });
});

describe('restoration training on the Med3D trainer', () => {
  let kernels: ConvKernels;
  beforeAll(async () => {
    kernels = (await selectConvKernels()).kernels;
  });

  const model = PlanSchema.parse({ model: { architecture: 'med3d', depth: 10, widthMultiplier: 0.0625, patch: [16, 16, 16] } }).model;

  it('lowers the restoration loss on unlabelled volumes (labels never needed)', async () => {
    const arch = restorationArchitecture(model);
    expect(arch.config.head).toMatchObject({ kind: 'unet', numClasses: 1 });
    // Unlabelled: the labels are dropped, so a trainer that read them would fail.
    const cases = Array.from({ length: 4 }, (_, i) => {
      const { label: _l, ...c } = sphereCase(i + 1, 24, 0.1, [4, 8]);
      return c;
    });
    const trainer = createMed3dTrainer(arch, kernels);
    const w0 = arch.init(3);
    const res = await trainer.train({ weights: w0, cases, steps: 40, batchSize: 2, learningRate: 0.01, seed: 5, objective: 'restore' });
    expect(Number.isFinite(res.loss)).toBe(true);
    expect(res.loss).toBeLessThan(0.7 * res.firstLoss);
    // The encoder moved: pretraining trains what will be shared.
    const c1 = res.weights.get('encoder.conv1.weight')!.data;
    expect(c1.some((v, i) => Math.abs(v - w0.get('encoder.conv1.weight')!.data[i]) > 1e-4)).toBe(true);
    expect(res.samples).toBe(4);
  }, 60_000);

  it('refuses the restore objective on a segmentation model, and the restoration model without it', async () => {
    const seg = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'unet', numClasses: 2 }, patch: [16, 16, 16] });
    const cases = [sphereCase(1, 16, 0.1)];
    await expect(createMed3dTrainer(seg, kernels).train({ weights: seg.init(1), cases, steps: 1, batchSize: 2, learningRate: 0.01, seed: 1, objective: 'restore' })).rejects.toThrow(/restoration model/);
    const rest = restorationArchitecture(model);
    await expect(createMed3dTrainer(rest, kernels).train({ weights: rest.init(1), cases, steps: 1, batchSize: 2, learningRate: 0.01, seed: 1 })).rejects.toThrow(/objective restore/);
    expect(() => restorationArchitecture({ ...model, architecture: 'tiny3d' })).toThrow(/med3d/);
  });
});
