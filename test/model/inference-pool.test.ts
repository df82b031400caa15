/**
 * Inference on a buffer pool (med3d-trainer.ts inferenceOps): every forward pass of an evaluation reuses the
 * previous pass's buffers, and the probabilities are exactly those of passes on fresh arrays — over several
 * batches of windows (a smaller last batch, windows past the volume's edge that need zero padding in a reused
 * input buffer, windows that stale values would corrupt) and over several whole volumes in one evaluate().
 * The pool's bound: past maxBytes it hands out arrays it does not keep.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { BufferPool } from '../../shared/model/graph/pool.ts';
import { act } from '../../shared/model/graph/tape.ts';
import { createMed3d, type Med3dArchitecture } from '../../shared/model/med3d.ts';
import { med3dForward } from '../../shared/model/med3d-forward.ts';
import { createMed3dTrainer, inferenceOps, med3dWindowLogits, type InferenceOps } from '../../shared/model/med3d-trainer.ts';
import { InferenceSettingsSchema, slidingWindowProbs, windowSize } from '../../shared/model/sliding-window.ts';
import { windowBlendOf } from '../../shared/model/window-blend.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

let kernels: ConvKernels;
beforeAll(async () => {
  kernels = (await selectConvKernels()).kernels;
});

function storeOf(arch: Med3dArchitecture, w: TensorBundle): ParamStore {
  const values = new Map(arch.params().map((p) => [p.name, new Float32Array(w.get(p.name)!.data)]));
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  return { value: (n) => values.get(n)!, shape: (n) => shapes.get(n)!, grad: () => undefined };
}

/** The same eval-mode passes on fresh arrays every time: what inference did before the pool. */
const freshOps = (k: ConvKernels, store: ParamStore): InferenceOps => ({
  beginPass: () => createMed3dTrainOps({ kernels: k, store, training: false }),
  take: (n) => new Float32Array(n),
});

const image = (n: number, seed: number) => {
  const rng = mulberry32(seed);
  return Float32Array.from({ length: n }, () => gaussian(rng));
};

const maxAbsDiff = (a: Float32Array, b: Float32Array) => {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

describe('inference on a buffer pool', () => {
  const settings = InferenceSettingsSchema.parse({ mode: 'window', overlap: 0.5, batch: 2, window: [16, 16, 16] });
  for (const head of ['segmentation', 'unet'] as const) {
    it(`windows in batches give the probabilities of fresh passes exactly (${head} head)`, async () => {
      const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: head, numClasses: 2 }, patch: [8, 8, 8], inference: settings });
      const w = arch.init(5);
      // 27×12×30 in 16³ windows: 3×1×3 = 9 windows in 5 batches (the last of one), every window past the volume's
      // edge along H (its padding must be zeros in the reused input buffer).
      const shape = [27, 12, 30] as const;
      const x = image(shape[0] * shape[1] * shape[2], 11);
      const got = await createMed3dTrainer(arch, kernels).predictProbs(w, { id: 'v', shape, image: x });
      const options = { window: windowSize(settings.window, arch.patchShape, shape), overlap: settings.overlap, blend: settings.blend, batch: settings.batch, numClasses: 2 };
      // The same blending kernel as the trainer's (the addon's when built): only the pool differs.
      const fresh = freshOps(kernels, storeOf(arch, w));
      const want = await slidingWindowProbs(x, shape, options, { logits: med3dWindowLogits(arch, fresh), blend: windowBlendOf(kernels, fresh.take) });
      expect(maxAbsDiff(got, want)).toBe(0);
    });
  }

  it('a second pass runs on the first pass’s buffers', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'unet', numClasses: 2 }, patch: [8, 8, 8] });
    const inf = inferenceOps(kernels, storeOf(arch, arch.init(2)));
    const params = new Map(arch.params().map((p) => [p.name, p.name]));
    const x = act(image(16 ** 3, 3), [1, 16, 16, 16, 1], false);
    const first = med3dForward(arch, params, x, inf.beginPass()).data;
    const copy = first.slice();
    const second = med3dForward(arch, params, x, inf.beginPass()).data;
    expect(second).toBe(first);
    expect(maxAbsDiff(second, copy)).toBe(0);
  });

  it('whole volumes of two sizes in one evaluate() score as each alone', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [8, 8, 8] });
    const w = arch.init(9);
    const cases = [[16, 24, 16], [24, 16, 16], [16, 24, 16]].map((s, i) => {
      const n = s[0] * s[1] * s[2];
      const img = image(n, 20 + i);
      return { id: `c${i}`, shape: s as [number, number, number], image: img, label: Uint8Array.from(img, (v) => (v > 0.3 ? 1 : 0)) };
    });
    const trainer = createMed3dTrainer(arch, kernels);
    const together = await trainer.evaluate(w, cases);
    const alone = await Promise.all(cases.map((c) => trainer.evaluate(w, [c])));
    expect(together.meanDice).toBeCloseTo(alone.reduce((a, r) => a + r.meanDice, 0) / 3, 12);
  });
});

describe('BufferPool bound', () => {
  it('keeps at most maxBytes and hands out untracked arrays past it', () => {
    const pool = new BufferPool({ maxBytes: 4 * 100 });
    const a = pool.take(60);
    const b = pool.take(60);
    expect(pool.bytes).toBe(240);
    pool.untake(b); // a loose array is given back without complaint
    pool.recycle();
    expect(pool.take(60)).toBe(a);
    expect(pool.take(60)).not.toBe(b);
    expect(pool.bytes).toBe(240);
    expect(() => new BufferPool({ maxBytes: -1 })).toThrow(/maxBytes/);
  });
});
