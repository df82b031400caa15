/**
 * Med3D graph ops on Float32Arrays with gradients: the training engine behind the Med3D trainer.
 * Convolutions go through a ConvKernels implementation (oneDNN when built, else JS loops); BatchNorm,
 * ReLU, pooling and the shortcuts are memory-bound and written here. Semantics follow PyTorch exactly:
 * symmetric padding, BatchNorm with batch statistics in training (biased variance to normalise, unbiased
 * for the running estimate, momentum 0.1 in PyTorch's sense), running statistics in eval.
 */
import { torchConvGeom, type ConvKernels } from '../../engine/conv-kernels.ts';
import type { Rng } from '../../util/random.ts';
import { MED3D_BN_EPS } from '../med3d.ts';
import type { BatchNormParams, Med3dConvOptions, Med3dGraphOps } from '../med3d-forward.ts';
import { accumulate, act, addInto, type Act, type Tape } from './tape.ts';

/** Where ops read parameters and put their gradients; parameters are referred to by name. */
export interface ParamStore {
  value(name: string): Float32Array;
  shape(name: string): readonly number[];
  /** The gradient accumulator of a trained parameter; undefined when it is frozen or not trained. */
  grad(name: string): Float32Array | undefined;
}

export interface Med3dOpsOptions {
  readonly kernels: ConvKernels;
  readonly store: ParamStore;
  /** Records backward steps; absent for inference. */
  readonly tape?: Tape;
  /** Batch statistics in BatchNorm (and running-statistics updates), dropout on. */
  readonly training: boolean;
  /** PyTorch BatchNorm momentum (weight of the new batch in the running estimate). */
  readonly bnMomentum?: number;
  /** For dropout masks; required when training with dropout. */
  readonly rng?: Rng;
}

export type Med3dTrainOps = Med3dGraphOps<Act, string>;

export function createMed3dTrainOps(o: Med3dOpsOptions): Med3dTrainOps {
  const { kernels, store, tape, training } = o;
  const momentum = o.bnMomentum ?? 0.1;
  const record = (fn: () => void) => tape?.record(fn);

  const conv3d = (x: Act, wName: string, opts: Med3dConvOptions): Act => {
    const w = store.value(wName);
    const ws = store.shape(wName);
    if (ws.length !== 5 || ws[3] !== x.shape[4]) throw new Error(`conv3d ${wName}: weight [${ws.join(',')}] does not fit input [${x.shape.join(',')}]`);
    const g = torchConvGeom(x.shape, ws[4], { k: [ws[0], ws[1], ws[2]], stride: opts.stride ?? 1, dilation: opts.dilation ?? 1, pad: opts.pad ?? 0 });
    const out = act(kernels.conv3d(x.data, w, g), [g.n, ...g.out, g.cout], true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gw = store.grad(wName);
      if (gw) addInto(gw, kernels.conv3dBackwardFilter(x.data, dy, g));
      if (x.needsGrad) accumulate(x, kernels.conv3dBackwardData(dy, w, g), true);
    });
    return out;
  };

  const convTranspose2x = (x: Act, wName: string, bName: string): Act => {
    const w = store.value(wName);
    const b = store.value(bName);
    const ws = store.shape(wName);
    const [n, d, h, wd, cin] = x.shape;
    if (ws.length !== 5 || ws[0] !== 2 || ws[1] !== 2 || ws[2] !== 2 || ws[4] !== cin) {
      throw new Error(`ConvTranspose3d ${wName}: weight [${ws.join(',')}] does not fit input [${x.shape.join(',')}] (expected [2,2,2,out,${cin}])`);
    }
    const cout = ws[3];
    // The transposed conv is the input gradient of the conv that maps its output back to its input.
    const g = torchConvGeom([n, 2 * d, 2 * h, 2 * wd, cout], cin, { k: 2, stride: 2 });
    const y = kernels.conv3dBackwardData(x.data, w, g);
    for (let i = 0; i < y.length; i += cout) for (let c = 0; c < cout; c++) y[i + c] += b[c];
    const out = act(y, [n, 2 * d, 2 * h, 2 * wd, cout], true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gw = store.grad(wName);
      if (gw) addInto(gw, kernels.conv3dBackwardFilter(dy, x.data, g));
      const gb = store.grad(bName);
      if (gb) for (let i = 0; i < dy.length; i += cout) for (let c = 0; c < cout; c++) gb[c] += dy[i + c];
      if (x.needsGrad) accumulate(x, kernels.conv3d(dy, w, g), true);
    });
    return out;
  };

  const batchNorm = (x: Act, p: BatchNormParams<string>): Act => {
    const C = x.shape[x.shape.length - 1];
    const xv = x.data;
    const nv = xv.length / C;
    const gamma = store.value(p.gamma);
    const beta = store.value(p.beta);
    const runMean = store.value(p.mean);
    const runVar = store.value(p.variance);
    const mean = new Float64Array(C);
    const invStd = new Float64Array(C);
    if (training) {
      for (let i = 0; i < xv.length; i += C) for (let c = 0; c < C; c++) mean[c] += xv[i + c];
      for (let c = 0; c < C; c++) mean[c] /= nv;
      const sq = new Float64Array(C);
      for (let i = 0; i < xv.length; i += C) {
        for (let c = 0; c < C; c++) {
          const dv = xv[i + c] - mean[c];
          sq[c] += dv * dv;
        }
      }
      for (let c = 0; c < C; c++) {
        const biased = sq[c] / nv;
        invStd[c] = 1 / Math.sqrt(biased + MED3D_BN_EPS);
        runMean[c] = (1 - momentum) * runMean[c] + momentum * mean[c];
        runVar[c] = (1 - momentum) * runVar[c] + momentum * (nv > 1 ? sq[c] / (nv - 1) : biased);
      }
    } else {
      for (let c = 0; c < C; c++) {
        mean[c] = runMean[c];
        invStd[c] = 1 / Math.sqrt(runVar[c] + MED3D_BN_EPS);
      }
    }
    const scale = new Float32Array(C);
    const shift = new Float32Array(C);
    for (let c = 0; c < C; c++) {
      scale[c] = gamma[c] * invStd[c];
      shift[c] = beta[c] - mean[c] * scale[c];
    }
    const y = new Float32Array(xv.length);
    for (let i = 0; i < xv.length; i += C) for (let c = 0; c < C; c++) y[i + c] = xv[i + c] * scale[c] + shift[c];
    const out = act(y, x.shape, true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const sumDy = new Float64Array(C);
      const sumDyXhat = new Float64Array(C);
      for (let i = 0; i < xv.length; i += C) {
        for (let c = 0; c < C; c++) {
          const g = dy[i + c];
          sumDy[c] += g;
          sumDyXhat[c] += g * (xv[i + c] - mean[c]) * invStd[c];
        }
      }
      const gg = store.grad(p.gamma);
      const gb = store.grad(p.beta);
      for (let c = 0; c < C; c++) {
        if (gg) gg[c] += sumDyXhat[c];
        if (gb) gb[c] += sumDy[c];
      }
      if (!x.needsGrad) return;
      const dx = new Float32Array(xv.length);
      if (training) {
        // dx = γ·σ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂)): the batch statistics depend on x too.
        const a = new Float32Array(C);
        const bMean = new Float32Array(C);
        const cMean = new Float32Array(C);
        for (let c = 0; c < C; c++) {
          a[c] = gamma[c] * invStd[c];
          bMean[c] = sumDy[c] / nv;
          cMean[c] = sumDyXhat[c] / nv;
        }
        for (let i = 0; i < xv.length; i += C) {
          for (let c = 0; c < C; c++) {
            const xhat = (xv[i + c] - mean[c]) * invStd[c];
            dx[i + c] = a[c] * (dy[i + c] - bMean[c] - xhat * cMean[c]);
          }
        }
      } else {
        for (let i = 0; i < xv.length; i += C) for (let c = 0; c < C; c++) dx[i + c] = dy[i + c] * scale[c];
      }
      accumulate(x, dx, true);
    });
    return out;
  };

  const relu = (x: Act): Act => {
    const xv = x.data;
    const y = new Float32Array(xv.length);
    for (let i = 0; i < y.length; i++) y[i] = xv[i] > 0 ? xv[i] : 0;
    const out = act(y, x.shape, x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy || !x.needsGrad) return;
      const dx = new Float32Array(y.length);
      for (let i = 0; i < y.length; i++) dx[i] = y[i] > 0 ? dy[i] : 0;
      accumulate(x, dx, true);
    });
    return out;
  };

  const maxPool = (x: Act): Act => {
    const [n, D, H, W, C] = x.shape;
    const o = (s: number) => Math.floor((s - 1) / 2) + 1; // kernel 3, stride 2, padding 1
    const [oD, oH, oW] = [o(D), o(H), o(W)];
    const y = new Float32Array(n * oD * oH * oW * C);
    const argmax = new Int32Array(y.length);
    const xv = x.data;
    let p = 0;
    for (let b = 0; b < n; b++) {
      for (let oz = 0; oz < oD; oz++) {
        const z0 = Math.max(0, 2 * oz - 1);
        const z1 = Math.min(D, 2 * oz + 2);
        for (let oy = 0; oy < oH; oy++) {
          const y0 = Math.max(0, 2 * oy - 1);
          const y1 = Math.min(H, 2 * oy + 2);
          for (let ox = 0; ox < oW; ox++, p += C) {
            const x0 = Math.max(0, 2 * ox - 1);
            const x1 = Math.min(W, 2 * ox + 2);
            for (let c = 0; c < C; c++) {
              y[p + c] = -Infinity;
              argmax[p + c] = -1;
            }
            for (let z = z0; z < z1; z++) {
              for (let yy = y0; yy < y1; yy++) {
                for (let xx = x0; xx < x1; xx++) {
                  const src = (((b * D + z) * H + yy) * W + xx) * C;
                  for (let c = 0; c < C; c++) {
                    const v = xv[src + c];
                    // Strictly greater: the first maximum wins, as in PyTorch (NaN propagates as a loss check).
                    if (v > y[p + c] || argmax[p + c] < 0) {
                      y[p + c] = v;
                      argmax[p + c] = src + c;
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
    const out = act(y, [n, oD, oH, oW, C], x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy || !x.needsGrad) return;
      const dx = new Float32Array(xv.length);
      for (let i = 0; i < dy.length; i++) dx[argmax[i]] += dy[i];
      accumulate(x, dx, true);
    });
    return out;
  };

  const shortcutA = (x: Act, outChannels: number, stride: number): Act => {
    const [n, D, H, W, C] = x.shape;
    if (outChannels < C) throw new Error(`med3d: shortcut A cannot shrink ${C} channels to ${outChannels}`);
    const o = (s: number) => Math.floor((s - 1) / stride) + 1;
    const [oD, oH, oW] = [o(D), o(H), o(W)];
    const y = new Float32Array(n * oD * oH * oW * outChannels);
    const index = (b: number, z: number, yy: number, xx: number) => (((b * D + z * stride) * H + yy * stride) * W + xx * stride) * C;
    let p = 0;
    for (let b = 0; b < n; b++) {
      for (let z = 0; z < oD; z++) {
        for (let yy = 0; yy < oH; yy++) {
          for (let xx = 0; xx < oW; xx++, p += outChannels) y.set(x.data.subarray(index(b, z, yy, xx), index(b, z, yy, xx) + C), p);
        }
      }
    }
    const out = act(y, [n, oD, oH, oW, outChannels], x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy || !x.needsGrad) return;
      const dx = new Float32Array(x.data.length);
      let q = 0;
      for (let b = 0; b < n; b++) {
        for (let z = 0; z < oD; z++) {
          for (let yy = 0; yy < oH; yy++) {
            for (let xx = 0; xx < oW; xx++, q += outChannels) dx.set(dy.subarray(q, q + C), index(b, z, yy, xx));
          }
        }
      }
      accumulate(x, dx, true);
    });
    return out;
  };

  const add = (a: Act, b: Act): Act => {
    if (a.data.length !== b.data.length) throw new Error(`add: shapes [${a.shape.join(',')}] and [${b.shape.join(',')}] differ`);
    const y = new Float32Array(a.data.length);
    for (let i = 0; i < y.length; i++) y[i] = a.data[i] + b.data[i];
    const out = act(y, a.shape, a.needsGrad || b.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      accumulate(a, dy, false);
      accumulate(b, dy, false);
    });
    return out;
  };

  const classifier = (x: Act, wName: string, bName: string, dropout: number): Act => {
    const [n, D, H, W, C] = x.shape;
    const w = store.value(wName);
    const bias = store.value(bName);
    const K = bias.length;
    if (w.length !== C * K) throw new Error(`classifier ${wName}: weight of ${w.length} values does not fit ${C} features × ${K} classes`);
    const nv = D * H * W;
    const pooled = new Float32Array(n * C);
    for (let b = 0; b < n; b++) {
      const base = b * nv * C;
      for (let v = 0; v < nv; v++) for (let c = 0; c < C; c++) pooled[b * C + c] += x.data[base + v * C + c];
      for (let c = 0; c < C; c++) pooled[b * C + c] /= nv;
    }
    let mask: Float32Array | undefined;
    if (training && dropout > 0) {
      if (!o.rng) throw new Error('classifier: dropout in training needs an rng');
      mask = new Float32Array(pooled.length);
      const keep = 1 / (1 - dropout);
      for (let i = 0; i < mask.length; i++) mask[i] = o.rng() < dropout ? 0 : keep;
      for (let i = 0; i < mask.length; i++) pooled[i] *= mask[i];
    }
    const y = new Float32Array(n * K);
    for (let b = 0; b < n; b++) {
      for (let k = 0; k < K; k++) {
        let s = bias[k];
        for (let c = 0; c < C; c++) s += pooled[b * C + c] * w[c * K + k];
        y[b * K + k] = s;
      }
    }
    const out = act(y, [n, K], true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gw = store.grad(wName);
      const gb = store.grad(bName);
      for (let b = 0; b < n; b++) {
        for (let k = 0; k < K; k++) {
          const g = dy[b * K + k];
          if (gb) gb[k] += g;
          if (gw) for (let c = 0; c < C; c++) gw[c * K + k] += g * pooled[b * C + c];
        }
      }
      if (!x.needsGrad) return;
      const dx = new Float32Array(x.data.length);
      for (let b = 0; b < n; b++) {
        for (let c = 0; c < C; c++) {
          let g = 0;
          for (let k = 0; k < K; k++) g += dy[b * K + k] * w[c * K + k];
          if (mask) g *= mask[b * C + c];
          g /= nv;
          const base = b * nv * C + c;
          for (let v = 0; v < nv; v++) dx[base + v * C] = g;
        }
      }
      accumulate(x, dx, true);
    });
    return out;
  };

  return {
    shape: (x) => x.shape,
    conv3d,
    convTranspose2x,
    batchNorm: (x, p) => batchNorm(x, p),
    relu,
    maxPool,
    shortcutA,
    add,
    classifier,
  };
}
