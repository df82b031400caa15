/**
 * Both trainers as teacher and student: predictProbs gives softmax rows whose argmax is the evaluated prediction,
 * and training on soft-target, weighted cases with dropout runs, is deterministic in the seed, and ignores masked voxels.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';
import { createTrainer } from '../../shared/model/trainer-factory.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import type { Trainer, VolumeCase } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { sphereCase } from '../helpers/volumes.ts';

/** The case as a pseudo-labelled one: soft targets from its label (0.9 / 0.1), half the voxels masked out. */
function pseudo(vc: VolumeCase, C: number): VolumeCase {
  const n = vc.image.length;
  const target = new Float32Array(n * C);
  const weight = new Float32Array(n);
  for (let v = 0; v < n; v++) {
    for (let c = 0; c < C; c++) target[v * C + c] = c === vc.label![v] ? 0.9 : 0.1 / (C - 1);
    weight[v] = v % 2;
  }
  return { id: `${vc.id}-pseudo`, shape: vc.shape, image: vc.image, target, weight };
}

async function checkTrainer(trainer: Trainer, w0: TensorBundle, cases: VolumeCase[], batchSize: number): Promise<void> {
  const C = trainer.architecture.numClasses;
  const mixed = [...cases, ...cases.map((c) => pseudo(c, C))];
  const req = { weights: w0, cases: mixed, steps: 3, batchSize, learningRate: 0.003, seed: 5, dropout: 0.5 };
  const a = await trainer.train(req);
  const b = await trainer.train(req);
  expect(Number.isFinite(a.loss)).toBe(true);
  expect(a.loss).toBe(b.loss);
  const c = await trainer.train({ ...req, dropout: 0 });
  expect(c.loss).not.toBe(a.loss); // dropout changes the run
  const probs = await trainer.predictProbs(a.weights, cases[0]);
  const n = cases[0].image.length;
  expect(probs.length).toBe(n * C);
  let argmaxFg = 0;
  for (let v = 0; v < n; v++) {
    let s = 0;
    for (let k = 0; k < C; k++) s += probs[v * C + k];
    expect(Math.abs(s - 1)).toBeLessThan(1e-5);
    if (probs[v * C + 1] > probs[v * C]) argmaxFg++;
  }
  // The probabilities' argmax is what evaluate() scores: a perfect-label case built from it gets Dice 1.
  const label = new Uint8Array(n).map((_, v) => (probs[v * C + 1] > probs[v * C] ? 1 : 0));
  if (argmaxFg > 0) expect((await trainer.evaluate(a.weights, [{ ...cases[0], label }])).meanDice).toBeCloseTo(1, 6);
}

describe('trainers as teacher and student', () => {
  it('tiny3d', async () => {
    const plan = defaultPlan({ model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 1 } });
    const arch = architectureFor(plan.model);
    const { trainer } = await createTrainer(arch, {});
    await checkTrainer(trainer, arch.init(1), [1, 2].map((s) => sphereCase(s, 16, 0.3)), 2);
  }, 60_000);

  describe('med3d', () => {
    let kernels: Awaited<ReturnType<typeof selectConvKernels>>['kernels'];
    beforeAll(async () => {
      kernels = (await selectConvKernels()).kernels;
    });
    it('segmentation head', async () => {
      const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] });
      await checkTrainer(createMed3dTrainer(arch, kernels), arch.init(1), [1, 2].map((s) => sphereCase(s, 16, 0.3)), 2);
    }, 60_000);
  });
});
