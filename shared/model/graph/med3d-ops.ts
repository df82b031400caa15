/**
 * Med3D graph ops on Float32Arrays with gradients: the training engine behind the Med3D trainer.
 * Convolutions go through a ConvKernels implementation (oneDNN when built, else JS loops); ReLU, max-pool, add,
 * channel concatenation and the transposed convolutions' bias through ElementwiseKernels (the addon's C++ loops
 * with the oneDNN kernels, else JS); norm layers are their own modules (shared/model/layers/), run here with an
 * OpContext, fused with the ReLU that follows them where the graph has one; shortcut A and the classifier are
 * written here. With a BufferPool every activation and gradient comes from the pool (a training step's buffers
 * reused by the next step). Semantics follow PyTorch exactly:
 * symmetric padding, BatchNorm with batch statistics in training (biased variance to normalise, unbiased
 * for the running estimate, momentum 0.1 in PyTorch's sense), running statistics in eval.
 */
import { inputLength, outputLength, torchConvGeom, weightLength, type ConvKernels } from '../../engine/conv-kernels.ts';
import { elementwiseOf, uninitF32, type ElementwiseKernels } from '../../engine/elementwise-kernels.ts';
import type { Rng } from '../../util/random.ts';
import type { Med3dConvOptions, Med3dGraphOps } from '../med3d-forward.ts';
import type { OpContext, ParamStore } from './op-context.ts';
import type { BufferPool } from './pool.ts';
import { act, type Act, type Tape } from './tape.ts';

export type { ParamStore };

export interface Med3dOpsOptions {
  readonly kernels: ConvKernels;
  readonly store: ParamStore;
  /** Records backward steps; absent for inference. */
  readonly tape?: Tape;
  /** Batch statistics in BatchNorm (and running-statistics updates), dropout on. */
  readonly training: boolean;
  /** PyTorch BatchNorm momentum (weight of the new batch in the running estimate). */
  readonly bnMomentum?: number;
  /** BatchNorm, ReLU, max-pool and add; default: the ones that come with `kernels` (elementwiseOf). */
  readonly elementwise?: ElementwiseKernels;
  /** For dropout masks; required when training with dropout. */
  readonly rng?: Rng;
  /**
   * Where activations and gradients are allocated: the owner recycles it between steps, once nothing of the
   * previous step is read any more. Without one every array is fresh (and GC-managed).
   */
  readonly pool?: BufferPool;
}

export type Med3dTrainOps = Med3dGraphOps<Act, string>;

export function createMed3dTrainOps(o: Med3dOpsOptions): Med3dTrainOps {
  const { kernels, store, tape, training } = o;
  const momentum = o.bnMomentum ?? 0.1;
  const pool = o.pool;
  const alloc = pool ? (n: number) => pool.take(n) : uninitF32;
  const baseEw = o.elementwise ?? elementwiseOf(kernels);
  const ew = pool ? baseEw.withAlloc(alloc) : baseEw;
  // tape.accumulate with the sum in the elementwise kernels (native: vectorised and threaded).
  const accumulate = (a: Act, g: Float32Array, owned: boolean): void => {
    if (!a.needsGrad) return;
    if (!a.grad) {
      if (owned) a.grad = g;
      else (a.grad = alloc(g.length)).set(g);
    } else ew.addInto(a.grad, g);
  };
  /** Runs a convolution kernel with a pooled output when there is a pool (the kernel may ignore it). */
  const pooled = (len: number, run: (out: Float32Array | undefined) => Float32Array): Float32Array => {
    if (!pool) return run(undefined);
    const out = pool.take(len);
    const r = run(out);
    if (r !== out) pool.untake(out);
    return r;
  };
  const record = (fn: () => void) => tape?.record(fn);
  const layerContext: OpContext = { store, training, bnMomentum: momentum, kernels: ew, record, accumulate };

  const conv3d = (x: Act, wName: string, opts: Med3dConvOptions): Act => {
    const w = store.value(wName);
    const ws = store.shape(wName);
    if (ws.length !== 5 || ws[3] !== x.shape[4]) throw new Error(`conv3d ${wName}: weight [${ws.join(',')}] does not fit input [${x.shape.join(',')}]`);
    const g = torchConvGeom(x.shape, ws[4], { k: [ws[0], ws[1], ws[2]], stride: opts.stride ?? 1, dilation: opts.dilation ?? 1, pad: opts.pad ?? 0 });
    const out = act(pooled(outputLength(g), (b) => kernels.conv3d(x.data, w, g, b)), [g.n, ...g.out, g.cout], true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gw = store.grad(wName);
      if (gw) ew.addInto(gw, pooled(weightLength(g), (b) => kernels.conv3dBackwardFilter(x.data, dy, g, b)));
      if (x.needsGrad) accumulate(x, pooled(inputLength(g), (b) => kernels.conv3dBackwardData(dy, w, g, b)), true);
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
    const y = pooled(inputLength(g), (o) => kernels.conv3dBackwardData(x.data, w, g, o));
    ew.biasAdd(y, cout, b);
    const out = act(y, [n, 2 * d, 2 * h, 2 * wd, cout], true);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const gw = store.grad(wName);
      if (gw) ew.addInto(gw, pooled(weightLength(g), (o) => kernels.conv3dBackwardFilter(dy, x.data, g, o)));
      const gb = store.grad(bName);
      if (gb) {
        const sum = new Float64Array(cout);
        ew.channelSum(dy, cout, sum);
        for (let c = 0; c < cout; c++) gb[c] += sum[c];
      }
      if (x.needsGrad) accumulate(x, pooled(outputLength(g), (o) => kernels.conv3d(dy, w, g, o)), true);
    });
    return out;
  };

  const concat = (a: Act, b: Act): Act => {
    const [Ca, Cb] = [a.shape[4], b.shape[4]];
    if (a.shape.length !== 5 || b.shape.length !== 5 || a.shape.slice(0, 4).some((v, i) => v !== b.shape[i])) {
      throw new Error(`concat: cannot concatenate [${a.shape.join(',')}] and [${b.shape.join(',')}] along channels`);
    }
    const y = ew.concat(a.data, Ca, b.data, Cb);
    const out = act(y, [...a.shape.slice(0, 4), Ca + Cb], a.needsGrad || b.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy) return;
      const parts = ew.split(dy, Ca, Cb, a.needsGrad, b.needsGrad);
      if (parts.a) accumulate(a, parts.a, true);
      if (parts.b) accumulate(b, parts.b, true);
    });
    return out;
  };

  const relu = (x: Act): Act => {
    const y = ew.relu(x.data);
    const out = act(y, x.shape, x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy || !x.needsGrad) return;
      accumulate(x, ew.reluBackward(y, dy), true);
    });
    return out;
  };

  const maxPool = (x: Act): Act => {
    const { y, argmax, shape } = ew.maxPool(x.data, x.shape);
    const out = act(y, shape, x.needsGrad);
    record(() => {
      const dy = out.grad;
      if (!dy || !x.needsGrad) return;
      accumulate(x, ew.maxPoolBackward(dy, argmax, x.shape), true);
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

  const add = (a: Act, b: Act, relu: boolean): Act => {
    if (a.data.length !== b.data.length) throw new Error(`add: shapes [${a.shape.join(',')}] and [${b.shape.join(',')}] differ`);
    const y = ew.add(a.data, b.data, relu);
    const out = act(y, a.shape, a.needsGrad || b.needsGrad);
    record(() => {
      let dy = out.grad;
      if (!dy) return;
      if (relu) {
        dy = ew.reluBackward(y, dy);
        // The masked gradient is ours: the first input that needs one takes it over, the other gets a copy.
        if (a.needsGrad) {
          accumulate(a, dy, true);
          accumulate(b, dy, false);
        } else accumulate(b, dy, true);
        return;
      }
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
    norm: (x, layer, param, groups, relu) => layer.train(layerContext, x, param, groups, relu),
    concat,
    relu,
    maxPool,
    shortcutA,
    add: (a, b) => add(a, b, false),
    addRelu: (a, b) => add(a, b, true),
    classifier,
  };
}
