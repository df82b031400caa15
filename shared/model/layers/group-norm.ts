/**
 * GroupNorm (PyTorch nn.GroupNorm, affine): per sample and per group of C/G consecutive channels, normalise over the
 * group's channels and every voxel; no running statistics, so training and inference compute the same thing (which
 * suits batches of 2 and sites whose intensity statistics differ). Kernels: the JS loops of group-norm-kernel.ts,
 * or the addon's `groupNormForward` / `groupNormBackward` when the selected kernels carry them (an addon built
 * before them lacks them: the JS ones run then). InstanceNorm is this layer with G = C (instance-norm.ts).
 */
import type * as TfModule from '@tensorflow/tfjs';
import type { ElementwiseKernels } from '../../engine/elementwise-kernels.ts';
import { act } from '../graph/tape.ts';
import { groupNormBackward, groupNormForward, type GroupNormForward, type GroupNormGrads } from './group-norm-kernel.ts';
import { NORM_EPS, type NormLayer, type NormParamSpec } from './norm-layer.ts';

export interface GroupNormKernels {
  /**
   * GroupNorm over x = n samples of V voxels × C channels with G groups of C/G consecutive channels, then
   * max(y, 0) when `relu`; mean and 1/√(var + eps) per (sample, group) in float64.
   */
  groupNormForward(x: Float32Array, n: number, C: number, G: number, gamma: Float32Array, beta: Float32Array, eps: number, relu: boolean): GroupNormForward;
  /** GroupNorm gradients; `reluOut` (the fused forward's output) masks dy where it is ≤ 0. dγ, dβ in float64. */
  groupNormBackward(
    x: Float32Array, dy: Float32Array, n: number, C: number, G: number, fwd: Pick<GroupNormForward, 'mean' | 'invStd'>,
    gamma: Float32Array, reluOut: Float32Array | undefined, wantDx: boolean,
  ): GroupNormGrads;
}

type NativeForward = (
  x: Float32Array, n: number, C: number, G: number, gamma: Float32Array, beta: Float32Array, eps: number, relu: boolean,
  y: Float32Array, mean: Float64Array, invStd: Float64Array,
) => void;
type NativeBackward = (
  x: Float32Array, dy: Float32Array, n: number, C: number, G: number, mean: Float64Array, invStd: Float64Array, gamma: Float32Array,
  y: Float32Array | null, dgamma: Float64Array, dbeta: Float64Array, dx: Float32Array | null,
) => void;

function groupNormGeometry(x: Float32Array, n: number, C: number, G: number): void {
  if (!Number.isInteger(G) || G < 1 || C % G !== 0) throw new Error(`group norm: ${C} channels cannot be split into ${G} groups`);
  if (!(n >= 1) || x.length === 0 || x.length % (n * C) !== 0) throw new Error(`group norm: ${x.length} values do not form ${n} samples of ${C} channels`);
}

/** GroupNorm's kernels on `ew`'s allocator: the addon's when `ew` carries them, else the JS loops. */
export function groupNormKernels(ew: ElementwiseKernels): GroupNormKernels {
  const alloc = ew.alloc;
  const fwdNative = ew.native<NativeForward>('groupNormForward');
  const bwdNative = ew.native<NativeBackward>('groupNormBackward');
  if (!fwdNative || !bwdNative) {
    return {
      groupNormForward(x, n, C, G, gamma, beta, eps, relu) {
        groupNormGeometry(x, n, C, G);
        return groupNormForward(x, n, C, G, gamma, beta, eps, relu, alloc(x.length));
      },
      groupNormBackward(x, dy, n, C, G, fwd, gamma, reluOut, wantDx) {
        groupNormGeometry(x, n, C, G);
        return groupNormBackward(x, dy, n, C, G, fwd, gamma, reluOut, wantDx, wantDx ? alloc(x.length) : undefined);
      },
    };
  }
  return {
    groupNormForward(x, n, C, G, gamma, beta, eps, relu) {
      groupNormGeometry(x, n, C, G);
      const y = alloc(x.length);
      const mean = new Float64Array(n * G);
      const invStd = new Float64Array(n * G);
      fwdNative(x, n, C, G, gamma, beta, eps, relu, y, mean, invStd);
      return { y, mean, invStd };
    },
    groupNormBackward(x, dy, n, C, G, fwd, gamma, reluOut, wantDx) {
      groupNormGeometry(x, n, C, G);
      const dgamma = new Float64Array(C);
      const dbeta = new Float64Array(C);
      const dx = wantDx ? alloc(x.length) : undefined;
      bwdNative(x, dy, n, C, G, fwd.mean, fwd.invStd, gamma, reluOut ?? null, dgamma, dbeta, dx ?? null);
      return { dx, dgamma, dbeta };
    },
  };
}

const AFFINE: readonly NormParamSpec[] = [
  { suffix: 'weight', trainable: true, init: 1 },
  { suffix: 'bias', trainable: true, init: 0 },
];

/** A per-sample group normalisation whose group count for C channels is `groupsOf(C, normGroups)`. */
export function groupNormalisation<Kind extends string>(kind: Kind, groupsOf: (channels: number, normGroups: number) => number): NormLayer<Kind> {
  const groupsFor = (groups: number | undefined, C: number): number => {
    if (groups === undefined) throw new Error(`${kind} norm: no group count for a layer of ${C} channels`);
    return groups;
  };
  return {
    kind,
    runningStatistics: false,
    params: AFFINE,
    groups: groupsOf,

    evalTfjs(tf, x, param, groups, relu) {
      const [n, d, h, w, c] = x.shape;
      const G = groupsFor(groups, c);
      if (c % G !== 0) throw new Error(`med3d: ${c} channels cannot be split into ${G} groups`);
      const grouped = tf.reshape(x, [n, d * h * w, G, c / G]);
      const { mean, variance } = tf.moments(grouped, [1, 3], true);
      const normed = tf.reshape(tf.mul(tf.sub(grouped, mean), tf.rsqrt(tf.add(variance, NORM_EPS))), x.shape);
      const y = tf.add(tf.mul(normed, param('weight')), param('bias')) as TfModule.Tensor5D;
      return relu ? tf.relu(y) : y;
    },

    // The same computation in training and inference (no running statistics).
    train(ctx, x, param, groups, relu) {
      const { store } = ctx;
      const gn = groupNormKernels(ctx.kernels);
      const n = x.shape[0];
      const C = x.shape[x.shape.length - 1];
      const G = groupsFor(groups, C);
      const gamma = store.value(param('weight'));
      const fwd = gn.groupNormForward(x.data, n, C, G, gamma, store.value(param('bias')), NORM_EPS, relu);
      const out = act(fwd.y, x.shape, true);
      ctx.record(() => {
        const dy = out.grad;
        if (!dy) return;
        const g = gn.groupNormBackward(x.data, dy, n, C, G, fwd, gamma, relu ? fwd.y : undefined, x.needsGrad);
        const gg = store.grad(param('weight'));
        const gb = store.grad(param('bias'));
        for (let c = 0; c < C; c++) {
          if (gg) gg[c] += g.dgamma[c];
          if (gb) gb[c] += g.dbeta[c];
        }
        if (g.dx) ctx.accumulate(x, g.dx, true);
      });
      return out;
    },

    // Portable across opsets (ONNX's own GroupNormalization changed its scale's meaning between opset 18 and 21):
    // Reshape to [N, G, −1], InstanceNormalization with γ 1, β 0 (the per-group statistics), Reshape back to the
    // input's Shape, then Mul γ and Add β per channel.
    onnx(g, x, groups) {
      const { prefix, channels: C } = g;
      const G = groupsFor(groups, C);
      const shape = g.node('Shape', [x], `${prefix}/shape`);
      const grouped = g.node('Reshape', [x, g.int64Constant([3], [0, G, -1])], `${prefix}/group`);
      const ones = g.floatConstant([G], new Float32Array(G).fill(1));
      const zeros = g.floatConstant([G], new Float32Array(G));
      const normed = g.node('InstanceNormalization', [grouped, ones, zeros], `${prefix}/stats`, { epsilon: NORM_EPS });
      const back = g.node('Reshape', [normed, shape], `${prefix}/ungroup`);
      // γ and β per channel, broadcast over D, H, W: [C, 1, 1, 1].
      const gamma = g.floatConstant([C, 1, 1, 1], g.value('weight'));
      const beta = g.floatConstant([C, 1, 1, 1], g.value('bias'));
      return g.node('Add', [g.node('Mul', [back, gamma], `${prefix}/gamma`), beta], `${prefix}/beta`);
    },
  };
}

/** GroupNorm with the plan's `normGroups` groups in every layer. */
export const groupNorm: NormLayer<'group'> = groupNormalisation('group', (_channels, normGroups) => normGroups);
