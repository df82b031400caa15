/**
 * Med3D (MedicalNet's 3D ResNet with a site head) as the registry sees it: which plan fields build it, their checks,
 * FedBN for norm layers with running statistics, and its trainer on MedFL's tape with the selected convolution kernels.
 */
import { isDefaultInference } from '../sliding-window.ts';
import { createMed3d, MED3D_ID, med3dNormProblem, type Med3dArchitecture } from '../med3d.ts';
import type { ModelDefinition, PlanModel, PlanProblem } from '../model-definition.ts';
import { normLayer } from '../layers/norm-layers.ts';

function headOf(model: PlanModel) {
  return model.head === 'classification'
    ? { kind: 'classification' as const, numClasses: model.numClasses, dropout: model.dropout }
    : { kind: model.head, numClasses: model.numClasses, channels: model.headChannels };
}

export const med3dModel: ModelDefinition<typeof MED3D_ID> = {
  id: MED3D_ID,
  summary: 'MedicalNet 3D ResNet-10…101 encoder with a segmentation, U-Net or classification head (MedFL tape engine)',
  create: (model) =>
    createMed3d({
      depth: model.depth,
      shortcut: model.shortcut,
      widthMultiplier: model.widthMultiplier,
      patch: [...model.patch] as [number, number, number],
      head: headOf(model),
      norm: model.norm,
      normGroups: model.normGroups,
      ...(model.inputChannels !== undefined ? { inChannels: model.inputChannels } : {}),
      ...(model.inference ? { inference: model.inference } : {}),
    }),
  modelProblems(model) {
    const out: PlanProblem[] = [];
    if (!isDefaultInference(model.inference) && model.head === 'classification') {
      out.push({ path: ['inference'], message: 'inference mode window and flipTTA need architecture med3d with a segmentation or unet head (per-voxel output)' });
    }
    if (model.norm === 'group') {
      const head = model.head === 'classification' ? { kind: model.head, numClasses: model.numClasses } : { kind: model.head, numClasses: model.numClasses, channels: model.headChannels };
      const problem = med3dNormProblem({ depth: model.depth, shortcut: model.shortcut, widthMultiplier: model.widthMultiplier, head, patch: model.patch, norm: model.norm, normGroups: model.normGroups });
      if (problem) out.push({ path: ['normGroups'], message: problem });
    }
    return out;
  },
  planProblems(plan) {
    const m = plan.model;
    if (m.head === 'classification' || m.patch.every((d) => d % 8 === 0)) return [];
    return [{ path: ['model', 'patch'], message: `med3d ${m.head} heads need patch sides that are multiples of 8 (the encoder's ⅛ grid), got [${m.patch.join(', ')}]` }];
  },
  // Sites' scanners differ, and an average of their batch statistics describes no site: such layers stay local.
  defaultKeepLocal: (model) => (normLayer(model.norm).runningStatistics ? ['norm'] : []),
  async createTrainer(arch, opts) {
    const [{ selectConvKernels }, { createMed3dTrainer }] = await Promise.all([import('../../engine/conv-select.ts'), import('../med3d-trainer.ts')]);
    const sel = await selectConvKernels({ force: opts.kernels });
    return { trainer: createMed3dTrainer(arch as Med3dArchitecture, sel.kernels), tried: sel.tried };
  },
  exportFormats: ['torch', 'onnx'],
};
