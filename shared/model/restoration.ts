/**
 * The restoration model of self-supervised pretraining: the plan's Med3D encoder (same depth, width, shortcut
 * and norm, so its tensors are exactly the fine-tuning encoder's) under a U-Net-style decoder whose single output
 * channel is the restored intensity (linear, no softmax), trained with a mean squared error. The decoder is the
 * site's own, like a head: only the encoder is ever shared.
 */
import type { Plan } from '../plan/schema.ts';
import { createMed3d, type Med3dArchitecture } from './med3d.ts';
import type { ModelArchitecture } from './types.ts';

/** Training objectives of a trainer: supervised segmentation/classification, or restoration pretraining. */
export type TrainObjective = 'segment' | 'restore';

/** The restoration model for a plan's model section (Med3D only: tiny3d has no separate encoder to pretrain). */
export function restorationArchitecture(model: Plan['model']): Med3dArchitecture {
  if (model.architecture !== 'med3d') throw new Error(`restoration pretraining needs model.architecture med3d, got ${model.architecture}`);
  return createMed3d({
    depth: model.depth,
    shortcut: model.shortcut,
    widthMultiplier: model.widthMultiplier,
    patch: [...model.patch] as [number, number, number],
    head: { kind: 'unet', numClasses: 1 },
    norm: model.norm,
    normGroups: model.normGroups,
  });
}

/** Whether an architecture can be trained with the restoration objective (a one-channel U-Net decoder). */
export function isRestorationArchitecture(arch: ModelArchitecture): arch is Med3dArchitecture {
  const head = (arch as Partial<Med3dArchitecture>).config?.head;
  return head?.kind === 'unet' && head.numClasses === 1;
}

/** Mean squared error of the restored patch against the original, and its gradient (mean over every voxel). */
export function restorationLoss(restored: Float32Array, original: Float32Array): { loss: number; grad: Float32Array } {
  if (restored.length !== original.length) throw new Error(`restorationLoss: ${restored.length} outputs for ${original.length} targets`);
  const n = original.length;
  const grad = new Float32Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const d = restored[i] - original[i];
    sum += d * d;
    grad[i] = (2 * d) / n;
  }
  return { loss: sum / n, grad };
}
