/**
 * Med3D / MedicalNet forward pass in tfjs, NDHWC, matching PyTorch exactly (eval mode):
 *   - convolutions pad SYMMETRICALLY with tf.pad and then run 'valid' (tfjs 'same' pads (2,3) for conv1 and
 *     (0,1) for stride-2 3³ convs on even sizes, where PyTorch pads (3,3) and (1,1));
 *   - max-pool pads with -Infinity (PyTorch ignores padding in max pooling);
 *   - layer3/layer4 use dilated tf.conv3d (padding = dilation);
 *   - norm layers are their own modules (shared/model/layers/): BatchNorm with the running statistics, GroupNorm/
 *     InstanceNorm (no running statistics) per sample and group, PyTorch's eps 1e-5;
 *   - conv_seg's ConvTranspose3d (k 2, s 2, no padding) is tf.conv3dTranspose with output 2× the input and
 *     the filter [2,2,2,out,in] (PyTorch [in,out,2,2,2] permuted (2,3,4,1,0); no kernel flip);
 *   - shortcut A = 1³ average pool with the stride (a strided subsample) + zero channels appended.
 *
 * The U-Net head concatenates upsampled features with the encoder's skips (stem, layer1) and a full-resolution
 * conv of the input, so it takes them from med3dEncoderFeatures (med3dForward wires both).
 *
 * The layer graph (med3dEncoderForward / med3dHeadForward) is written against the small Med3dOps interface,
 * so a training forward can reuse it with ops that have gradients (tfjs 4.22 has none for dilated conv3d or
 * conv3dTranspose) and batch-statistics BatchNorm; createMed3dEvalOps is the plain-tf-ops inference set,
 * valid on every backend (slow on the pure-JS `cpu` one: its Conv3D is a naive loop).
 */
import type * as TfModule from '@tensorflow/tfjs';
import { checkAgainstSpecs, type TensorBundle } from '../tensors/bundle.ts';
import { describeMed3d, med3dNormGroups, type Med3dArchitecture, type Med3dBlock } from './med3d.ts';
import type { NormLayer, NormParamSuffix } from './layers/norm-layer.ts';
import { normLayer } from './layers/norm-layers.ts';

type Tf = typeof TfModule;
type Tensor = TfModule.Tensor;
type Tensor5D = TfModule.Tensor5D;

export interface Med3dConvOptions {
  readonly stride?: number;
  readonly dilation?: number;
  /** Symmetric zero padding on D, H and W (PyTorch `padding`). */
  readonly pad?: number;
}

/**
 * The building blocks of the Med3D graph, generic in the activation type T and the parameter handle P, so
 * one graph definition serves tfjs eval (T = Tensor5D, P = Tensor) and the training engine of
 * med3d-train-ops.ts (T = its activations, P = parameter names it resolves and records gradients for).
 */
export interface Med3dGraphOps<T, P> {
  /** NDHWC shape of an activation. */
  shape(x: T): readonly number[];
  /** PyTorch Conv3d without bias: x NDHWC, w [k,k,k,in,out]. */
  conv3d(x: T, w: P, opts: Med3dConvOptions): T;
  /** PyTorch ConvTranspose3d with kernel 2, stride 2, padding 0, plus bias: w [2,2,2,out,in], b [out]. */
  convTranspose2x(x: T, w: P, b: P): T;
  /**
   * A norm layer (shared/model/layers/) over the channel axis, followed by a ReLU when `relu` (fused where the ops can);
   * `param` gives its tensors, `groups` is layer.groups() for x's channels.
   */
  norm(x: T, layer: NormLayer, param: (s: NormParamSuffix) => P, groups: number | undefined, relu: boolean): T;
  relu(x: T): T;
  /** Concatenation along the channel axis (a's channels first); spatial sizes must agree. */
  concat(a: T, b: T): T;
  /** MaxPool3d kernel 3, stride 2, padding 1 (padding never wins). */
  maxPool(x: T): T;
  /** Shortcut A: x[:, ::s, ::s, ::s, :] with zero channels appended up to `outChannels`. */
  shortcutA(x: T, outChannels: number, stride: number): T;
  add(a: T, b: T): T;
  /** Optional fusion of relu(add(a, b)); the graph uses it when present. */
  addRelu?(a: T, b: T): T;
  /** Classification head: global average pool over D, H, W, dropout (training only), dense → [N, classes]. */
  classifier(x: T, w: P, b: P, dropout: number): T;
}

/** The tfjs instance of the graph ops (eval everywhere; tests swap single ops). */
export interface Med3dOps extends Med3dGraphOps<Tensor5D, Tensor> {
  readonly tf: Tf;
}

export function createMed3dEvalOps(tf: Tf): Med3dOps {
  return {
    tf,
    shape: (x) => x.shape,
    conv3d(x, w, { stride = 1, dilation = 1, pad = 0 }) {
      const xp = pad > 0 ? tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [pad, pad], [0, 0]]) : x;
      // tfjs accepts dilation > 1 only with stride 1, which always holds in Med3D (dilated stages have stride 1).
      return tf.conv3d(xp, w as Tensor5D, stride, 'valid', 'NDHWC', dilation);
    },
    convTranspose2x(x, w, b) {
      const [n, d, h, wd] = x.shape;
      const outC = w.shape[3] as number;
      if (w.rank !== 5 || w.shape[0] !== 2 || w.shape[1] !== 2 || w.shape[2] !== 2 || w.shape[4] !== x.shape[4]) {
        throw new Error(`med3d: ConvTranspose3d weight [${w.shape.join(',')}] does not fit input [${x.shape.join(',')}] (expected [2,2,2,out,${x.shape[4]}])`);
      }
      const y = tf.conv3dTranspose(x, w as Tensor5D, [n, 2 * d, 2 * h, 2 * wd, outC], 2, 'valid');
      return tf.add(y, b) as Tensor5D;
    },
    norm: (x, layer, param, groups, relu) => layer.evalTfjs(tf, x, param, groups, relu),
    concat(a, b) {
      if (a.shape.slice(0, 4).some((v, i) => v !== b.shape[i])) throw new Error(`med3d: cannot concatenate [${a.shape.join(',')}] and [${b.shape.join(',')}] along channels`);
      return tf.concat([a, b], 4);
    },
    relu: (x) => tf.relu(x),
    maxPool(x) {
      const xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]], -Infinity);
      return tf.maxPool3d(xp, 3, 2, 'valid');
    },
    shortcutA(x, outChannels, stride) {
      const sub = stride === 1 ? x : tf.avgPool3d(x, 1, stride, 'valid');
      const extra = outChannels - (x.shape[4] as number);
      if (extra < 0) throw new Error(`med3d: shortcut A cannot shrink ${x.shape[4]} channels to ${outChannels}`);
      return extra === 0 ? sub : tf.pad(sub, [[0, 0], [0, 0], [0, 0], [0, 0], [0, extra]]);
    },
    add: (a, b) => tf.add(a, b),
    classifier(x, w, b) {
      // Eval: no dropout. Returned as a rank-5 stand-in type; callers of the classification head read [N, classes].
      const pooled = tf.mean(x, [1, 2, 3]) as TfModule.Tensor2D;
      return tf.add(tf.matMul(pooled, w as TfModule.Tensor2D), b) as unknown as Tensor5D;
    },
  };
}

type Params<P> = ReadonlyMap<string, P>;

function getter<P>(p: Params<P>): (name: string) => P {
  return (name) => {
    const t = p.get(name);
    if (t === undefined) throw new Error(`med3d forward: missing parameter ${name}`);
    return t;
  };
}

/** The architecture's norm layer `prefix` on x (BatchNorm, or group/instance norm), followed by a ReLU when `relu`. */
function norm<T, P>(arch: Med3dArchitecture, ops: Med3dGraphOps<T, P>, get: (n: string) => P, x: T, prefix: string, relu: boolean): T {
  const shape = ops.shape(x);
  const groups = med3dNormGroups(arch.config, shape[shape.length - 1]);
  return ops.norm(x, normLayer(arch.config.norm), (s) => get(`${prefix}.${s}`), groups, relu);
}

function block<T, P>(arch: Med3dArchitecture, b: Med3dBlock, x: T, get: (n: string) => P, ops: Med3dGraphOps<T, P>): T {
  const bn = (t: T, name: string) => norm(arch, ops, get, t, `${b.prefix}.${name}`, false);
  const bnR = (t: T, name: string) => norm(arch, ops, get, t, `${b.prefix}.${name}`, true);
  const d = b.dilation;
  let out: T;
  if (arch.config.block === 'basic') {
    out = bnR(ops.conv3d(x, get(`${b.prefix}.conv1.weight`), { stride: b.stride, dilation: d, pad: d }), 'bn1');
    out = bn(ops.conv3d(out, get(`${b.prefix}.conv2.weight`), { dilation: d, pad: d }), 'bn2');
  } else {
    out = bnR(ops.conv3d(x, get(`${b.prefix}.conv1.weight`), {}), 'bn1');
    out = bnR(ops.conv3d(out, get(`${b.prefix}.conv2.weight`), { stride: b.stride, dilation: d, pad: d }), 'bn2');
    out = bn(ops.conv3d(out, get(`${b.prefix}.conv3.weight`), {}), 'bn3');
  }
  let residual = x;
  if (b.downsample === 'A') residual = ops.shortcutA(x, b.outChannels, b.stride);
  else if (b.downsample === 'B') {
    const proj = ops.conv3d(x, get(`${b.prefix}.downsample.0.weight`), { stride: b.stride });
    residual = norm(arch, ops, get, proj, `${b.prefix}.downsample.1`, false);
  }
  return ops.addRelu ? ops.addRelu(out, residual) : ops.relu(ops.add(out, residual));
}

/** What the U-Net head reads besides the layer4 features: the input and the encoder's higher-resolution outputs. */
export interface Med3dSkips<T> {
  /** The image, NDHWC with the input channels (full resolution). */
  readonly input: T;
  /** conv1 + bn1 + ReLU, before the max-pool (½ resolution, P channels). */
  readonly stem: T;
  /** layer1's output (¼ resolution, P·e channels). */
  readonly layer1: T;
}

export interface Med3dEncoderOutput<T> {
  /** layer4 features NDHWC [N, D′, H′, W′, 8P·e]. */
  readonly features: T;
  readonly skips: Med3dSkips<T>;
}

/** Encoder graph with its skips: NDHWC image (C = the architecture's input channels) → layer4 features and the U-Net head's skips. */
export function med3dEncoderFeatures<T, P>(arch: Med3dArchitecture, params: Params<P>, x: T, ops: Med3dGraphOps<T, P>): Med3dEncoderOutput<T> {
  const shape = ops.shape(x);
  const C = arch.config.inChannels;
  if (shape.length !== 5 || shape[4] !== C) throw new Error(`med3d: input must be NDHWC with ${C === 1 ? 'one channel' : `${C} channels`}, got [${shape.join(',')}]`);
  const get = getter(params);
  const stem = norm(arch, ops, get, ops.conv3d(x, get('encoder.conv1.weight'), { stride: 2, pad: 3 }), 'encoder.bn1', true);
  let y = ops.maxPool(stem);
  let layer1 = y;
  for (const b of arch.config.blocks) {
    y = block(arch, b, y, get, ops);
    if (b.stage === 'layer1') layer1 = y;
  }
  return { features: y, skips: { input: x, stem, layer1 } };
}

/** Encoder graph: NDHWC image (C input channels) → layer4 features NDHWC. No tidy: call inside tf.tidy or a gradient scope. */
export function med3dEncoderForward<T, P>(arch: Med3dArchitecture, params: Params<P>, x: T, ops: Med3dGraphOps<T, P>): T {
  return med3dEncoderFeatures(arch, params, x, ops).features;
}

export interface HeadForwardOptions<T = unknown> {
  /** Apply the classification head's dropout (training only). */
  readonly dropout?: boolean;
  /** The encoder's skips (med3dEncoderFeatures); required by the U-Net head. */
  readonly skips?: Med3dSkips<T>;
}

/**
 * Head graph: layer4 features → segmentation logits NDHWC (2× the feature size; the U-Net head: the input size)
 * or class logits [N, classes].
 */
export function med3dHeadForward<T, P>(arch: Med3dArchitecture, params: Params<P>, feats: T, ops: Med3dGraphOps<T, P>, opts: HeadForwardOptions<T> = {}): T {
  const get = getter(params);
  const h = arch.config.head;
  if (h.kind === 'segmentation') {
    let y = ops.convTranspose2x(feats, get('head.conv_seg.0.weight'), get('head.conv_seg.0.bias'));
    y = norm(arch, ops, get, y, 'head.conv_seg.1', true);
    y = ops.conv3d(y, get('head.conv_seg.3.weight'), { pad: 1 });
    y = norm(arch, ops, get, y, 'head.conv_seg.4', true);
    return ops.conv3d(y, get('head.conv_seg.6.weight'), {});
  }
  if (h.kind === 'unet') {
    if (!opts.skips) throw new Error('med3d: the U-Net head needs the encoder skips (use med3dEncoderFeatures or med3dForward)');
    return unetHeadForward(arch, get, feats, opts.skips, ops);
  }
  return ops.classifier(feats, get('head.fc.weight'), get('head.fc.bias'), opts.dropout ? h.dropout : 0);
}

/** up(x) concatenated with the skip; the skip must be exactly twice x's size (input sides multiples of 8). */
function upAndConcat<T, P>(ops: Med3dGraphOps<T, P>, get: (n: string) => P, x: T, skip: T, name: string, skipName: string): T {
  const up = ops.convTranspose2x(x, get(`${name}.weight`), get(`${name}.bias`));
  const [su, ss] = [ops.shape(up), ops.shape(skip)];
  if (su[1] !== ss[1] || su[2] !== ss[2] || su[3] !== ss[3]) {
    throw new Error(
      `med3d U-Net head: ${name} gives ${su.slice(1, 4).join('×')} but the ${skipName} skip is ${ss.slice(1, 4).join('×')}; the input sides must be multiples of 8 (pad the volume)`,
    );
  }
  return ops.concat(up, skip);
}

function unetHeadForward<T, P>(arch: Med3dArchitecture, get: (n: string) => P, feats: T, skips: Med3dSkips<T>, ops: Med3dGraphOps<T, P>): T {
  const d = 'head.dec';
  let y = upAndConcat(ops, get, feats, skips.layer1, `${d}.up3`, 'layer1');
  y = norm(arch, ops, get, ops.conv3d(y, get(`${d}.conv3.weight`), { pad: 1 }), `${d}.norm3`, true);
  y = upAndConcat(ops, get, y, skips.stem, `${d}.up2`, 'stem');
  y = norm(arch, ops, get, ops.conv3d(y, get(`${d}.conv2.weight`), { pad: 1 }), `${d}.norm2`, true);
  const full = norm(arch, ops, get, ops.conv3d(skips.input, get(`${d}.in_conv.weight`), { pad: 1 }), `${d}.in_norm`, true);
  y = upAndConcat(ops, get, y, full, `${d}.up1`, 'input');
  y = norm(arch, ops, get, ops.conv3d(y, get(`${d}.conv1.weight`), {}), `${d}.norm1`, true);
  return ops.conv3d(y, get(`${d}.cls.weight`), {});
}

/** Encoder and head in one: logits of a voxel head or class logits. */
export function med3dForward<T, P>(arch: Med3dArchitecture, params: Params<P>, x: T, ops: Med3dGraphOps<T, P>, opts: HeadForwardOptions<T> = {}): T {
  const enc = med3dEncoderFeatures(arch, params, x, ops);
  return med3dHeadForward(arch, params, enc.features, ops, { ...opts, skips: enc.skips });
}

function checkWeights(arch: Med3dArchitecture, weights: TensorBundle, withHead: boolean): void {
  const specs = arch.params().filter((p) => withHead || p.part === 'encoder');
  // A head in the bundle is ignored when only embedding; anything else must match exactly, so that e.g. a
  // shortcut-B checkpoint never runs as an A model with its projection weights silently unused.
  const used = new Map([...weights].filter(([n]) => withHead || !n.startsWith('head.')));
  const problem = checkAgainstSpecs(used, specs);
  if (problem) throw new Error(`weights do not match ${describeMed3d(arch)}: ${problem}`);
}

function toTensors(tf: Tf, arch: Med3dArchitecture, weights: TensorBundle, withHead: boolean): Map<string, Tensor> {
  const m = new Map<string, Tensor>();
  for (const p of arch.params()) {
    if (!withHead && p.part !== 'encoder') continue;
    // Copy: the caller's Float32Arrays must never become backend storage.
    m.set(p.name, tf.tensor(new Float32Array(weights.get(p.name)!.data), [...p.shape]));
  }
  return m;
}

/**
 * Eval-mode encoder: NDHWC input (C input channels) → layer4 features NDHWC [N, D′, H′, W′, 8P·e]. Only the encoder
 * tensors of `weights` are used. The caller owns (and disposes) the result.
 */
export function med3dEmbed(tf: Tf, arch: Med3dArchitecture, weights: TensorBundle, input: Tensor5D, ops: Med3dOps = createMed3dEvalOps(tf)): Tensor5D {
  checkWeights(arch, weights, false);
  const params = toTensors(tf, arch, weights, false);
  try {
    return tf.tidy(() => med3dEncoderForward(arch, params, input, ops));
  } finally {
    for (const t of params.values()) t.dispose();
  }
}

/** Eval-mode encoder + head: segmentation logits NDHWC [N, 2D′, 2H′, 2W′, classes] (U-Net: [N, D, H, W, classes]) or class logits [N, classes]. */
export function med3dPredict(tf: Tf, arch: Med3dArchitecture, weights: TensorBundle, input: Tensor5D, ops: Med3dOps = createMed3dEvalOps(tf)): Tensor {
  checkWeights(arch, weights, true);
  const params = toTensors(tf, arch, weights, true);
  try {
    return tf.tidy(() => med3dForward(arch, params, input, ops));
  } finally {
    for (const t of params.values()) t.dispose();
  }
}
