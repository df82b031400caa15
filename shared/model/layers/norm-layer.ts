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
  /** Its eval-mode ONNX nodes (opset 17, NCDHW) on input `x`, for `medfl model export --format onnx`; returns the output. */
  onnx(g: OnnxNormGraph, x: string, groups: number | undefined): string;
}

/** The part of the ONNX graph builder a norm layer writes with (shared/checkpoints/onnx-write.ts). */
export interface OnnxNormGraph {
  /** The layer's name prefix (node names start with it) and its channel count. */
  readonly prefix: string;
  readonly channels: number;
  /** The initializer of one of the layer's tensors (PyTorch layout), added once. */
  param(s: NormParamSuffix): string;
  /** The values of one of the layer's tensors. */
  value(s: NormParamSuffix): Float32Array;
  floatConstant(dims: number[], values: Float32Array): string;
  int64Constant(dims: number[], values: readonly number[]): string;
  /** A node named `name`; `floats` are its float attributes by name. */
  node(op: string, inputs: string[], name: string, floats?: Readonly<Record<string, number>>): string;
}
