/**
 * Trainer on tfjs: forward passes written as functions of named tensors (no tf.layers, so the
 * parameter names are exactly the bundle's), soft Dice + cross-entropy, FedProx. Updates go through the
 * shared Optimizer (optim.ts) on Float32Array copies, as in the Med3D trainer, so plan optimiser settings,
 * a site's kept optimiser state and the learning-rate schedule mean the same on every engine.
 *
 * On the pure-JS `cpu` engine convolutions run through our own kernels (conv3d-cpu.ts) wrapped in
 * tf.customGrad: tfjs's cpu Conv3D is correct but ~5-10× slower. Native engines use tf.conv3d.
 */
import type * as TfModule from '@tensorflow/tfjs';
import type { EngineInfo } from '../engine/select.ts';
import { diceScores, meanDicePerClass } from '../metrics/dice.ts';
import { checkAgainstSpecs, makeBundle, type NamedTensor, type TensorBundle } from '../tensors/bundle.ts';
import { mulberry32 } from '../util/random.ts';
import { checkTrainRequest, lossSummary, nextBatch } from './batch.ts';
import {
  addReluInPlace,
  conv3dBackward,
  conv3dForward,
  reluGrad,
  sameGeometry,
  upsample2xBackward,
  upsample2xForward,
} from './conv3d-cpu.ts';
import { DEFAULT_OPTIMIZER, Optimizer } from './optim.ts';
import { DICE_SMOOTH, segmentationLossJs } from './graph/segmentation-loss.ts';
import { TINY3D_ID } from './tiny3d.ts';
import type { EvalResult, ModelArchitecture, TrainRequest, TrainResult, Trainer, VolumeCase } from './types.ts';

type Tf = typeof TfModule;
type Tensor = TfModule.Tensor;
type Tensor5D = TfModule.Tensor5D;

export interface ConvOptions {
  /** Stride in all three dimensions (default 1). Padding is always TF "same". */
  readonly stride?: number;
  /** Tensor of the output's shape added before the activation (a residual or skip connection). */
  readonly add?: Tensor5D;
  /** Apply ReLU to the output (fused on the cpu engine). */
  readonly relu?: boolean;
  /** False when x needs no gradient (the input image): skips the input-gradient pass. */
  readonly inputGrad?: boolean;
}

/** Engine-specific building blocks with gradients, for forward functions. */
export interface TfjsOps {
  readonly tf: Tf;
  /** y = act(conv3d(x, w, 'same') + b + add); x NDHWC, w [k,k,k,in,out] with a cubic kernel. */
  conv3d(x: Tensor5D, w: Tensor, b: Tensor, opts?: ConvOptions): Tensor5D;
  /** Nearest-neighbour ×2 upsampling of D, H and W. */
  upsample2x(x: Tensor5D): Tensor5D;
  /** ½·(cross-entropy + soft Dice loss) of NDHWC logits against one-hot targets [N·D·H·W, C]; see segmentationLoss. */
  segmentationLoss(logits: Tensor, oneHot: Tensor, weight?: Tensor): TfModule.Scalar;
  /** Training-time feature noise (a noisy student's dropout); absent = identity. */
  readonly dropout?: (x: Tensor5D) => Tensor5D;
}

/** Maps an NDHWC image batch (C = 1) to NDHWC logits of the same spatial size. */
export type TfjsForward = (params: ReadonlyMap<string, Tensor>, x: Tensor5D, ops: TfjsOps) => Tensor5D;

export function tiny3dForward(p: ReadonlyMap<string, Tensor>, x: Tensor5D, ops: TfjsOps): Tensor5D {
  const get = (name: string): Tensor => {
    const t = p.get(name);
    if (!t) throw new Error(`tiny3d forward: missing parameter ${name}`);
    return t;
  };
  const conv = (input: Tensor5D, stage: string, opts: ConvOptions) =>
    ops.conv3d(input, get(`${stage}.conv.weight`), get(`${stage}.conv.bias`), opts);
  const stem = conv(x, 'encoder.stem', { relu: true, inputGrad: false });
  const down = conv(stem, 'encoder.down', { stride: 2, relu: true });
  const mid = conv(down, 'encoder.mid', { relu: true });
  const up = ops.upsample2x(conv(mid, 'head.up', { relu: true }));
  const fused = conv(stem, 'head.skip', { add: up, relu: true });
  return conv(ops.dropout ? ops.dropout(fused) : fused, 'head.out', {});
}

// The loss in one JS pass lives with the engine's kernels; re-exported for the callers that import it from here.
export { DICE_SMOOTH, segmentationLossJs };

/**
 * Training loss in tf ops: ½·(cross-entropy + (1 − mean soft Dice of the foreground classes)).
 * Soft Dice per class over the whole batch (nnU-Net's "batch Dice"): random crops often miss the
 * foreground, and per-sample Dice would then push hard towards all-background.
 */
export function segmentationLoss(tf: Tf, logits: Tensor, oneHot: Tensor, weight?: Tensor): TfModule.Scalar {
  if (weight) return weightedSegmentationLoss(tf, logits, oneHot, weight);
  return tf.tidy(() => {
    const c = logits.shape[logits.rank - 1] as number;
    const flat = tf.reshape(logits, [-1, c]);
    const logp = tf.logSoftmax(flat);
    const ce = tf.neg(tf.mean(tf.sum(tf.mul(oneHot, logp), -1)));
    const prob = tf.exp(logp);
    const inter = tf.sum(tf.mul(prob, oneHot), 0);
    const denom = tf.add(tf.sum(prob, 0), tf.sum(oneHot, 0));
    const dice = tf.div(tf.add(tf.mul(inter, 2), DICE_SMOOTH), tf.add(denom, DICE_SMOOTH));
    const diceLoss = tf.sub(1, tf.mean(tf.slice(dice, [1], [c - 1])));
    return tf.mul(tf.add(ce, diceLoss), 0.5) as TfModule.Scalar;
  });
}

/**
 * segmentationLoss with a per-voxel weight w (pseudo-label confidence mask × class balance): cross-entropy
 * −Σ_v w_v Σ_c g·log p / N, soft Dice from Σ w·p·g, Σ w·p and Σ w·g. With w ≡ 1 it equals the unweighted loss.
 */
function weightedSegmentationLoss(tf: Tf, logits: Tensor, oneHot: Tensor, weight: Tensor): TfModule.Scalar {
  return tf.tidy(() => {
    const c = logits.shape[logits.rank - 1] as number;
    const flat = tf.reshape(logits, [-1, c]);
    const w = tf.reshape(weight, [-1, 1]);
    const logp = tf.logSoftmax(flat);
    const ce = tf.neg(tf.mean(tf.mul(tf.sum(tf.mul(oneHot, logp), -1, true), w)));
    const prob = tf.exp(logp);
    const pw = tf.mul(prob, w);
    const inter = tf.sum(tf.mul(pw, oneHot), 0);
    const denom = tf.add(tf.sum(pw, 0), tf.sum(tf.mul(oneHot, w), 0));
    const dice = tf.div(tf.add(tf.mul(inter, 2), DICE_SMOOTH), tf.add(denom, DICE_SMOOTH));
    const diceLoss = tf.sub(1, tf.mean(tf.slice(dice, [1], [c - 1])));
    return tf.mul(tf.add(ce, diceLoss), 0.5) as TfModule.Scalar;
  });
}

export function createTfjsOps(engine: EngineInfo): TfjsOps {
  const tf = engine.tf;
  // Native TensorFlow has correct conv3d gradients; on wasm (wrong conv3d gradients) and cpu (slow Conv3D)
  // convolutions go through our kernels.
  if (engine.name !== 'cpu' && engine.name !== 'wasm') {
    return {
      tf,
      conv3d(x, w, b, opts = {}) {
        let y = tf.add(tf.conv3d(x, w as Tensor5D, opts.stride ?? 1, 'same'), b) as Tensor5D;
        if (opts.add) y = tf.add(y, opts.add);
        return opts.relu ? (tf.relu(y) as Tensor5D) : y;
      },
      upsample2x(x) {
        const [n, d, h, w, c] = x.shape;
        // One axis at a time, each a rank-4 broadcast against ones: it has a gradient everywhere (tfjs's
        // Tile gradient stops at rank 4) and stays within TensorFlow's 5-D limit for broadcasting ops.
        const ones = tf.ones([1, 1, 2, 1]);
        const twice = (t: Tensor, outer: number, inner: number) => tf.mul(tf.reshape(t, [outer, t.size / (outer * inner), 1, inner]), ones);
        const xw = twice(x, n * d * h * w, c);
        const xh = twice(xw, n * d * h, 2 * w * c);
        const xd = twice(xh, n * d, 4 * h * w * c);
        return tf.reshape(xd, [n, 2 * d, 2 * h, 2 * w, c]) as Tensor5D;
      },
      segmentationLoss: (logits, oneHot, weight) => segmentationLoss(tf, logits, oneHot, weight),
    };
  }
  return {
    tf,
    conv3d(x, w, b, opts = {}) {
      const stride = opts.stride ?? 1;
      const relu = opts.relu ?? false;
      const [k, , , , cout] = w.shape as [number, number, number, number, number];
      if (w.rank !== 5 || w.shape[1] !== k || w.shape[2] !== k || w.shape[3] !== x.shape[4]) {
        throw new Error(`conv3d: weight shape [${w.shape.join(',')}] does not fit input [${x.shape.join(',')}] (cubic kernel expected)`);
      }
      const g = sameGeometry(x.shape, k, stride, cout);
      const outShape: [number, number, number, number, number] = [g.n, ...g.out, cout];
      const add = opts.add;
      if (add && add.shape.some((d, i) => d !== outShape[i])) {
        throw new Error(`conv3d: add shape [${add.shape.join(',')}] differs from output [${outShape.join(',')}]`);
      }
      const withInput = opts.inputGrad !== false;
      // The input image is data: keeping it out of the op's inputs means no gradient is computed for it.
      const xData = withInput ? undefined : (x.dataSync() as Float32Array);
      const op = tf.customGrad((...args: unknown[]) => {
        // args: [x]? w b [add]? save — in that order.
        let i = 0;
        const xT = withInput ? (args[i++] as Tensor) : undefined;
        const wT = args[i++] as Tensor;
        const bT = args[i++] as Tensor;
        const addT = add ? (args[i++] as Tensor) : undefined;
        // The cpu backend hands out its own storage from dataSync(); we only read it. Arrays captured by
        // the gradient closure stay valid after their tensors are disposed (plain GC'd memory).
        const xv = xData ?? (xT!.dataSync() as Float32Array);
        const wv = wT.dataSync() as Float32Array;
        const y = conv3dForward(xv, wv, bT.dataSync() as Float32Array, g);
        addReluInPlace(y, addT ? (addT.dataSync() as Float32Array) : undefined, relu);
        return {
          value: tf.tensor(y, outShape) as Tensor5D,
          gradFunc: (dy: Tensor5D) => {
            const dyv = relu ? reluGrad(y, dy.dataSync() as Float32Array) : (dy.dataSync() as Float32Array);
            const gr = conv3dBackward(xv, wv, dyv, g, withInput);
            const grads: Tensor[] = [];
            if (xT) grads.push(tf.tensor(gr.dx!, xT.shape));
            grads.push(tf.tensor(gr.dw, wT.shape), tf.tensor(gr.db, bT.shape));
            if (addT) grads.push(tf.tensor(relu ? dyv : new Float32Array(dyv), outShape));
            return grads;
          },
        };
      });
      const inputs: Tensor[] = [...(withInput ? [x] : []), w, b, ...(add ? [add] : [])];
      return op(...inputs) as Tensor5D;
    },
    upsample2x(x) {
      const shape = x.shape;
      const op = tf.customGrad((...args: unknown[]) => {
        const [xT] = args as [Tensor];
        const y = upsample2xForward(xT.dataSync() as Float32Array, shape);
        return {
          value: tf.tensor(y, [shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], shape[4]]) as Tensor5D,
          gradFunc: (dy: Tensor5D) => tf.tensor(upsample2xBackward(dy.dataSync() as Float32Array, shape), shape),
        };
      });
      return op(x) as Tensor5D;
    },
    segmentationLoss(logits, oneHot, weight) {
      const c = logits.shape[logits.rank - 1] as number;
      const target = oneHot.dataSync() as Float32Array;
      const w = weight ? (weight.dataSync() as Float32Array) : undefined;
      const op = tf.customGrad((...args: unknown[]) => {
        const [zT] = args as [Tensor];
        const r = segmentationLossJs(zT.dataSync() as Float32Array, target, c, w);
        return {
          value: tf.scalar(r.loss),
          gradFunc: (dy: TfModule.Scalar) => tf.mul(tf.tensor(r.grad, zT.shape), dy),
        };
      });
      return op(logits) as TfModule.Scalar;
    },
  };
}

/** Yields to the event loop so heartbeats and progress I/O run between training steps. */
const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A tfjs trainer for `arch` with its forward pass (an architecture's registered definition passes its own; tiny3d's is the default). */
export function createTfjsTrainer(arch: ModelArchitecture, engine: EngineInfo, forward?: TfjsForward): Trainer {
  const fwd = forward ?? (arch.id === TINY3D_ID ? tiny3dForward : undefined);
  if (!fwd) throw new Error(`no tfjs forward pass registered for architecture "${arch.id}"`);
  const tf = engine.tf;
  const ops = createTfjsOps(engine);
  const specs = arch.params();
  const numClasses = arch.numClasses;

  const checkWeights = (weights: TensorBundle) => {
    const problem = checkAgainstSpecs(weights, specs);
    if (problem) throw new Error(`weights do not match architecture ${arch.id}: ${problem}`);
  };

  /** Own copies of the weights: the caller's Float32Arrays must never become backend storage. */
  const toTensors = (weights: TensorBundle): Map<string, Tensor> => {
    const m = new Map<string, Tensor>();
    for (const s of specs) m.set(s.name, tf.tensor(new Float32Array(weights.get(s.name)!.data), [...s.shape]));
    return m;
  };

  return {
    engine: engine.name,
    architecture: arch,

    async train(req: TrainRequest): Promise<TrainResult> {
      checkWeights(req.weights);
      checkTrainRequest(req);
      const labelled = req.cases.filter((c) => c.label !== undefined || c.target !== undefined);
      if (!req.source && labelled.length === 0) throw new Error('train: no labelled cases');
      const dropout = req.dropout ?? 0;
      if (!(dropout >= 0 && dropout < 1)) throw new Error(`train: dropout must be in [0, 1), got ${req.dropout}`);
      const mu = req.proximalMu ?? 0;
      const rng = mulberry32(req.seed);

      const start = toTensors(req.weights);
      const vars = new Map<string, TfModule.Variable>();
      for (const s of specs) vars.set(s.name, tf.variable(start.get(s.name)!, s.trainable));
      // The optimiser's master copies of the weights; each step writes the trained ones back to the variables.
      const values = new Map(specs.map((s) => [s.name, new Float32Array(req.weights.get(s.name)!.data)]));
      const startValues = mu > 0 ? new Map(specs.map((s) => [s.name, new Float32Array(req.weights.get(s.name)!.data)])) : undefined;
      const optimizer = new Optimizer(req.optimizer ?? DEFAULT_OPTIMIZER, req.learningRate, specs, values, undefined, req.optimizerState);
      const trained = optimizer.trained;
      const trainedVars = trained.map((n) => vars.get(n)!);
      const varName = new Map(trained.map((n) => [vars.get(n)!.name, n]));
      const losses: number[] = [];
      // Inverted dropout with a mask from the request's rng (so a seed fixes the run on every engine).
      const trainOps: TfjsOps = dropout > 0
        ? {
            ...ops,
            dropout: (f: Tensor5D) => {
              const mask = new Float32Array(f.size);
              const keep = 1 / (1 - dropout);
              for (let i = 0; i < mask.length; i++) mask[i] = rng() < dropout ? 0 : keep;
              return tf.mul(f, tf.tensor(mask, f.shape)) as Tensor5D;
            },
          }
        : ops;
      try {
        // `step` is the 0-based index of the step just run, as the site agent's progress bar expects.
        for (let step = 0; step < req.steps; step++) {
          const batch = await nextBatch(req.source, labelled, req.batchSize, arch.patchShape, numClasses, rng);
          const [pd, ph, pw] = arch.patchShape;
          const x = tf.tensor(batch.image, [req.batchSize, pd, ph, pw, 1]) as Tensor5D;
          const y = tf.tensor(batch.oneHot, [req.batchSize * pd * ph * pw, numClasses]);
          const wt = batch.weight ? tf.tensor(batch.weight, [req.batchSize * pd * ph * pw]) : undefined;
          const lossOf = () => trainOps.segmentationLoss(fwd(vars, x, trainOps), y, wt);
          const { value, grads } = trainedVars.length > 0 ? tf.variableGrads(lossOf, trainedVars) : { value: tf.tidy(lossOf), grads: {} };
          try {
            const loss = value.dataSync()[0];
            if (!Number.isFinite(loss)) throw new Error(`train: loss became ${loss} at step ${step + 1} of ${req.steps} (learning rate ${req.learningRate} too high?)`);
            const g = new Map<string, Float32Array>();
            for (const [vn, t] of Object.entries(grads)) g.set(varName.get(vn)!, new Float32Array(t.dataSync() as Float32Array));
            if (startValues) {
              // FedProx: ∇(μ/2)‖w − w_start‖² = μ(w − w_start).
              for (const [name, gn] of g) {
                const w = values.get(name)!;
                const w0 = startValues.get(name)!;
                for (let i = 0; i < gn.length; i++) gn[i] += mu * (w[i] - w0[i]);
              }
            }
            optimizer.step(g, req.learningRateFactor?.(step) ?? 1);
            for (const name of trained) {
              // A copy: the optimiser's array must never become backend storage.
              const t = tf.tensor(new Float32Array(values.get(name)!), vars.get(name)!.shape);
              vars.get(name)!.assign(t);
              t.dispose();
            }
            losses.push(loss);
            req.onStep?.(step, loss);
          } finally {
            value.dispose();
            for (const t of Object.values(grads)) t.dispose();
            x.dispose();
            y.dispose();
            wt?.dispose();
          }
          await yieldToEventLoop();
        }
        const out: NamedTensor[] = specs.map((s) => ({ name: s.name, dtype: 'F32', shape: [...s.shape], data: values.get(s.name)! }));
        return {
          weights: makeBundle(out),
          ...lossSummary(losses),
          samples: req.source ? req.source.cases : labelled.length,
          optimizerState: optimizer.state(),
        };
      } finally {
        for (const v of vars.values()) v.dispose();
        for (const t of start.values()) t.dispose();
      }
    },

    async evaluate(weights: TensorBundle, cases: readonly VolumeCase[]): Promise<EvalResult> {
      checkWeights(weights);
      const labelled = cases.filter((c) => c.label !== undefined);
      const params = toTensors(weights);
      const perCase: number[][] = [];
      try {
        for (const vc of labelled) {
          const pred = predictVolume(tf, ops, fwd, params, vc);
          perCase.push(diceScores(pred, vc.label!, numClasses));
          await yieldToEventLoop();
        }
      } finally {
        for (const t of params.values()) t.dispose();
      }
      const dicePerClass = meanDicePerClass(perCase, numClasses - 1);
      const meanDice = dicePerClass.reduce((a, v) => a + v, 0) / dicePerClass.length;
      return { dicePerClass, meanDice, cases: perCase.length };
    },

    async predictProbs(weights: TensorBundle, vc: VolumeCase): Promise<Float32Array> {
      checkWeights(weights);
      const params = toTensors(weights);
      try {
        return volumeProbs(tf, ops, fwd, params, vc);
      } finally {
        for (const t of params.values()) t.dispose();
      }
    },
  };
}

/** Softmax probabilities [D·H·W, C] of a whole volume in one forward pass (odd sizes padded as in predictVolume). */
export function volumeProbs(tf: Tf, ops: TfjsOps, fwd: TfjsForward, params: ReadonlyMap<string, Tensor>, vc: VolumeCase): Float32Array {
  const [D, H, W] = vc.shape;
  const [Dp, Hp, Wp] = [D, H, W].map((s) => s + (s % 2)) as [number, number, number];
  let input = vc.image;
  if (Dp !== D || Hp !== H || Wp !== W) {
    input = new Float32Array(Dp * Hp * Wp);
    for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) input.set(vc.image.subarray((z * H + y) * W, (z * H + y + 1) * W), (z * Hp + y) * Wp);
  }
  const probs = tf.tidy(() => tf.softmax(fwd(params, tf.tensor(input, [1, Dp, Hp, Wp, 1]) as Tensor5D, ops)));
  const full = probs.dataSync() as Float32Array;
  const C = probs.shape[probs.rank - 1] as number;
  probs.dispose();
  const out = new Float32Array(D * H * W * C);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < H; y++) out.set(full.subarray(((z * Hp + y) * Wp) * C, ((z * Hp + y) * Wp + W) * C), ((z * H + y) * W) * C);
  }
  return out;
}

/**
 * Argmax labels for a whole volume in one forward pass. Odd dimensions are zero-padded to even
 * (one stride-2 level) and cropped back.
 */
export function predictVolume(tf: Tf, ops: TfjsOps, fwd: TfjsForward, params: ReadonlyMap<string, Tensor>, vc: VolumeCase): Uint8Array {
  const [D, H, W] = vc.shape;
  const [Dp, Hp, Wp] = [D, H, W].map((s) => s + (s % 2)) as [number, number, number];
  let input = vc.image;
  if (Dp !== D || Hp !== H || Wp !== W) {
    input = new Float32Array(Dp * Hp * Wp);
    for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) input.set(vc.image.subarray((z * H + y) * W, (z * H + y + 1) * W), (z * Hp + y) * Wp);
  }
  const labels = tf.tidy(() => {
    const x = tf.tensor(input, [1, Dp, Hp, Wp, 1]) as Tensor5D;
    return tf.argMax(fwd(params, x, ops), -1);
  });
  const full = labels.dataSync();
  labels.dispose();
  const out = new Uint8Array(D * H * W);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < H; y++) {
      const src = (z * Hp + y) * Wp;
      const dst = (z * H + y) * W;
      for (let x = 0; x < W; x++) out[dst + x] = full[src + x];
    }
  }
  return out;
}
