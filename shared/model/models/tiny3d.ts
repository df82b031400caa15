/** tiny3d, the demo net, as the registry sees it: plan fields `patch`, `numClasses`, `width`; trains on tfjs. */
import { isDefaultInference } from '../sliding-window.ts';
import { createTiny3d, TINY3D_ID } from '../tiny3d.ts';
import type { ModelDefinition, PlanProblem } from '../model-definition.ts';

export const tiny3dModel: ModelDefinition<typeof TINY3D_ID> = {
  id: TINY3D_ID,
  summary: 'the small 3D segmentation net of the demo (tfjs)',
  create: (model) => createTiny3d({ patch: [...model.patch] as [number, number, number], numClasses: model.numClasses, width: model.width }),
  modelProblems(model) {
    const out: PlanProblem[] = [];
    if (!isDefaultInference(model.inference)) {
      out.push({ path: ['inference'], message: 'inference mode window and flipTTA need architecture med3d with a segmentation or unet head (per-voxel output)' });
    }
    if ((model.inputChannels ?? 1) !== 1) out.push({ path: ['inputChannels'], message: 'inputChannels above 1 needs architecture med3d (tiny3d takes one channel)' });
    return out;
  },
  planProblems(plan) {
    if (!plan.local.optimizer) return [];
    return [{ path: ['local', 'optimizer'], message: 'applies to model.architecture med3d; the tiny3d demo net always trains with Adam at local.learningRate (remove local.optimizer or use med3d)' }];
  },
  defaultKeepLocal: () => [],
  async createTrainer(arch, opts) {
    const [{ selectEngine }, { createTfjsTrainer, tiny3dForward }] = await Promise.all([import('../../engine/select.ts'), import('../tfjs-trainer.ts')]);
    const engine = await selectEngine({ force: opts.engine });
    return { trainer: createTfjsTrainer(arch, engine, tiny3dForward), tried: engine.tried };
  },
  exportFormats: [],
};
