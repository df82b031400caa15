/**
 * A normalisation layer as one module: its tensors (names, init, which are trained), how it groups channels, its
 * eval forward on tfjs, and its training op on MedFL's tape (forward now, backward recorded) with a JS kernel and the
 * native addon's kernel looked up by name when the addon has it. The Med3D graph, its parameter table and the plan's
 * `model.norm` all read the layers from norm-layers.ts.
 */
import type * as TfModule from '@tensorflow/tfjs';
import type { OpContext } from '../graph/op-context.ts';
import type { Act } from '../graph/tape.ts';

/** PyTorch's default eps of BatchNorm3d, GroupNorm and InstanceNorm3d (MedicalNet keeps it). */
export const NORM_EPS = 1e-5;

export type NormParamSuffix = 'weight' | 'bias' | 'running_mean' | 'running_var';

export interface NormParamSpec {
  /** Name after the layer's prefix: `${prefix}.${suffix}` (PyTorch's state_dict names). */
  readonly suffix: NormParamSuffix;
  /** False for statistics updated by the forward pass, not by gradients. */
  readonly trainable: boolean;
  /** Every element's initial value (PyTorch's reset_parameters / reset_running_stats). */
  readonly init: number;
}

export interface NormLayer<Kind extends string = string> {
  /** The plan's `model.norm` value. */
  readonly kind: Kind;
  /** Running statistics make a layer site-specific (FedBN keeps such layers local by default). */
  readonly runningStatistics: boolean;
  /** Per-channel tensors of one layer, in state_dict order. */
  readonly params: readonly NormParamSpec[];
  /** Groups for `channels` channels with the plan's `normGroups`; undefined when the layer normalises over the batch. */
  groups(channels: number, normGroups: number): number | undefined;
  /** Eval mode on tfjs (model embed and evaluation on tfjs): `param` gives the layer's tensors. */
  evalTfjs(tf: typeof TfModule, x: TfModule.Tensor5D, param: (s: NormParamSuffix) => TfModule.Tensor, groups: number | undefined, relu: boolean): TfModule.Tensor5D;
  /** The training op: `param` gives the store names of the layer's tensors; ReLU fused when `relu`. */
  train(ctx: OpContext, x: Act, param: (s: NormParamSuffix) => string, groups: number | undefined, relu: boolean): Act;
}
