/**
 * The Med3D trainer: MedicalNet's encoder and a site head trained on Float32Arrays with our own reverse-mode
 * tape, convolutions on the selected ConvKernels (oneDNN or JS). tfjs has no gradient for dilated conv3d
 * (layer3/layer4) nor for conv3dTranspose (the segmentation head), and its wasm conv3d gradients are wrong,
 * so this engine does not go through tfjs at all.
 *
 * Segmentation: MedicalNet's head predicts at ¼ of the input resolution. Training compares it with the label
 * patch average-pooled to that grid (soft targets: a small lesion still weighs in, where MedicalNet's
 * nearest-neighbour label resize can drop it); evaluation upsamples the logits trilinearly to the full grid.
 * The U-Net head predicts on the full grid: it trains on the labels themselves and needs no upsampling.
 *
 * Restoration (objective 'restore', self-supervised pretraining): the one-channel U-Net decoder restores each
 * patch from a Models Genesis-corrupted copy (genesis-corruption.ts) under a mean squared error; no label is read.
 */
import type { ConvKernels } from '../engine/conv-kernels.ts';
import { elementwiseOf, uninitF32 } from '../engine/elementwise-kernels.ts';
import { diceScores, meanDicePerClass } from '../metrics/dice.ts';
import { checkAgainstSpecs, makeBundle, type NamedTensor, type TensorBundle } from '../tensors/bundle.ts';
import { mulberry32 } from '../util/random.ts';
import { checkTrainRequest, lossSummary, nextBatch } from './batch.ts';
import { Tape, type Act, accumulate, act } from './graph/tape.ts';
import { createMed3dTrainOps, type Med3dTrainOps, type ParamStore } from './graph/med3d-ops.ts';
import { BufferPool } from './graph/pool.ts';
import { med3dOutputFactor, type Med3dArchitecture } from './med3d.ts';
import { med3dEncoderFeatures, med3dEncoderForward, med3dForward, med3dHeadForward } from './med3d-forward.ts';
import { DEFAULT_OPTIMIZER, Optimizer, optimizerKernelsOf } from './optim.ts';
import { corruptBatch, DEFAULT_RESTORATION_TRANSFORMS } from './genesis-corruption.ts';
import { isRestorationArchitecture, restorationLoss } from './restoration.ts';
import type { EvalResult, TrainRequest, TrainResult, Trainer, VolumeCase } from './types.ts';
import { chooseInference, flipAveraged, slidingWindowProbs, WHOLE_VOLUME_MAX_BYTES, windowStarts, type InferencePlan, type Shape3, type WindowForward, type WindowLogitsNetwork } from './sliding-window.ts';
import { jsWindowBlendOn, windowBlendOf, type WindowBlendKernel } from './window-blend.ts';
import { upsampleLinear, windowProbsFromLogits } from './window-probs.ts';
import { createLogger, type Logger } from '../util/log.ts';

class ArrayStore implements ParamStore {
  readonly values = new Map<string, Float32Array>();
  readonly shapes = new Map<string, readonly number[]>();
  readonly grads = new Map<string, Float32Array>();

  constructor(arch: Med3dArchitecture, weights: TensorBundle) {
    for (const p of arch.params()) {
      // Own copies: training mutates them in place.
      this.values.set(p.name, new Float32Array(weights.get(p.name)!.data));
      this.shapes.set(p.name, p.shape);
    }
  }

  value(name: string): Float32Array {
    const v = this.values.get(name);
    if (!v) throw new Error(`med3d: unknown parameter ${name}`);
    return v;
  }

  shape(name: string): readonly number[] {
    return this.shapes.get(name)!;
  }

  grad(name: string): Float32Array | undefined {
    return this.grads.get(name);
  }
}

const names = (arch: Med3dArchitecture) => new Map(arch.params().map((p) => [p.name, p.name]));

/** Average-pools a one-hot target [N·D·H·W, C] by `f` per axis (soft labels on the head's grid). */
export function poolTargets(oneHot: Float32Array, shape: readonly [number, number, number, number], numClasses: number, f: number): Float32Array {
  const [n, D, H, W] = shape;
  const [d, h, w] = [D / f, H / f, W / f];
  if (![d, h, w].every(Number.isInteger)) throw new Error(`patch ${D}×${H}×${W} must be divisible by ${f} for the Med3D segmentation head`);
  const C = numClasses;
  const out = new Float32Array(n * d * h * w * C);
  const inv = 1 / (f * f * f);
  for (let b = 0; b < n; b++) {
    for (let z = 0; z < D; z++) {
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const src = (((b * D + z) * H + y) * W + x) * C;
          const dst = (((b * d + ((z / f) | 0)) * h + ((y / f) | 0)) * w + ((x / f) | 0)) * C;
          for (let c = 0; c < C; c++) out[dst + c] += oneHot[src + c] * inv;
        }
      }
    }
  }
  return out;
}

/**
 * Pools per-voxel weighted targets onto the head's grid: the pooled weight is the mean weight of the f³ block,
 * the pooled target the weight-averaged target (so masked voxels do not pull the soft label).
 */
export function poolWeightedTargets(
  target: Float32Array,
  weight: Float32Array,
  shape: readonly [number, number, number, number],
  numClasses: number,
  f: number,
): { target: Float32Array; weight: Float32Array } {
  const C = numClasses;
  const weighted = new Float32Array(target.length);
  for (let v = 0; v < weight.length; v++) for (let c = 0; c < C; c++) weighted[v * C + c] = target[v * C + c] * weight[v];
  const num = poolTargets(weighted, shape, C, f);
  const plain = poolTargets(target, shape, C, f);
  const w = poolTargets(weight, shape, 1, f);
  for (let v = 0; v < w.length; v++) {
    if (w[v] > 0) for (let c = 0; c < C; c++) num[v * C + c] /= w[v];
    else for (let c = 0; c < C; c++) num[v * C + c] = plain[v * C + c];
  }
  return { target: num, weight: w };
}

/** Inverted dropout on an activation, recorded on the tape (a noisy student's model noise). */
function dropoutAct(x: Act, p: number, rng: () => number, tape: Tape): Act {
  const keep = 1 / (1 - p);
  const mask = new Float32Array(x.data.length);
  const y = new Float32Array(x.data.length);
  for (let i = 0; i < mask.length; i++) {
    mask[i] = rng() < p ? 0 : keep;
    y[i] = x.data[i] * mask[i];
  }
  const out = act(y, x.shape, true);
  tape.record(() => {
    if (!out.grad) return;
    const g = new Float32Array(mask.length);
    for (let i = 0; i < g.length; i++) g[i] = out.grad[i] * mask[i];
    accumulate(x, g, true);
  });
  return out;
}

/** Softmax cross-entropy of class logits [N, K] against class indices; mean over the batch. */
export function classificationLossJs(z: Float32Array, labels: readonly number[], K: number): { loss: number; grad: Float32Array } {
  const n = labels.length;
  const grad = new Float32Array(z.length);
  let loss = 0;
  for (let b = 0; b < n; b++) {
    const o = b * K;
    let max = -Infinity;
    for (let k = 0; k < K; k++) max = Math.max(max, z[o + k]);
    let se = 0;
    for (let k = 0; k < K; k++) se += Math.exp(z[o + k] - max);
    const lse = max + Math.log(se);
    loss += lse - z[o + labels[b]];
    for (let k = 0; k < K; k++) grad[o + k] = (Math.exp(z[o + k] - lse) - (k === labels[b] ? 1 : 0)) / n;
  }
  return { loss: loss / n, grad };
}

/** A volume must carry the channels conv1 takes; said plainly here rather than as a shape error deep in the graph. */
function checkChannels(arch: Med3dArchitecture, vc: VolumeCase): void {
  const C = arch.config.inChannels;
  const [D, H, W] = vc.shape;
  if ((vc.channels ?? 1) !== C || vc.image.length !== D * H * W * C) {
    throw new Error(`case ${vc.id}: ${vc.channels ?? 1} input channel(s) (${vc.image.length} values for ${D}×${H}×${W}); the model takes ${C}`);
  }
}

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

export function createMed3dTrainer(arch: Med3dArchitecture, kernels: ConvKernels): Trainer {
  const specs = arch.params();
  const head = arch.config.head;
  const voxelHead = head.kind !== 'classification';
  const numClasses = arch.numClasses;
  const checkWeights = (weights: TensorBundle) => {
    const problem = checkAgainstSpecs(weights, specs);
    if (problem) throw new Error(`weights do not match architecture ${arch.id}: ${problem}`);
  };

  return {
    engine: kernels.name,
    architecture: arch,

    async train(req: TrainRequest): Promise<TrainResult> {
      checkWeights(req.weights);
      checkTrainRequest(req);
      if (voxelHead && arch.config.norm === 'batch' && req.batchSize < 2) {
        // Batch statistics of one 4³ head map are too noisy to train BatchNorm; PyTorch would train but badly.
        throw new Error('train: Med3D segmentation with BatchNorm needs batchSize ≥ 2 (BatchNorm uses batch statistics; model.norm group or instance does not)');
      }
      const restore = req.objective === 'restore';
      if (restore && !isRestorationArchitecture(arch)) throw new Error('train: the restore objective needs the restoration model (a U-Net decoder with one output channel: restorationArchitecture)');
      if (!restore && isRestorationArchitecture(arch)) throw new Error('train: a one-channel U-Net decoder is the restoration model; train it with objective restore');
      // Restoration reads images only: every case counts, labelled or not.
      const labelled = restore ? req.cases : req.cases.filter((c) => (voxelHead ? c.label !== undefined || c.target !== undefined : c.classLabel !== undefined));
      const transforms = req.restoration ?? DEFAULT_RESTORATION_TRANSFORMS;
      const dropout = req.dropout ?? 0;
      if (!(dropout >= 0 && dropout < 1)) throw new Error(`train: dropout must be in [0, 1), got ${req.dropout}`);
      if (!req.source && labelled.length === 0) throw new Error(`train: no ${restore ? '' : voxelHead ? 'voxel-labelled ' : 'class-labelled '}cases`);
      const rng = mulberry32(req.seed);
      const store = new ArrayStore(arch, req.weights);
      const optimizer = new Optimizer(req.optimizer ?? DEFAULT_OPTIMIZER, req.learningRate, specs, store.values, optimizerKernelsOf(kernels), req.optimizerState);
      for (const name of optimizer.trained) store.grads.set(name, new Float32Array(store.values.get(name)!.length));
      const mu = req.proximalMu ?? 0;
      const start = mu > 0 ? new Map(optimizer.trained.map((n) => [n, new Float32Array(store.values.get(n)!)])) : undefined;
      const params = names(arch);
      const [pd, ph, pw] = arch.patchShape;
      const C = arch.config.inChannels;
      const losses: number[] = [];
      // Activations and gradients of a step, reused by the next one (nothing of a step is read after it).
      const pool = new BufferPool();
      // The loss's gradient comes from the step's pool too: it is the output's gradient, read only in this step.
      const lossKernels = elementwiseOf(kernels).withAlloc((n) => pool.take(n));

      for (let step = 0; step < req.steps; step++) {
        for (const g of store.grads.values()) g.fill(0);
        pool.recycle();
        const tape = new Tape();
        const ops = createMed3dTrainOps({ kernels, store, tape, training: true, rng, pool });
        let loss: number;
        let out: Act;
        let grad: Float32Array;
        if (restore) {
          const batch = await nextBatch(req.source, labelled, req.batchSize, arch.patchShape, 1, rng, { withLabels: false });
          const corrupted = corruptBatch(batch.image, req.batchSize, arch.patchShape, transforms, rng);
          const x = act(corrupted, [req.batchSize, pd, ph, pw, 1], false);
          const enc = med3dEncoderFeatures(arch, params, x, ops);
          out = med3dHeadForward(arch, params, enc.features, ops, { skips: enc.skips });
          ({ loss, grad } = restorationLoss(out.data, batch.image));
        } else if (voxelHead) {
          const batch = await nextBatch(req.source, labelled, req.batchSize, arch.patchShape, numClasses, rng, { channels: C });
          const x = act(batch.image, [req.batchSize, pd, ph, pw, C], false);
          const enc = med3dEncoderFeatures(arch, params, x, ops);
          const feats = enc.features;
          out = med3dHeadForward(arch, params, dropout > 0 ? dropoutAct(feats, dropout, rng, tape) : feats, ops, { skips: enc.skips });
          const shape4: [number, number, number, number] = [req.batchSize, pd, ph, pw];
          const factor = med3dOutputFactor(head);
          if (factor === 1) {
            // Full-resolution head: the labels themselves are the targets.
            ({ loss, grad } = lossKernels.segmentationLoss(out.data, batch.oneHot, numClasses, batch.weight));
          } else if (batch.weight) {
            const pooled = poolWeightedTargets(batch.oneHot, batch.weight, shape4, numClasses, factor);
            ({ loss, grad } = lossKernels.segmentationLoss(out.data, pooled.target, numClasses, pooled.weight));
          } else {
            const target = poolTargets(batch.oneHot, shape4, numClasses, factor);
            ({ loss, grad } = lossKernels.segmentationLoss(out.data, target, numClasses));
          }
        } else {
          const batch = await nextBatch(req.source, labelled, req.batchSize, arch.patchShape, 2, rng, { withLabels: false, channels: C });
          const x = act(batch.image, [req.batchSize, pd, ph, pw, C], false);
          out = med3dHeadForward(arch, params, med3dEncoderForward(arch, params, x, ops), ops, { dropout: true });
          ({ loss, grad } = classificationLossJs(out.data, batch.cases.map((c) => c.classLabel!), numClasses));
        }
        if (!Number.isFinite(loss)) throw new Error(`train: loss became ${loss} at step ${step + 1} of ${req.steps} (learning rate ${req.learningRate} too high?)`);
        tape.backward(out, grad);
        if (start) {
          // FedProx: ∇(μ/2)‖w − w_start‖² = μ(w − w_start).
          for (const [name, w0] of start) {
            const g = store.grads.get(name)!;
            const w = store.values.get(name)!;
            for (let i = 0; i < g.length; i++) g[i] += mu * (w[i] - w0[i]);
          }
        }
        optimizer.step(store.grads, req.learningRateFactor?.(step) ?? 1);
        losses.push(loss);
        req.onStep?.(step, loss);
        await yieldToEventLoop();
      }
      const outTensors: NamedTensor[] = specs.map((s) => ({ name: s.name, dtype: 'F32', shape: [...s.shape], data: store.values.get(s.name)! }));
      return {
        weights: makeBundle(outTensors),
        ...lossSummary(losses),
        samples: req.source ? req.source.cases : labelled.length,
        optimizerState: optimizer.state(),
      };
    },

    async evaluate(weights: TensorBundle, cases: readonly VolumeCase[]): Promise<EvalResult> {
      checkWeights(weights);
      const store = new ArrayStore(arch, weights);
      // Several cases (or windows) reuse the pool's buffers; one case of one pass is better off without it.
      const onePass = cases.length === 1 && (head.kind === 'classification' || passesOf(med3dInferencePlan(arch, cases[0].shape), cases[0].shape) === 1);
      const inf = onePass ? singlePassOps(kernels, store) : inferenceOps(kernels, store);
      const params = names(arch);
      if (head.kind === 'classification') {
        const labelled = cases.filter((c) => c.classLabel !== undefined);
        let correct = 0;
        for (const vc of labelled) {
          const [D, H, W] = vc.shape;
          checkChannels(arch, vc);
          const ops = inf.beginPass();
          const logits = med3dHeadForward(arch, params, med3dEncoderForward(arch, params, act(vc.image, [1, D, H, W, arch.config.inChannels], false), ops), ops).data;
          let best = 0;
          for (let k = 1; k < numClasses; k++) if (logits[k] > logits[best]) best = k;
          if (best === vc.classLabel) correct++;
          await yieldToEventLoop();
        }
        const accuracy = labelled.length ? correct / labelled.length : 0;
        return { dicePerClass: [], meanDice: Number.NaN, accuracy, cases: labelled.length };
      }
      const perCase: number[][] = [];
      for (const vc of cases) {
        if (!vc.label) continue;
        checkChannels(arch, vc);
        const plan = med3dInferencePlan(arch, vc.shape);
        const labels = plan.kind === 'whole' && !plan.flipTTA ? predictMed3dVolume(arch, inf, vc) : argmaxRows(await med3dPlannedProbs(arch, inf, vc, plan), numClasses);
        perCase.push(diceScores(labels, vc.label, numClasses));
        await yieldToEventLoop();
      }
      const dicePerClass = meanDicePerClass(perCase, numClasses - 1);
      const meanDice = dicePerClass.reduce((a, v) => a + v, 0) / dicePerClass.length;
      return { dicePerClass, meanDice, cases: perCase.length };
    },

    async predictProbs(weights: TensorBundle, vc: VolumeCase): Promise<Float32Array> {
      if (!voxelHead) throw new Error('predictProbs: the Med3D classification head has no per-voxel output');
      checkWeights(weights);
      checkChannels(arch, vc);
      const store = new ArrayStore(arch, weights);
      const plan = med3dInferencePlan(arch, vc.shape);
      const inf = passesOf(plan, vc.shape) > 1 ? inferenceOps(kernels, store) : singlePassOps(kernels, store);
      return plan.kind === 'whole' && !plan.flipTTA ? med3dVolumeProbs(arch, inf, vc) : med3dPlannedProbs(arch, inf, vc, plan);
    },
  };
}

/**
 * Most bytes an inference buffer pool keeps. A window pass of the default plan needs far less; a whole-volume pass
 * over a large scan may not fit, and its arrays past the bound are then ordinary ones, as without a pool.
 */
export const INFERENCE_POOL_MAX_BYTES = 1024 ** 3;

/**
 * Eval-mode ops (no tape) whose activations come from a buffer pool that each forward pass recycles: the
 * passes of one evaluation (windows, flips, cases of one size) reuse warm memory instead of faulting in fresh
 * pages. beginPass() hands out the ops for one pass; what a pass returns must be read before the next begins.
 */
export interface InferenceOps {
  beginPass(): Med3dTrainOps;
  /** An array of n values (contents unspecified) that lives until the next pass begins. */
  take(n: number): Float32Array;
  /** How windows' logits are blended into the volume (the addon's fused kernel when built); absent = JS. */
  readonly blend?: WindowBlendKernel;
}

export function inferenceOps(kernels: ConvKernels, store: ParamStore): InferenceOps {
  const pool = new BufferPool({ maxBytes: INFERENCE_POOL_MAX_BYTES });
  const ops = createMed3dTrainOps({ kernels, store, training: false, pool });
  return {
    beginPass() {
      pool.recycle();
      return ops;
    },
    take: (n) => pool.take(n),
    blend: windowBlendOf(kernels, (n) => pool.take(n)),
  };
}

/**
 * Eval-mode ops on fresh, garbage-collected arrays, for a single pass: a pool only pays from its second pass on, and
 * for one pass it would keep every activation of the pass alive to its end, where the collector frees them as the
 * pass goes.
 */
export function singlePassOps(kernels: ConvKernels, store: ParamStore): InferenceOps {
  return { beginPass: () => createMed3dTrainOps({ kernels, store, training: false }), take: uninitF32, blend: windowBlendOf(kernels, uninitF32) };
}

/** Forward passes a plan takes for a volume of `shape`: one per batch of windows (or one whole), × 8 with flips. */
function passesOf(plan: InferencePlan, shape: Shape3): number {
  const flips = plan.flipTTA ? 8 : 1;
  if (plan.kind === 'whole') return flips;
  const { window, overlap, batch } = plan.options;
  const windows = [0, 1, 2].reduce((a, i) => a * windowStarts(Math.max(shape[i], window[i]), window[i], overlap).length, 1);
  return Math.ceil(windows / batch) * flips;
}

/**
 * Logits of a whole volume on its own grid: zero-padded to a multiple of 8 (so the head's ¼ grid tiles it
 * exactly, and the U-Net head's skips line up), upsampled ×4 linearly for the ¼ head; returned on the padded
 * grid [Dp, Hp, Wp, C] with its sizes.
 */
function med3dVolumeLogits(arch: Med3dArchitecture, inf: InferenceOps, vc: VolumeCase): { full: Float32Array; Hp: number; Wp: number } {
  const [D, H, W] = vc.shape;
  const [Dp, Hp, Wp] = [D, H, W].map((s) => Math.ceil(s / 8) * 8) as [number, number, number];
  const C = arch.config.inChannels;
  let input = vc.image;
  if (Dp !== D || Hp !== H || Wp !== W) {
    input = new Float32Array(Dp * Hp * Wp * C);
    for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) input.set(vc.image.subarray((z * H + y) * W * C, (z * H + y + 1) * W * C), (z * Hp + y) * Wp * C);
  }
  const params = names(arch);
  const logits = med3dForward(arch, params, act(input, [1, Dp, Hp, Wp, C], false), inf.beginPass());
  const factor = med3dOutputFactor(arch.config.head);
  return { full: factor === 1 ? logits.data : upsampleLinear(logits.data, logits.shape, factor, inf.take), Hp, Wp };
}

/** Softmax probabilities [D·H·W, C] of a whole volume. */
export function med3dVolumeProbs(arch: Med3dArchitecture, inf: InferenceOps, vc: VolumeCase): Float32Array {
  const [D, H, W] = vc.shape;
  const C = arch.numClasses;
  const { full, Hp, Wp } = med3dVolumeLogits(arch, inf, vc);
  const out = new Float32Array(D * H * W * C);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        const src = ((z * Hp + y) * Wp + x) * C;
        const dst = ((z * H + y) * W + x) * C;
        let max = full[src];
        for (let c = 1; c < C; c++) if (full[src + c] > max) max = full[src + c];
        let se = 0;
        for (let c = 0; c < C; c++) se += Math.exp(full[src + c] - max);
        for (let c = 0; c < C; c++) out[dst + c] = Math.exp(full[src + c] - max) / se;
      }
    }
  }
  return out;
}

/** Argmax labels of a whole volume (logits as med3dVolumeLogits makes them, cropped back). */
export function predictMed3dVolume(arch: Med3dArchitecture, inf: InferenceOps, vc: VolumeCase): Uint8Array {
  const [D, H, W] = vc.shape;
  const C = arch.numClasses;
  const { full, Hp, Wp } = med3dVolumeLogits(arch, inf, vc);
  const out = new Uint8Array(D * H * W);
  for (let z = 0; z < D; z++) {
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        const src = ((z * Hp + y) * Wp + x) * C;
        let best = 0;
        for (let c = 1; c < C; c++) if (full[src + c] > full[src + best]) best = c;
        out[(z * H + y) * W + x] = best;
      }
    }
  }
  return out;
}

function argmaxRows(probs: Float32Array, C: number): Uint8Array {
  const out = new Uint8Array(probs.length / C);
  for (let v = 0; v < out.length; v++) {
    let best = 0;
    for (let c = 1; c < C; c++) if (probs[v * C + c] > probs[v * C + best]) best = c;
    out[v] = best;
  }
  return out;
}

/** Med3D's logits for windows: [n, d, h, w, C] inputs (sides multiples of 8) → logits on the head's grid (factor 4 or 1). */
export function med3dWindowLogits(arch: Med3dArchitecture, inf: InferenceOps): WindowLogitsNetwork['logits'] {
  const params = names(arch);
  const factor = med3dOutputFactor(arch.config.head);
  return (input, n, [d, h, w]) => ({ logits: med3dForward(arch, params, act(input, [n, d, h, w, arch.config.inChannels], false), inf.beginPass()).data, factor });
}

/** Med3D as a window network: [n, d, h, w, C] inputs (sides multiples of 8) → softmax probabilities on the same grid. */
export function med3dWindowForward(arch: Med3dArchitecture, inf: InferenceOps): WindowForward {
  const logitsOf = med3dWindowLogits(arch, inf);
  return (input, n, window) => {
    const { logits, factor } = logitsOf(input, n, window);
    // Everything up to the probabilities comes from the pass's pool: the caller reads them before the next pass.
    return windowProbsFromLogits(logits, n, window, factor, arch.numClasses, inf.take);
  };
}

/**
 * Estimated float32 bytes live at the peak of a whole-volume pass over `padded` voxels (eval mode: no tape keeps
 * activations): the largest of the stem (input, conv1 output and its normalised copy at ½ resolution), the
 * U-Net head's full-resolution fusion (input conv, upsampled features, their 2·Ch concatenation and the fused
 * output, with the stem skip still held) and the output (logits upsampled to the full grid and their softmax).
 * Deeper stages run at ⅛ of the voxels or less and never dominate.
 */
export function med3dWholeVolumeBytes(arch: Med3dArchitecture, padded: Shape3): number {
  const V = padded[0] * padded[1] * padded[2];
  const P = arch.config.basePlanes;
  const head = arch.config.head;
  const stem = arch.config.inChannels * V + (2 * P * V) / 8;
  const fusion = head.kind === 'unet' ? V + (P * V) / 8 + 5 * head.channels * V : 0;
  const output = V + 2 * arch.numClasses * V;
  return 4 * Math.max(stem, fusion, output);
}

let inferenceLog: Logger | undefined;
const autoWindowLogged = new Set<string>();

/** How this architecture scores a volume of `shape` (its plan settings, or the memory bound's fallback). */
function med3dInferencePlan(arch: Med3dArchitecture, shape: Shape3): InferencePlan {
  const plan = chooseInference(arch.inference, arch.patchShape, shape, (p) => med3dWholeVolumeBytes(arch, p));
  if (plan.kind === 'window' && plan.auto) {
    const key = `${arch.id}:${shape.join('x')}`;
    if (!autoWindowLogged.has(key)) {
      autoWindowLogged.add(key);
      inferenceLog ??= createLogger('med3d-inference');
      const gib = (b: number) => Math.round((b / 1024 ** 3) * 100) / 100;
      const padded = shape.map((s) => Math.ceil(s / 8) * 8) as [number, number, number];
      inferenceLog.info(
        { shape: [...shape], estimatedGiB: gib(med3dWholeVolumeBytes(arch, padded)), boundGiB: gib(WHOLE_VOLUME_MAX_BYTES), window: [...plan.options.window], overlap: plan.options.overlap },
        'whole-volume inference would exceed the memory bound: scoring this volume size with sliding windows',
      );
    }
  }
  return plan;
}

/** Probabilities [D·H·W, C] by sliding windows, or by one window over the padded volume (whole mode with flips). */
function med3dPlannedProbs(arch: Med3dArchitecture, inf: InferenceOps, vc: VolumeCase, plan: InferencePlan): Promise<Float32Array> {
  const C = arch.numClasses;
  const channels = arch.config.inChannels;
  // Without flips the logits go straight to the blending kernel (fused upsampling, softmax and weighting); the
  // flip average needs each window's probabilities first.
  const forward = plan.flipTTA
    ? flipAveraged(med3dWindowForward(arch, inf), C, channels)
    : { logits: med3dWindowLogits(arch, inf), blend: inf.blend ?? jsWindowBlendOn(inf.take) };
  const options =
    plan.kind === 'window'
      ? { ...plan.options, numClasses: C, channels }
      : { window: vc.shape.map((s) => Math.ceil(s / 8) * 8) as [number, number, number], overlap: 0, blend: 'uniform' as const, batch: 1, numClasses: C, channels };
  return slidingWindowProbs(vc.image, vc.shape, options, forward);
}
