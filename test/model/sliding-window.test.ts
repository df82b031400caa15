/**
 * Sliding-window inference (shared/model/sliding-window.ts) on its own with small stand-in networks, and through
 * the Med3D trainer: one window covering the volume is the whole-volume pass, overlapping windows agree with it
 * on a briefly trained model, flip TTA of a flip-equivariant network changes nothing, and the memory bound picks
 * windows only for volumes a whole pass would not fit.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { createMed3d, type Med3dOptions } from '../../shared/model/med3d.ts';
import { createMed3dTrainer, med3dWholeVolumeBytes } from '../../shared/model/med3d-trainer.ts';
import {
  blendWeights,
  chooseInference,
  flipAveraged,
  InferenceSettingsSchema,
  slidingWindowProbs,
  WHOLE_VOLUME_MAX_BYTES,
  windowSize,
  windowStarts,
  type Shape3,
  type WindowForward,
} from '../../shared/model/sliding-window.ts';
import type { VolumeCase } from '../../shared/model/types.ts';
import { teacherProbs } from '../../site-agent/training/pseudo-label.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';
import { sphereCase } from '../helpers/volumes.ts';

let kernels: ConvKernels;
beforeAll(async () => {
  kernels = (await selectConvKernels()).kernels;
});

const randomImage = (n: number, seed: number) => {
  const rng = mulberry32(seed);
  return Float32Array.from({ length: n }, () => gaussian(rng));
};

/** Two-class softmax of a per-voxel score: translation- and flip-equivariant, so windows cannot change it. */
const pointwise: WindowForward = (input) => {
  const out = new Float32Array(input.length * 2);
  for (let i = 0; i < input.length; i++) {
    const p = 1 / (1 + Math.exp(-2 * input[i]));
    out[2 * i] = 1 - p;
    out[2 * i + 1] = p;
  }
  return out;
};

/** A 3-tap mean along every axis (zero padding) then `pointwise`: depends on neighbours, still flip-equivariant. */
const blurred =
  (taps: readonly [number, number, number]): WindowForward =>
  (input, n, [d, h, w]) => {
    let x = input;
    const strides = [h * w, w, 1];
    const sizes = [d, h, w];
    for (let a = 0; a < 3; a++) {
      const y = new Float32Array(x.length);
      for (let i = 0; i < x.length; i++) {
        const pos = Math.floor(i / strides[a]) % sizes[a];
        const prev = pos > 0 ? x[i - strides[a]] : 0;
        const next = pos < sizes[a] - 1 ? x[i + strides[a]] : 0;
        y[i] = taps[0] * prev + taps[1] * x[i] + taps[2] * next;
      }
      x = y;
    }
    return pointwise(x, n, [d, h, w]);
  };

const maxAbsDiff = (a: Float32Array, b: Float32Array) => {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

describe('window geometry and blending weights', () => {
  it('places windows nnU-Net’s way: first at 0, last flush with the end, neighbours at most window·(1 − overlap) apart', () => {
    for (const [extent, w, overlap] of [[192, 80, 0.5], [160, 80, 0.5], [97, 32, 0.25], [40, 32, 0.5]] as const) {
      const s = windowStarts(extent, w, overlap);
      expect(s[0]).toBe(0);
      expect(s.at(-1)).toBe(extent - w);
      for (let i = 1; i < s.length; i++) expect(s[i] - s[i - 1]).toBeLessThanOrEqual(w * (1 - overlap));
    }
    expect(windowStarts(192, 80, 0.5)).toEqual([0, 37, 75, 112]);
    expect(windowStarts(24, 32, 0.5)).toEqual([0]);
    // patch × 2 by default, capped by the volume, rounded up to the network's stride 8.
    expect(windowSize(undefined, [40, 48, 40], [192, 192, 160])).toEqual([80, 96, 80]);
    expect(windowSize(undefined, [40, 48, 40], [50, 96, 20])).toEqual([56, 96, 24]);
    expect(windowSize([30, 30, 30], [8, 8, 8], [100, 100, 100])).toEqual([32, 32, 32]);
  });

  it('Gaussian weights: peak 1 at the centre, e^-1/2 one σ = side/8 away, mirror-symmetric; uniform is all ones', () => {
    const win: Shape3 = [16, 24, 32];
    const g = blendWeights(win, 'gaussian');
    const at = (z: number, y: number, x: number) => g[(z * 24 + y) * 32 + x];
    // Centre (n−1)/2 falls between voxels: the middle ones hold the peak; along D (σ = 16/8 = 2) the weight
    // falls as e^(−(z − 7.5)²/(2σ²)).
    expect(at(7, 11, 15)).toBeCloseTo(1, 6);
    expect(at(8, 12, 16)).toBeCloseTo(1, 6);
    for (const z of [0, 3, 11, 15]) expect(at(z, 11, 15) / at(7, 11, 15)).toBeCloseTo(Math.exp(-((z - 7.5) ** 2 - 0.25) / 8), 6);
    expect(Math.max(...g)).toBeCloseTo(1, 6);
    expect(at(0, 0, 0)).toBeGreaterThan(0);
    expect(at(0, 0, 0)).toBeCloseTo(at(15, 23, 31), 12);
    expect(at(3, 5, 9)).toBeCloseTo(at(12, 18, 22), 7);
    expect(blendWeights([8, 8, 8], 'uniform').every((v) => v === 1)).toBe(true);
  });

  it('normalises per voxel, borders and corners included: a constant field comes back unchanged', async () => {
    const shape: Shape3 = [40, 36, 44];
    const constant: WindowForward = (_input, n, [d, h, w]) => Float32Array.from({ length: n * d * h * w * 3 }, (_, i) => [0.2, 0.3, 0.5][i % 3]);
    for (const blend of ['gaussian', 'uniform'] as const) {
      const p = await slidingWindowProbs(new Float32Array(40 * 36 * 44), shape, { window: [16, 16, 16], overlap: 0.5, blend, batch: 3, numClasses: 3 }, constant);
      expect(maxAbsDiff(p, Float32Array.from({ length: p.length }, (_, i) => [0.2, 0.3, 0.5][i % 3]))).toBeLessThan(1e-6);
    }
  });

  it('blends each voxel as Σ gᵢpᵢ / Σ gᵢ over the windows covering it, a border voxel by its one window alone', async () => {
    // Each window paints class 1 with its own index: the blend is the weighted mean of window indices.
    const shape: Shape3 = [8, 8, 24];
    let calls = 0;
    const indexed: WindowForward = (_input, n, [d, h, w]) => {
      const out = new Float32Array(n * d * h * w * 2);
      for (let b = 0; b < n; b++) {
        const k = calls++;
        for (let v = 0; v < d * h * w; v++) {
          out[(b * d * h * w + v) * 2] = 1 - k / 4;
          out[(b * d * h * w + v) * 2 + 1] = k / 4;
        }
      }
      return out;
    };
    const starts = windowStarts(24, 16, 0.5);
    expect(starts).toEqual([0, 8]);
    const p = await slidingWindowProbs(new Float32Array(8 * 8 * 24), shape, { window: [8, 8, 16], overlap: 0.5, blend: 'gaussian', batch: 1, numClasses: 2 }, indexed);
    const g = blendWeights([8, 8, 16], 'gaussian');
    const gAt = (z: number, y: number, x: number) => g[(z * 8 + y) * 16 + x];
    const p1 = (z: number, y: number, x: number) => p[((z * 8 + y) * 24 + x) * 2 + 1];
    // x < 8: only window 0 (index 0); x ≥ 16: only window 1 (index 1/4), however small its weight there.
    expect(p1(0, 0, 0)).toBe(0);
    expect(p1(7, 7, 23)).toBeCloseTo(0.25, 6);
    for (const x of [8, 11, 12, 15]) {
      const [g0, g1] = [gAt(3, 4, x), gAt(3, 4, x - 8)];
      expect(p1(3, 4, x)).toBeCloseTo((g0 * 0 + g1 * 0.25) / (g0 + g1), 6);
    }
    // Rows sum to 1 everywhere.
    for (let v = 0; v < p.length / 2; v++) expect(Math.abs(p[2 * v] + p[2 * v + 1] - 1)).toBeLessThan(1e-6);
  });

  it('a translation-equivariant network gives the same probabilities by windows as in one pass', async () => {
    const shape: Shape3 = [33, 40, 27];
    const image = randomImage(33 * 40 * 27, 5);
    const one = pointwise(image, 1, shape);
    const win = await slidingWindowProbs(image, shape, { window: [16, 24, 16], overlap: 0.5, blend: 'gaussian', batch: 4, numClasses: 2 }, pointwise);
    expect(maxAbsDiff(win, one)).toBeLessThan(1e-6);
  });
});

describe('flip test-time augmentation', () => {
  it('of a flip-equivariant network equals no TTA; of one that is not, it differs', () => {
    const win: Shape3 = [8, 16, 8];
    const image = randomImage(2 * 8 * 16 * 8, 9);
    const symmetric = blurred([0.25, 0.5, 0.25]);
    expect(maxAbsDiff(flipAveraged(symmetric, 2)(image, 2, win), symmetric(image, 2, win))).toBeLessThan(1e-6);
    const lopsided = blurred([0.6, 0.4, 0]);
    expect(maxAbsDiff(flipAveraged(lopsided, 2)(image, 2, win), lopsided(image, 2, win))).toBeGreaterThan(0.01);
  });
});

describe('Med3D: window mode against whole mode', () => {
  const opts = (head: 'segmentation' | 'unet', extra: Partial<Med3dOptions> = {}): Med3dOptions => ({
    depth: 10,
    shortcut: 'B',
    widthMultiplier: 0.0625,
    head: { kind: head, numClasses: 2 },
    patch: [16, 16, 16],
    ...extra,
  });

  it.each(['segmentation', 'unet'] as const)('one window covering the volume gives the whole-volume probabilities and Dice (%s head)', async (head) => {
    const whole = createMed3d(opts(head));
    const windowed = createMed3d(opts(head, { inference: InferenceSettingsSchema.parse({ mode: 'window' }) }));
    const w = whole.init(4);
    // 20×24×20: the window (patch × 2 = 32, capped by the volume → 24 after rounding to 8) covers it, padded as whole mode pads.
    const base = sphereCase(7, 24, 0.3, [4, 7]);
    const crop = new Float32Array(20 * 24 * 20);
    const label = new Uint8Array(20 * 24 * 20);
    for (let z = 0; z < 20; z++) for (let y = 0; y < 24; y++) for (let x = 0; x < 20; x++) {
      crop[(z * 24 + y) * 20 + x] = base.image[(z * 24 + y) * 24 + x];
      label[(z * 24 + y) * 20 + x] = base.label![(z * 24 + y) * 24 + x];
    }
    const vc: VolumeCase = { id: 'c', shape: [20, 24, 20], image: crop, label };
    const a = await createMed3dTrainer(whole, kernels).predictProbs(w, vc);
    const b = await createMed3dTrainer(windowed, kernels).predictProbs(w, vc);
    expect(maxAbsDiff(a, b)).toBeLessThan(1e-6);
    const ea = await createMed3dTrainer(whole, kernels).evaluate(w, [vc]);
    const eb = await createMed3dTrainer(windowed, kernels).evaluate(w, [vc]);
    expect(eb.meanDice).toBeCloseTo(ea.meanDice, 6);
  });

  it('overlapping windows on a larger volume: finite, rows sum to 1, and close to the whole volume on a trained model', async () => {
    const arch = createMed3d(opts('unet'));
    const trainer = createMed3dTrainer(arch, kernels);
    const train = Array.from({ length: 6 }, (_, i) => sphereCase(i + 1, 16, 0.3, [3, 5]));
    const trained = await trainer.train({ weights: arch.init(1), cases: train, steps: 40, batchSize: 2, learningRate: 0.02, seed: 2 });
    const vc = sphereCase(77, 40, 0.3, [6, 9]);
    const settings = InferenceSettingsSchema.parse({ mode: 'window', window: [24, 24, 24], overlap: 0.5 });
    const windowed = createMed3dTrainer(createMed3d(opts('unet', { inference: settings })), kernels);
    const whole = await trainer.predictProbs(trained.weights, vc);
    const win = await windowed.predictProbs(trained.weights, vc);
    let agree = 0;
    let absDiff = 0;
    for (let v = 0; v < win.length / 2; v++) {
      expect(Number.isFinite(win[2 * v]) && Number.isFinite(win[2 * v + 1])).toBe(true);
      expect(Math.abs(win[2 * v] + win[2 * v + 1] - 1)).toBeLessThan(1e-5);
      if (win[2 * v + 1] > 0.5 === whole[2 * v + 1] > 0.5) agree++;
      absDiff += Math.abs(win[2 * v + 1] - whole[2 * v + 1]);
    }
    const n = win.length / 2;
    // The model learned the balls (else agreement would be trivial): its whole-volume Dice is well above chance.
    expect((await trainer.evaluate(trained.weights, [vc])).meanDice).toBeGreaterThan(0.6);
    // Measured: every voxel's label agrees, mean |Δp| 2e-5 (BatchNorm's running statistics make the net translation-
    // equivariant; only context beyond a window's border differs). Instance norm normalises per window: 96 % agree.
    expect(agree / n).toBeGreaterThan(0.99);
    expect(absDiff / n).toBeLessThan(0.01);
    expect(maxAbsDiff(win, whole)).toBeGreaterThan(0); // the windows did run
    expect((await windowed.evaluate(trained.weights, [vc])).meanDice).toBeGreaterThan(0.6);
  });

  it('whole mode with flipTTA is the mean over the 8 flips (as the teacher’s own TTA computes it)', async () => {
    const plain = createMed3dTrainer(createMed3d(opts('segmentation')), kernels);
    const tta = createMed3dTrainer(createMed3d(opts('segmentation', { inference: InferenceSettingsSchema.parse({ flipTTA: true }) })), kernels);
    const w = plain.architecture.init(3);
    const vc = sphereCase(5, 16, 0.3, [3, 5]);
    const expected = await teacherProbs(plain, w, vc, true);
    const got = await tta.predictProbs(w, vc);
    expect(maxAbsDiff(got, expected)).toBeLessThan(1e-6);
    expect(maxAbsDiff(got, await plain.predictProbs(w, vc))).toBeGreaterThan(1e-4);
    // The teacher does not flip a model that already does.
    expect(maxAbsDiff(await teacherProbs(tta, w, vc, true), got)).toBe(0);
  });
});

describe('the memory bound', () => {
  it('keeps whole mode unless the estimated pass exceeds the bound, then windows of patch × 2', () => {
    const quarter = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: { kind: 'segmentation', numClasses: 2 }, patch: [40, 48, 40] });
    const fullUnet = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 1, head: { kind: 'unet', numClasses: 2 }, patch: [40, 48, 40] });
    const big: Shape3 = [192, 224, 160];
    // 6.9 M voxels. ¼-width MedicalNet head: ~0.2 GiB; full-width U-Net head: 5 × 32 channels live at full resolution, ~4.3 GiB.
    expect(med3dWholeVolumeBytes(quarter, big)).toBeLessThan(WHOLE_VOLUME_MAX_BYTES / 8);
    expect(med3dWholeVolumeBytes(fullUnet, big)).toBeGreaterThan(WHOLE_VOLUME_MAX_BYTES);
    expect(chooseInference(undefined, quarter.patchShape, big, (p) => med3dWholeVolumeBytes(quarter, p))).toEqual({ kind: 'whole', flipTTA: false });
    const auto = chooseInference(undefined, fullUnet.patchShape, big, (p) => med3dWholeVolumeBytes(fullUnet, p));
    expect(auto).toEqual({ kind: 'window', options: { window: [80, 96, 80], overlap: 0.5, blend: 'gaussian', batch: 2 }, flipTTA: false, auto: true });
    // The bound is on the padded volume.
    let seen: Shape3 | undefined;
    chooseInference(undefined, [8, 8, 8], [17, 9, 8], (p) => { seen = p; return 0; });
    expect(seen).toEqual([24, 16, 8]);
  });
});
