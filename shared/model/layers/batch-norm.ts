/**
 * BatchNorm3d (MedicalNet's norm), PyTorch semantics: in training, normalise with the batch mean and the biased
 * variance and move the running estimates towards the batch mean and the UNBIASED variance (momentum = weight of
 * the batch); in eval, the running statistics. Kernels: JS loops here (the reference), or the addon's `bnStats`,
 * `scaleShift` and `bnBackward` (native/src/elementwise.cc, OpenMP) when the selected kernels carry them.
 */
import type * as TfModule from '@tensorflow/tfjs';
import type { ElementwiseKernels } from '../../engine/elementwise-kernels.ts';
import { act, type Act } from '../graph/tape.ts';
import { NORM_EPS, type NormLayer, type NormParamSuffix } from './norm-layer.ts';

export interface BnTrainResult {
  readonly y: Float32Array;
  /** Batch mean per channel. */
  readonly mean: Float32Array;
  /** 1/√(biased batch variance + eps) per channel. */
  readonly invStd: Float32Array;
}

export interface BnGrads {
  /** Σ dy·x̂ per channel (the gradient of γ). */
  readonly dgamma: Float32Array;
  /** Σ dy per channel (the gradient of β). */
  readonly dbeta: Float32Array;
  /** Input gradient; absent when not asked for. */
  readonly dx?: Float32Array;
}

export interface BatchNormKernels {
  /**
   * Train-mode BatchNorm over the last axis (C channels): y = (x − μ)·σ⁻¹·γ + β with batch μ, σ², then
   * max(y, 0) when `relu`. Updates runMean / runVar in place (momentum, unbiased variance).
   */
  batchNormTrain(
    x: Float32Array, C: number, gamma: Float32Array, beta: Float32Array,
    runMean: Float32Array, runVar: Float32Array, momentum: number, eps: number, relu: boolean,
  ): BnTrainResult;
  /** y = x·scale + shift per channel (eval BatchNorm folded), then max(y, 0) when `relu`. */
  scaleShift(x: Float32Array, C: number, scale: Float32Array, shift: Float32Array, relu: boolean): Float32Array;
  /**
   * BatchNorm backward. `y` (the fused op's output) masks dy where y ≤ 0 when given (the ReLU after it).
   * With `batchStats` dx includes the terms through μ and σ² (train mode), else dx = dy·γ·σ⁻¹.
   */
  batchNormBackward(
    x: Float32Array, dy: Float32Array, C: number, mean: Float32Array, invStd: Float32Array, gamma: Float32Array,
    y: Float32Array | undefined, batchStats: boolean, wantDx: boolean,
  ): BnGrads;
}

/** The addon's BatchNorm functions (outputs preallocated by the caller). */
interface NativeBatchNorm {
  bnStats(x: Float32Array, C: number, momentum: number, eps: number, mean: Float32Array, invStd: Float32Array, runMean: Float32Array, runVar: Float32Array): void;
  scaleShift(x: Float32Array, C: number, scale: Float32Array, shift: Float32Array, relu: boolean, y: Float32Array): void;
  bnBackward(
    x: Float32Array, dy: Float32Array, C: number, mean: Float32Array, invStd: Float32Array, gamma: Float32Array,
    y: Float32Array | null, batchStats: boolean, dgamma: Float32Array, dbeta: Float32Array, dx: Float32Array | null,
  ): void;
}

function checkC(x: Float32Array, C: number, what: string): void {
  if (!(C >= 1) || x.length % C !== 0) throw new Error(`${what}: ${x.length} values are not a whole number of ${C}-channel voxels`);
}

function nativeOf(ew: ElementwiseKernels): NativeBatchNorm | undefined {
  const bnStats = ew.native<NativeBatchNorm['bnStats']>('bnStats');
  const scaleShift = ew.native<NativeBatchNorm['scaleShift']>('scaleShift');
  const bnBackward = ew.native<NativeBatchNorm['bnBackward']>('bnBackward');
  return bnStats && scaleShift && bnBackward ? { bnStats, scaleShift, bnBackward } : undefined;
}

/** BatchNorm's kernels on `ew`'s allocator: the addon's when `ew` carries them, else the JS loops. */
export function batchNormKernels(ew: ElementwiseKernels): BatchNormKernels {
  const nat = nativeOf(ew);
  return nat ? nativeKernels(nat, ew) : jsKernels(ew);
}

function jsKernels(ew: ElementwiseKernels): BatchNormKernels {
  const alloc = ew.alloc;
  const kernels: BatchNormKernels = {
    batchNormTrain(x, C, gamma, beta, runMean, runVar, momentum, eps, relu) {
      checkC(x, C, 'batchNorm');
      const nv = x.length / C;
      // One pass: sums of x − K and (x − K)² with K = the first voxel's value per channel (shifted data, so
      // the variance does not cancel catastrophically when |mean| ≫ std), accumulated in float64.
      const s1 = new Float64Array(C);
      const s2 = new Float64Array(C);
      const K = new Float64Array(C);
      for (let c = 0; c < C; c++) K[c] = x[c];
      for (let i = 0; i < x.length; i += C) {
        for (let c = 0; c < C; c++) {
          const d = x[i + c] - K[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
      const mean = new Float32Array(C);
      const invStd = new Float32Array(C);
      const scale = new Float32Array(C);
      const shift = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        const m1 = s1[c] / nv;
        const sq = Math.max(s2[c] - s1[c] * m1, 0); // Σ(x − μ)²
        const mu = K[c] + m1;
        const biased = sq / nv;
        const is = 1 / Math.sqrt(biased + eps);
        mean[c] = mu;
        invStd[c] = is;
        runMean[c] = (1 - momentum) * runMean[c] + momentum * mu;
        runVar[c] = (1 - momentum) * runVar[c] + momentum * (nv > 1 ? sq / (nv - 1) : biased);
        scale[c] = gamma[c] * is;
        shift[c] = beta[c] - mu * gamma[c] * is;
      }
      return { y: kernels.scaleShift(x, C, scale, shift, relu), mean, invStd };
    },

    scaleShift(x, C, scale, shift, relu) {
      checkC(x, C, 'batchNorm');
      const y = alloc(x.length);
      if (relu) {
        for (let i = 0; i < x.length; i += C) {
          for (let c = 0; c < C; c++) {
            const v = x[i + c] * scale[c] + shift[c];
            y[i + c] = v < 0 ? 0 : v; // NaN stays NaN, as in PyTorch
          }
        }
      } else {
        for (let i = 0; i < x.length; i += C) for (let c = 0; c < C; c++) y[i + c] = x[i + c] * scale[c] + shift[c];
      }
      return y;
    },

    batchNormBackward(x, dy, C, mean, invStd, gamma, y, batchStats, wantDx) {
      checkC(x, C, 'batchNorm backward');
      const nv = x.length / C;
      const sumDy = new Float64Array(C);
      const sumDyXc = new Float64Array(C); // Σ dy·(x − μ)
      for (let i = 0; i < x.length; i += C) {
        for (let c = 0; c < C; c++) {
          const g = y === undefined || y[i + c] > 0 ? dy[i + c] : 0;
          sumDy[c] += g;
          sumDyXc[c] += g * (x[i + c] - mean[c]);
        }
      }
      const dgamma = new Float32Array(C);
      const dbeta = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        dgamma[c] = sumDyXc[c] * invStd[c];
        dbeta[c] = sumDy[c];
      }
      if (!wantDx) return { dgamma, dbeta };
      const dx = alloc(x.length);
      // dx = γσ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂)) = a·dy + b·(x − μ) + k per channel (train); a·dy (eval).
      const a = new Float32Array(C);
      const b = new Float32Array(C);
      const k = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        const gi = gamma[c] * invStd[c];
        a[c] = gi;
        if (batchStats) {
          const cm = (sumDyXc[c] / nv) * invStd[c] * invStd[c]; // mean(dy·x̂)·σ⁻¹
          b[c] = -gi * cm;
          k[c] = (-gi * sumDy[c]) / nv;
        }
      }
      if (y) {
        for (let i = 0; i < x.length; i += C) {
          for (let c = 0; c < C; c++) dx[i + c] = (y[i + c] > 0 ? a[c] * dy[i + c] : 0) + b[c] * (x[i + c] - mean[c]) + k[c];
        }
      } else {
        for (let i = 0; i < x.length; i += C) for (let c = 0; c < C; c++) dx[i + c] = a[c] * dy[i + c] + b[c] * (x[i + c] - mean[c]) + k[c];
      }
      return { dgamma, dbeta, dx };
    }
  };
  return kernels;
}

function nativeKernels(addon: NativeBatchNorm, ew: ElementwiseKernels): BatchNormKernels {
  const alloc = ew.alloc;
  return {
    batchNormTrain(x, C, gamma, beta, runMean, runVar, momentum, eps, relu) {
      checkC(x, C, 'batchNorm');
      const mean = new Float32Array(C);
      const invStd = new Float32Array(C);
      addon.bnStats(x, C, momentum, eps, mean, invStd, runMean, runVar);
      const scale = new Float32Array(C);
      const shift = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        scale[c] = gamma[c] * invStd[c];
        shift[c] = beta[c] - mean[c] * gamma[c] * invStd[c];
      }
      const y = alloc(x.length);
      addon.scaleShift(x, C, scale, shift, relu, y);
      return { y, mean, invStd };
    },
    scaleShift(x, C, scale, shift, relu) {
      checkC(x, C, 'batchNorm');
      const y = alloc(x.length);
      addon.scaleShift(x, C, scale, shift, relu, y);
      return y;
    },
    batchNormBackward(x, dy, C, mean, invStd, gamma, y, batchStats, wantDx) {
      checkC(x, C, 'batchNorm backward');
      const dgamma = new Float32Array(C);
      const dbeta = new Float32Array(C);
      const dx = wantDx ? alloc(x.length) : undefined;
      addon.bnBackward(x, dy, C, mean, invStd, gamma, y ?? null, batchStats, dgamma, dbeta, dx ?? null);
      return { dgamma, dbeta, dx };
    }
  };
}

export const batchNorm: NormLayer<'batch'> = {
  kind: 'batch',
  runningStatistics: true,
  params: [
    { suffix: 'weight', trainable: true, init: 1 },
    { suffix: 'bias', trainable: true, init: 0 },
    { suffix: 'running_mean', trainable: false, init: 0 },
    { suffix: 'running_var', trainable: false, init: 1 },
  ],
  groups: () => undefined,

  evalTfjs(tf, x, param, _groups, relu) {
    // PyTorch eval: (x − mean)/√(var + eps)·γ + β, folded into one scale and shift per channel.
    const scale = tf.mul(param('weight'), tf.rsqrt(tf.add(param('running_var'), NORM_EPS)));
    const shift = tf.sub(param('bias'), tf.mul(param('running_mean'), scale));
    const y = tf.add(tf.mul(x, scale), shift) as TfModule.Tensor5D;
    return relu ? tf.relu(y) : y;
  },

  train(ctx, x, param, _groups, relu) {
    const { store, training } = ctx;
    const bn = batchNormKernels(ctx.kernels);
    const C = x.shape[x.shape.length - 1];
    const xv = x.data;
    const gamma = store.value(param('weight'));
    const beta = store.value(param('bias'));
    let y: Float32Array;
    let mean: Float32Array;
    let invStd: Float32Array;
    if (training) {
      ({ y, mean, invStd } = bn.batchNormTrain(xv, C, gamma, beta, store.value(param('running_mean')), store.value(param('running_var')), ctx.bnMomentum, NORM_EPS, relu));
    } else {
      const runMean = store.value(param('running_mean'));
      const runVar = store.value(param('running_var'));
      mean = new Float32Array(C);
      invStd = new Float32Array(C);
      const scale = new Float32Array(C);
      const shift = new Float32Array(C);
      for (let c = 0; c < C; c++) {
        mean[c] = runMean[c];
        invStd[c] = 1 / Math.sqrt(runVar[c] + NORM_EPS);
        scale[c] = gamma[c] * invStd[c];
        shift[c] = beta[c] - runMean[c] * scale[c];
      }
      y = bn.scaleShift(xv, C, scale, shift, relu);
    }
    const out: Act = act(y, x.shape, true);
    ctx.record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gg = store.grad(param('weight'));
      const gb = store.grad(param('bias'));
      const g = bn.batchNormBackward(xv, dy, C, mean, invStd, gamma, relu ? y : undefined, training, x.needsGrad);
      for (let c = 0; c < C; c++) {
        if (gg) gg[c] += g.dgamma[c];
        if (gb) gb[c] += g.dbeta[c];
      }
      if (g.dx) ctx.accumulate(x, g.dx, true);
    });
    return out;
  },

  onnx(g, x) {
    const p = (s: NormParamSuffix) => g.param(s);
    return g.node('BatchNormalization', [x, p('weight'), p('bias'), p('running_mean'), p('running_var')], g.prefix, { epsilon: NORM_EPS });
  },
};
