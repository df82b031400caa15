/**
 * Every normalisation layer a plan can name in `model.norm`, listed once. Adding one: write its module (a NormLayer:
 * tensors, tfjs eval, tape op with a JS kernel and optionally the addon's kernel by name), add it here, and give it
 * a case in test/model/norm-layers-torch.test.ts (its PyTorch parity).
 */
import { batchNorm } from './batch-norm.ts';
import { groupNorm } from './group-norm.ts';
import { instanceNorm } from './instance-norm.ts';
import type { NormLayer } from './norm-layer.ts';

export const NORM_LAYERS = [batchNorm, groupNorm, instanceNorm] as const;

export type NormKind = (typeof NORM_LAYERS)[number]['kind'];

/** The values `model.norm` accepts, first = the default (MedicalNet's BatchNorm). */
export const NORM_KINDS = NORM_LAYERS.map((l) => l.kind) as [NormKind, ...NormKind[]];

export function normLayer(kind: string): NormLayer {
  const layer = NORM_LAYERS.find((l) => l.kind === kind);
  if (!layer) throw new Error(`unknown norm layer "${kind}" (one of ${NORM_KINDS.join(', ')})`);
  return layer;
}
