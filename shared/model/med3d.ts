/**
 * Med3D / MedicalNet 3D ResNet encoder (Chen, Ma, Zheng 2019; Tencent/MedicalNet models/resnet.py) with
 * MedicalNet's segmentation head `conv_seg`, or a classification head. Parameter table, deterministic
 * init and PyTorch <-> MedFL conversion only (no tfjs import); the forward pass is in med3d-forward.ts.
 *
 * Layout (exactly MedicalNet's models/resnet.py, as docs/transfer-init.md describes):
 *   conv1   Conv3d C→P, 7³, stride 2, padding 3, no bias; BN; ReLU        (P = base planes, 64 at full width;
 *           C = input channels, 1 as MedicalNet, more for multi-modal scans: one per MSD _000k file)
 *   maxpool 3³, stride 2, padding 1
 *   layer1  P planes,  stride 1, dilation 1
 *   layer2  2P planes, stride 2, dilation 1
 *   layer3  4P planes, stride 1, dilation 2
 *   layer4  8P planes, stride 1, dilation 4      → features with 8P·e channels at ⅛ of the input size
 *   BasicBlock (e = 1) for depth 10/18/34, Bottleneck (e = 4, stride on the 3³ conv) for 50/101;
 *   every 3³ conv has padding = dilation. The first block of a stage gets a shortcut projection when
 *   stride ≠ 1 or in-channels ≠ planes·e: type A = 1³ average pool with the stride + zero channels
 *   appended (no parameters), type B = Conv3d 1³ (no bias, with the stride) + BN.
 *   Segmentation head conv_seg (nn.Sequential indices): 0 ConvTranspose3d(8P·e → Ch, k 2, s 2, bias),
 *   1 BN, 2 ReLU, 3 Conv3d(Ch → Ch, 3³, pad 1, no bias), 4 BN, 5 ReLU, 6 Conv3d(Ch → classes, 1³, no bias)
 *   → logits at ¼ of the input size (2× the layer4 size).
 *   Classification head (not in MedicalNet): global average pool → dropout → dense (with bias).
 *   U-Net head (not in MedicalNet; a light decoder for small lesions, Ch channels throughout, "head.dec."):
 *   up3 ConvTranspose3d(8P·e → Ch, k 2, s 2, bias) on layer4 (⅛ → ¼), concat layer1 → conv3 3³ + norm3 + ReLU;
 *   up2 (Ch → Ch) (→ ½), concat the stem (conv1+bn1+ReLU) → conv2 3³ + norm2 + ReLU; up1 (Ch → Ch) (→ full),
 *   concat in_conv 3³ (C → Ch) + in_norm + ReLU of the input → conv1 1³ (2Ch → Ch) + norm1 + ReLU → cls 1³
 *   (Ch → classes) → logits at the FULL input size (input sides must be multiples of 8). The full-resolution
 *   fusion is 1³: a 3³ conv over 2Ch channels there would cost more than a ¼-width encoder.
 *
 * Norm layers: BatchNorm3d (MedicalNet's), or GroupNorm with `normGroups` groups, or InstanceNorm (GroupNorm
 * with one channel per group, affine). Group/instance norm keep the BN layer names for γ (".weight") and β
 * (".bias") — a BatchNorm checkpoint transfers by name — and have no running statistics.
 *
 * Width: base planes P = max(1, round(64·widthMultiplier)) and stage planes P, 2P, 4P, 8P (for multipliers
 * where 64·m is an integer — 1, 0.5, 0.25, 0.125, 0.0625, … — this is round(planes·m) per stage, and the
 * width can always be read back from conv1). Head channels Ch default to max(1, round(32·widthMultiplier))
 * (32 at full width, as MedicalNet; U-Net head max(8, round(32·widthMultiplier))) and can be set with head.channels.
 *
 * Names: "encoder." + PyTorch state_dict key for the encoder (encoder.conv1.weight, encoder.bn1.running_mean,
 * encoder.layer2.0.downsample.0.weight, …), "head." + key for the head (head.conv_seg.0.weight, head.fc.weight).
 * No num_batches_tracked. Layouts are tfjs's: conv [kD,kH,kW,in,out]; ConvTranspose3d for tf.conv3dTranspose
 * [kD,kH,kW,out,in]; BN vectors [C]; dense [in,out]. PyTorch → MedFL is the permutation (2,3,4,1,0) for both
 * conv kinds and a transpose for dense (see med3dFromTorch).
 *
 * Init (deterministic in the seed, one mulberry32 stream in parameter order, as MedicalNet's init):
 * Conv3d Kaiming-normal fan_out (std = √(2 / (out·k³))); BN γ = 1, β = 0, running mean 0, var 1;
 * ConvTranspose3d and dense keep PyTorch's defaults, which MedicalNet does not override: uniform
 * ±1/√fan_in for weight and bias, fan_in = out·k³ for ConvTranspose3d (PyTorch reads dim 1 of its
 * [in,out,k,k,k] weight) and in-features for dense (nn.Linear).
 */
import { elementCount, makeBundle, type NamedTensor, type TensorBundle } from '../tensors/bundle.ts';
import { gaussian, mulberry32 } from '../util/random.ts';
import type { LayerType, ModelArchitecture, ModelPart, ParamInfo } from './types.ts';
import type { InferenceSettings } from './sliding-window.ts';
import { mapStateDict, medicalNetIsConvTranspose, medicalNetRename, permute, torchToTfjsPermutation } from '../checkpoints/torch-mapping.ts';
import { contiguousStrides, type TorchTensor as CheckpointTensor } from '../checkpoints/pth.ts';
import { NORM_EPS } from './layers/norm-layer.ts';
import { NORM_KINDS, normLayer, type NormKind } from './layers/norm-layers.ts';

export const MED3D_ID = 'med3d';

export type Med3dDepth = 10 | 18 | 34 | 50 | 101;
export type Med3dShortcut = 'A' | 'B';
export const MED3D_DEPTHS: readonly Med3dDepth[] = [10, 18, 34, 50, 101];

export type Med3dHeadOptions =
  | { readonly kind: 'segmentation'; readonly numClasses: number; /** default max(1, round(32·widthMultiplier)) */ readonly channels?: number }
  | { readonly kind: 'unet'; readonly numClasses: number; /** default max(8, round(32·widthMultiplier)) */ readonly channels?: number }
  | { readonly kind: 'classification'; readonly numClasses: number; /** dropout before the dense layer in training (default 0) */ readonly dropout?: number };

/** Normalisation layers (shared/model/layers/norm-layers.ts): BatchNorm (MedicalNet's), GroupNorm, or InstanceNorm. */
export type Med3dNorm = NormKind;
export const MED3D_NORMS: readonly Med3dNorm[] = NORM_KINDS;
/** Default GroupNorm group count (Wu & He's 32 is too many for ¼-width layers of 16 channels). */
export const MED3D_DEFAULT_NORM_GROUPS = 8;

export interface Med3dOptions {
  readonly depth: Med3dDepth;
  /** Shortcut type of the projection blocks (MedicalNet's releases: R10 B, R18 A, R34 A, R50/101 B). */
  readonly shortcut: Med3dShortcut;
  /** Scales every width: 1 = MedicalNet (64 base planes), 0.25 → 16, 0.125 → 8 (default 1). */
  readonly widthMultiplier?: number;
  readonly head: Med3dHeadOptions;
  /** Training patch [D, H, W]. The forward pass accepts any input size; see med3dFeatureShape. */
  readonly patch: readonly [number, number, number];
  /** Norm layers of the encoder and the head (default 'batch'). */
  readonly norm?: Med3dNorm;
  /** Groups of 'group' norm (default 8); must divide every normalised channel count. */
  readonly normGroups?: number;
  /** How evaluation and predictions score a whole volume (the plan's model.inference); absent = whole volume. */
  readonly inference?: InferenceSettings;
  /** Input channels C (imaging modalities, the MSD _0000…_000N files; default 1 as MedicalNet). */
  readonly inChannels?: number;
}

export type Med3dHead =
  | { readonly kind: 'segmentation'; readonly numClasses: number; readonly channels: number }
  | { readonly kind: 'unet'; readonly numClasses: number; readonly channels: number }
  | { readonly kind: 'classification'; readonly numClasses: number; readonly dropout: number };

export interface Med3dBlock {
  /** Name prefix, e.g. "encoder.layer2.0". */
  readonly prefix: string;
  /** "layer1".."layer4". */
  readonly stage: string;
  readonly inChannels: number;
  readonly planes: number;
  readonly outChannels: number;
  readonly stride: number;
  readonly dilation: number;
  /** Shortcut of this block: identity, or a projection of type A (no parameters) or B. */
  readonly downsample: 'none' | 'A' | 'B';
}

/** Everything the forward pass needs, resolved from the options. */
export interface Med3dConfig {
  readonly depth: Med3dDepth;
  readonly shortcut: Med3dShortcut;
  readonly widthMultiplier: number;
  readonly block: 'basic' | 'bottleneck';
  readonly expansion: 1 | 4;
  readonly basePlanes: number;
  readonly blocksPerStage: readonly [number, number, number, number];
  readonly blocks: readonly Med3dBlock[];
  /** Channels of the layer4 output (8·basePlanes·expansion). */
  readonly featureChannels: number;
  readonly head: Med3dHead;
  readonly patch: readonly [number, number, number];
  readonly norm: Med3dNorm;
  /** Groups of 'group' norm (kept for the metadata even when another norm is used). */
  readonly normGroups: number;
  /** Input channels: conv1 (and the U-Net head's in_conv) take C channels. */
  readonly inChannels: number;
}

export interface Med3dArchitecture extends ModelArchitecture {
  readonly config: Med3dConfig;
  /** Not part of the parameters: how the trainer scores whole volumes (sliding-window.ts). */
  readonly inference?: InferenceSettings;
}

const STAGE_BLOCKS: Record<Med3dDepth, readonly [number, number, number, number]> = {
  10: [1, 1, 1, 1],
  18: [2, 2, 2, 2],
  34: [3, 4, 6, 3],
  50: [3, 4, 6, 3],
  101: [3, 4, 23, 3],
};
const STAGE_STRIDES = [1, 2, 1, 1] as const;
const STAGE_DILATIONS = [1, 1, 2, 4] as const;
/** Most input channels a plan may ask for (MSD tasks have at most 4; a bound keeps a typo from allocating a huge conv1). */
export const MED3D_MAX_IN_CHANNELS = 64;
/** PyTorch BatchNorm eps (MedicalNet keeps the default). */
export const MED3D_BN_EPS = NORM_EPS;

/** A group count that does not divide a norm layer's channels (plan validation reports it at the edge). */
export class Med3dNormError extends Error {
  override name = 'Med3dNormError';
}

/** Groups of a norm layer with `channels` channels; undefined for BatchNorm. */
export function med3dNormGroups(config: Pick<Med3dConfig, 'norm' | 'normGroups'>, channels: number): number | undefined {
  return normLayer(config.norm).groups(channels, config.normGroups);
}

export function resolveMed3dConfig(opts: Med3dOptions): Med3dConfig {
  const depth = opts.depth;
  if (!MED3D_DEPTHS.includes(depth)) throw new Error(`med3d: depth must be one of ${MED3D_DEPTHS.join(', ')}, got ${String(depth)}`);
  if (opts.shortcut !== 'A' && opts.shortcut !== 'B') throw new Error(`med3d: shortcut must be "A" or "B", got ${String(opts.shortcut)}`);
  const wm = opts.widthMultiplier ?? 1;
  if (!(typeof wm === 'number' && Number.isFinite(wm) && wm > 0 && wm <= 16)) throw new Error(`med3d: widthMultiplier must be a number in (0, 16], got ${String(wm)}`);
  const patch = [...opts.patch] as [number, number, number];
  if (patch.length !== 3 || patch.some((d) => !Number.isInteger(d) || d < 1)) {
    throw new Error(`med3d: patch must be three positive integers, got [${opts.patch.join(', ')}]`);
  }
  const h = opts.head;
  if (!h || (h.kind !== 'segmentation' && h.kind !== 'unet' && h.kind !== 'classification')) throw new Error('med3d: head.kind must be "segmentation", "unet" or "classification"');
  const norm = opts.norm ?? 'batch';
  if (!MED3D_NORMS.includes(norm)) throw new Error(`med3d: norm must be one of ${MED3D_NORMS.join(', ')}, got ${String(norm)}`);
  const normGroups = opts.normGroups ?? MED3D_DEFAULT_NORM_GROUPS;
  const inChannels = opts.inChannels ?? 1;
  if (!Number.isInteger(inChannels) || inChannels < 1 || inChannels > MED3D_MAX_IN_CHANNELS) {
    throw new Error(`med3d: inChannels must be an integer in 1..${MED3D_MAX_IN_CHANNELS}, got ${String(inChannels)}`);
  }
  if (!Number.isInteger(normGroups) || normGroups < 1) throw new Error(`med3d: normGroups must be a positive integer, got ${String(normGroups)}`);
  if (!Number.isInteger(h.numClasses) || h.numClasses < 1 || h.numClasses > 65535) {
    throw new Error(`med3d: head.numClasses must be a positive integer, got ${String(h.numClasses)}`);
  }
  let head: Med3dHead;
  if (h.kind === 'segmentation') {
    if (h.numClasses < 2 || h.numClasses > 255) throw new Error(`med3d: segmentation numClasses must be in 2..255, got ${h.numClasses}`);
    const channels = h.channels ?? Math.max(1, Math.round(32 * wm));
    if (!Number.isInteger(channels) || channels < 1) throw new Error(`med3d: head.channels must be a positive integer, got ${String(channels)}`);
    head = { kind: 'segmentation', numClasses: h.numClasses, channels };
  } else if (h.kind === 'unet') {
    // One output channel is the restoration decoder of self-supervised pretraining (linear output, no softmax).
    if (h.numClasses > 255) throw new Error(`med3d: unet numClasses must be in 1..255, got ${h.numClasses}`);
    const channels = h.channels ?? Math.max(8, Math.round(32 * wm));
    if (!Number.isInteger(channels) || channels < 1) throw new Error(`med3d: head.channels must be a positive integer, got ${String(channels)}`);
    head = { kind: 'unet', numClasses: h.numClasses, channels };
  } else {
    const dropout = h.dropout ?? 0;
    if (!(dropout >= 0 && dropout < 1)) throw new Error(`med3d: head.dropout must be in [0, 1), got ${String(dropout)}`);
    head = { kind: 'classification', numClasses: h.numClasses, dropout };
  }

  const bottleneck = depth >= 50;
  const expansion = bottleneck ? 4 : 1;
  const base = Math.max(1, Math.round(64 * wm));
  const counts = STAGE_BLOCKS[depth];
  const blocks: Med3dBlock[] = [];
  let inplanes = base;
  for (let s = 0; s < 4; s++) {
    const planes = base << s;
    const out = planes * expansion;
    for (let b = 0; b < counts[s]; b++) {
      const first = b === 0;
      const stride = first ? STAGE_STRIDES[s] : 1;
      const project = first && (stride !== 1 || inplanes !== out);
      blocks.push({
        prefix: `encoder.layer${s + 1}.${b}`,
        stage: `layer${s + 1}`,
        inChannels: inplanes,
        planes,
        outChannels: out,
        stride,
        dilation: STAGE_DILATIONS[s],
        downsample: project ? opts.shortcut : 'none',
      });
      inplanes = out;
    }
  }
  const config: Med3dConfig = {
    depth,
    shortcut: opts.shortcut,
    widthMultiplier: wm,
    block: bottleneck ? 'bottleneck' : 'basic',
    expansion,
    basePlanes: base,
    blocksPerStage: counts,
    blocks,
    featureChannels: inplanes,
    head,
    patch,
    norm,
    normGroups,
    inChannels,
  };
  if (norm === 'group') {
    const bad = normLayers(config).filter((l) => l.channels % normGroups !== 0);
    if (bad.length > 0) {
      const list = bad.slice(0, 3).map((l) => `${l.name} (${l.channels})`).join(', ');
      throw new Med3dNormError(
        `med3d: normGroups ${normGroups} does not divide the channels of ${bad.length} norm layer${bad.length > 1 ? 's' : ''}: ${list}${bad.length > 3 ? ', …' : ''}; ` +
          'choose a group count that divides every width (e.g. a power of two not above the smallest width), or norm: instance',
      );
    }
  }
  return config;
}

/** Every norm layer of the architecture with its channel count, in parameter order. */
export function normLayers(cfg: Med3dConfig): { name: string; channels: number }[] {
  return buildParams(cfg)
    .filter((p) => p.layerType === 'norm' && p.name.endsWith('.weight'))
    .map((p) => ({ name: p.name.slice(0, -'.weight'.length), channels: p.shape[0] }));
}

/** The message of a group count that does not divide some norm layer of these options, if any (other problems are left to createMed3d). */
export function med3dNormProblem(opts: Med3dOptions): string | undefined {
  try {
    resolveMed3dConfig(opts);
    return undefined;
  } catch (e) {
    return e instanceof Med3dNormError ? e.message : undefined;
  }
}

/** Spatial size after a conv/pool with kernel k, stride s, symmetric padding p, dilation d (PyTorch formula). */
function convOut(size: number, k: number, s: number, p: number, d = 1): number {
  return Math.floor((size + 2 * p - d * (k - 1) - 1) / s) + 1;
}

/** Layer4 output [D', H', W', C] for an input of spatial size [D, H, W] (⌈⌈⌈D/2⌉/2⌉/2⌉ per axis). */
export function med3dFeatureShape(config: Med3dConfig, input: readonly [number, number, number]): [number, number, number, number] {
  const sp = input.map((v) => convOut(convOut(convOut(v, 7, 2, 3), 3, 2, 1), 3, 2, 1)) as [number, number, number];
  return [...sp, config.featureChannels];
}

/**
 * Head output: [2D', 2H', 2W', classes] for segmentation (¼ of the input when it divides by 8), [D, H, W, classes]
 * for the U-Net head (the input size itself), [classes] for classification.
 */
export function med3dOutputShape(config: Med3dConfig, input: readonly [number, number, number]): number[] {
  const [d, h, w] = med3dFeatureShape(config, input);
  if (config.head.kind === 'unet') return [...input, config.head.numClasses];
  return config.head.kind === 'segmentation' ? [2 * d, 2 * h, 2 * w, config.head.numClasses] : [config.head.numClasses];
}

/** Output grid of a voxel head relative to the input: 4 for MedicalNet's ¼ head, 1 for the U-Net head. */
export function med3dOutputFactor(head: Med3dHead): number {
  if (head.kind === 'classification') throw new Error('med3d: the classification head has no voxel output');
  return head.kind === 'unet' ? 1 : 4;
}

type InitKind =
  | { kind: 'kaiming'; fanOut: number }
  | { kind: 'uniform'; bound: number }
  | { kind: 'const'; value: number };

interface ParamDef extends ParamInfo {
  readonly init: InitKind;
}

function buildParams(cfg: Med3dConfig): ParamDef[] {
  const defs: ParamDef[] = [];
  const add = (name: string, shape: number[], part: ModelPart, layerType: LayerType, stage: string, trainable: boolean, init: InitKind) =>
    defs.push({ name, shape, dtype: 'F32', part, layerType, stage, trainable, init });
  const conv = (name: string, k: number, cin: number, cout: number, part: ModelPart, stage: string) =>
    add(`${name}.weight`, [k, k, k, cin, cout], part, 'conv', stage, true, { kind: 'kaiming', fanOut: cout * k * k * k });
  // The norm layer's own tensors (BatchNorm: γ, β and running statistics; group/instance norm: γ, β).
  const normSpecs = normLayer(cfg.norm).params;
  const bn = (name: string, c: number, part: ModelPart, stage: string) => {
    for (const p of normSpecs) add(`${name}.${p.suffix}`, [c], part, 'norm', stage, p.trainable, { kind: 'const', value: p.init });
  };
  const convTranspose = (name: string, cin: number, cout: number) => {
    const bound = 1 / Math.sqrt(cout * 8); // PyTorch's fan_in for a ConvTranspose3d weight [in, out, 2, 2, 2] is out·k³
    add(`${name}.weight`, [2, 2, 2, cout, cin], 'head', 'conv', 'head', true, { kind: 'uniform', bound });
    add(`${name}.bias`, [cout], 'head', 'conv', 'head', true, { kind: 'uniform', bound });
  };

  conv('encoder.conv1', 7, cfg.inChannels, cfg.basePlanes, 'encoder', 'stem');
  bn('encoder.bn1', cfg.basePlanes, 'encoder', 'stem');
  for (const b of cfg.blocks) {
    const e = 'encoder';
    if (cfg.block === 'basic') {
      conv(`${b.prefix}.conv1`, 3, b.inChannels, b.planes, e, b.stage);
      bn(`${b.prefix}.bn1`, b.planes, e, b.stage);
      conv(`${b.prefix}.conv2`, 3, b.planes, b.planes, e, b.stage);
      bn(`${b.prefix}.bn2`, b.planes, e, b.stage);
    } else {
      conv(`${b.prefix}.conv1`, 1, b.inChannels, b.planes, e, b.stage);
      bn(`${b.prefix}.bn1`, b.planes, e, b.stage);
      conv(`${b.prefix}.conv2`, 3, b.planes, b.planes, e, b.stage);
      bn(`${b.prefix}.bn2`, b.planes, e, b.stage);
      conv(`${b.prefix}.conv3`, 1, b.planes, b.outChannels, e, b.stage);
      bn(`${b.prefix}.bn3`, b.outChannels, e, b.stage);
    }
    if (b.downsample === 'B') {
      conv(`${b.prefix}.downsample.0`, 1, b.inChannels, b.outChannels, e, b.stage);
      bn(`${b.prefix}.downsample.1`, b.outChannels, e, b.stage);
    }
  }

  const h = cfg.head;
  if (h.kind === 'segmentation') {
    const ch = h.channels;
    convTranspose('head.conv_seg.0', cfg.featureChannels, ch);
    bn('head.conv_seg.1', ch, 'head', 'head');
    conv('head.conv_seg.3', 3, ch, ch, 'head', 'head');
    bn('head.conv_seg.4', ch, 'head', 'head');
    conv('head.conv_seg.6', 1, ch, h.numClasses, 'head', 'head');
  } else if (h.kind === 'unet') {
    const ch = h.channels;
    const d = 'head.dec';
    convTranspose(`${d}.up3`, cfg.featureChannels, ch);
    conv(`${d}.conv3`, 3, ch + cfg.basePlanes * cfg.expansion, ch, 'head', 'head');
    bn(`${d}.norm3`, ch, 'head', 'head');
    convTranspose(`${d}.up2`, ch, ch);
    conv(`${d}.conv2`, 3, ch + cfg.basePlanes, ch, 'head', 'head');
    bn(`${d}.norm2`, ch, 'head', 'head');
    convTranspose(`${d}.up1`, ch, ch);
    conv(`${d}.in_conv`, 3, cfg.inChannels, ch, 'head', 'head');
    bn(`${d}.in_norm`, ch, 'head', 'head');
    conv(`${d}.conv1`, 1, 2 * ch, ch, 'head', 'head');
    bn(`${d}.norm1`, ch, 'head', 'head');
    conv(`${d}.cls`, 1, ch, h.numClasses, 'head', 'head');
  } else {
    const bound = 1 / Math.sqrt(cfg.featureChannels);
    add('head.fc.weight', [cfg.featureChannels, h.numClasses], 'head', 'dense', 'head', true, { kind: 'uniform', bound });
    add('head.fc.bias', [h.numClasses], 'head', 'dense', 'head', true, { kind: 'uniform', bound });
  }
  return defs;
}

export function createMed3d(opts: Med3dOptions): Med3dArchitecture {
  const config = resolveMed3dConfig(opts);
  const defs = buildParams(config);
  const params: readonly ParamInfo[] = Object.freeze(
    defs.map(({ name, shape, dtype, part, layerType, stage, trainable }) => Object.freeze({ name, shape: Object.freeze([...shape]), dtype, part, layerType, stage, trainable })),
  );
  return {
    id: MED3D_ID,
    numClasses: config.head.numClasses,
    patchShape: config.patch,
    config,
    ...(opts.inference ? { inference: opts.inference } : {}),
    params: () => params,
    init(seed: number): TensorBundle {
      const rng = mulberry32(seed);
      const tensors: NamedTensor[] = [];
      for (const d of defs) {
        const data = new Float32Array(elementCount(d.shape));
        const init = d.init;
        if (init.kind === 'kaiming') {
          const std = Math.sqrt(2 / init.fanOut);
          for (let i = 0; i < data.length; i++) data[i] = gaussian(rng) * std;
        } else if (init.kind === 'uniform') {
          for (let i = 0; i < data.length; i++) data[i] = (2 * rng() - 1) * init.bound;
        } else if (init.value !== 0) {
          data.fill(init.value);
        }
        tensors.push({ name: d.name, dtype: 'F32', shape: [...d.shape], data });
      }
      return makeBundle(tensors);
    },
  };
}

/** Parameters of the encoder only (what med3dEmbed needs). */
export function med3dEncoderParams(arch: ModelArchitecture): ParamInfo[] {
  return arch.params().filter((p) => p.part === 'encoder');
}

/** Counts comparable with MedicalNet's published sizes (their "params" are PyTorch model.parameters(), its "entries" state_dict keys). */
export function med3dCounts(arch: ModelArchitecture, part?: ModelPart): { trainable: number; all: number; entries: number; torchEntries: number } {
  const ps = arch.params().filter((p) => part === undefined || p.part === part);
  let trainable = 0;
  let all = 0;
  for (const p of ps) {
    const n = elementCount(p.shape);
    all += n;
    if (p.trainable) trainable += n;
  }
  const bnLayers = ps.filter((p) => p.name.endsWith('.running_mean')).length;
  return { trainable, all, entries: ps.length, torchEntries: ps.length + bnLayers };
}

// -------------------------------------------------------------------------------------------------
// PyTorch state_dict <-> MedFL names and layouts

/** A named tensor in PyTorch names and layouts (as read from a state_dict saved as safetensors). */
export interface TorchTensor {
  readonly name: string;
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** PyTorch key (DataParallel "module." prefix allowed) → MedFL name; undefined for num_batches_tracked. */
export function med3dNameFromTorch(key: string): string | undefined {
  return medicalNetRename(key.startsWith('module.') ? key.slice('module.'.length) : key);
}

/** MedFL name → PyTorch key (without "module."). */
export function med3dNameToTorch(name: string): string {
  if (name.startsWith('encoder.')) return name.slice('encoder.'.length);
  if (name.startsWith('head.')) return name.slice('head.'.length);
  throw new Error(`med3d: "${name}" is not a Med3D parameter name (expected encoder.* or head.*)`);
}

export { permute };

const CONV_FROM_TF = [4, 3, 0, 1, 2] as const;

export interface FromTorchOptions {
  /** Convert only the encoder and ignore head keys (default false: every key must match the architecture). */
  readonly encoderOnly?: boolean;
}

/**
 * PyTorch state_dict tensors (MedicalNet names and layouts, "module." and num_batches_tracked allowed) →
 * a MedFL bundle for `arch`, through the checkpoint mapping (shared/checkpoints/torch-mapping.ts): one
 * error lists every missing, unexpected and mis-shaped key (MedicalNet's own loader silently skips them).
 */
export function med3dFromTorch(arch: ModelArchitecture, tensors: Iterable<TorchTensor>, opts: FromTorchOptions = {}): TensorBundle {
  const byKey = new Map<string, CheckpointTensor>();
  for (const t of tensors) {
    if (elementCount(t.shape) !== t.data.length) throw new Error(`med3d: "${t.name}" has shape [${t.shape.join(',')}] but ${t.data.length} values`);
    byKey.set(t.name, { dtype: 'float32', shape: t.shape, strides: contiguousStrides(t.shape), data: t.data });
  }
  const expected = arch.params().filter((p) => !opts.encoderOnly || p.part === 'encoder');
  return mapStateDict(byKey, expected, {
    rename: (key) => {
      const name = med3dNameFromTorch(key);
      return opts.encoderOnly && name?.startsWith('head.') ? undefined : name;
    },
    convTranspose: medicalNetIsConvTranspose,
  });
}


/** A MedFL bundle → PyTorch state_dict tensors (keys without "module.", no num_batches_tracked). */
export function med3dToTorch(bundle: TensorBundle): TorchTensor[] {
  return [...bundle.values()].map((t) => {
    let conv: { shape: readonly number[]; data: Float32Array } = { shape: t.shape, data: new Float32Array(t.data) };
    if (t.shape.length === 5) conv = permute(t.data, t.shape, CONV_FROM_TF);
    else if (t.shape.length === 2) conv = permute(t.data, t.shape, [1, 0]);
    return { name: med3dNameToTorch(t.name), shape: [...conv.shape], data: conv.data };
  });
}

export function describeMed3d(arch: ModelArchitecture): string {
  const c = (arch as Partial<Med3dArchitecture>).config;
  if (!c) return arch.id;
  const head =
    c.head.kind === 'classification' ? `classification head ${c.head.numClasses} classes` : `${c.head.kind === 'unet' ? 'U-Net' : 'seg'} head ${c.head.numClasses} classes/${c.head.channels} ch`;
  const norm = c.norm === 'batch' ? '' : c.norm === 'group' ? `, GroupNorm ${c.normGroups}` : ', InstanceNorm';
  const input = c.inChannels === 1 ? '' : `, ${c.inChannels} input channels`;
  return `Med3D ResNet-${c.depth}-${c.shortcut} ×${c.widthMultiplier} (${c.basePlanes} base planes${norm}${input}, ${head})`;
}

// -------------------------------------------------------------------------------------------------
// Architecture in model files

/**
 * safetensors __metadata__ for a Med3D model file: `architecture: "med3d"` and `med3d:` JSON of
 * {depth, shortcut, widthMultiplier, head, patch, norm, normGroups[, inChannels]}; `format: "medfl"` (MedFL names and layouts) unless
 * the file holds a PyTorch state_dict (`format: "pytorch-state-dict"`, as scripts/make_med3d_fixtures.py writes).
 */
export function med3dMetadata(arch: Med3dArchitecture, format: 'medfl' | 'pytorch-state-dict' = 'medfl'): Record<string, string> {
  const c = arch.config;
  return {
    format,
    architecture: MED3D_ID,
    // inChannels only when it is not 1: one-channel model files stay byte for byte what they were.
    med3d: JSON.stringify({
      depth: c.depth,
      shortcut: c.shortcut,
      widthMultiplier: c.widthMultiplier,
      head: c.head,
      patch: c.patch,
      norm: c.norm,
      normGroups: c.normGroups,
      ...(c.inChannels !== 1 ? { inChannels: c.inChannels } : {}),
    }),
  };
}

/** Options recorded in a file's metadata (any subset), or undefined when it names no Med3D architecture. */
export function med3dOptionsFromMetadata(meta: Readonly<Record<string, string>>): Partial<Med3dOptions> | undefined {
  if (meta.architecture !== undefined && meta.architecture !== MED3D_ID) {
    throw new Error(`model file is for architecture "${meta.architecture}", not ${MED3D_ID}`);
  }
  if (meta.med3d === undefined) return undefined;
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(meta.med3d) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`model file metadata "med3d" is not JSON: ${(e as Error).message}`);
  }
  const out: { -readonly [K in keyof Med3dOptions]?: Med3dOptions[K] } = {};
  if (raw.depth !== undefined) out.depth = Number(raw.depth) as Med3dDepth;
  if (raw.shortcut !== undefined) out.shortcut = String(raw.shortcut) as Med3dShortcut;
  if (raw.widthMultiplier !== undefined) out.widthMultiplier = Number(raw.widthMultiplier);
  if (raw.head && typeof raw.head === 'object') out.head = raw.head as Med3dHeadOptions;
  if (Array.isArray(raw.patch) && raw.patch.length === 3) out.patch = raw.patch.map(Number) as [number, number, number];
  if (raw.norm !== undefined) out.norm = String(raw.norm) as Med3dNorm;
  if (raw.normGroups !== undefined) out.normGroups = Number(raw.normGroups);
  if (raw.inChannels !== undefined) out.inChannels = Number(raw.inChannels);
  return out;
}

/**
 * The architecture read off the tensors themselves (MedFL names, tfjs layouts): depth from the blocks per
 * stage and the block type, shortcut from layer2's projection, width from conv1, head from its tensors.
 */
export function inferMed3dOptions(specs: Iterable<{ readonly name: string; readonly shape: readonly number[] }>): Partial<Med3dOptions> {
  const shapes = new Map<string, readonly number[]>();
  for (const s of specs) shapes.set(s.name, s.shape);
  const out: { -readonly [K in keyof Med3dOptions]?: Med3dOptions[K] } = {};
  const c1 = shapes.get('encoder.conv1.weight');
  if (c1 && c1.length === 5) {
    out.widthMultiplier = c1[4] / 64;
    if (c1[3] !== 1) out.inChannels = c1[3];
  }
  const counts = [1, 2, 3, 4].map((s) => {
    let n = 0;
    while (shapes.has(`encoder.layer${s}.${n}.conv1.weight`)) n++;
    return n;
  });
  const bottleneck = shapes.has('encoder.layer1.0.conv3.weight');
  for (const d of MED3D_DEPTHS) {
    if ((d >= 50) === bottleneck && STAGE_BLOCKS[d].every((n, i) => n === counts[i])) out.depth = d;
  }
  if (counts[1] > 0) out.shortcut = shapes.has('encoder.layer2.0.downsample.0.weight') ? 'B' : 'A';
  // No norm here: tensors without running statistics may be group or instance norm (and any group count);
  // only the metadata says which, and a wrong guess would normalise silently differently.
  const seg = shapes.get('head.conv_seg.6.weight');
  const unet = shapes.get('head.dec.cls.weight');
  const fc = shapes.get('head.fc.weight');
  if (seg && seg.length === 5) out.head = { kind: 'segmentation', numClasses: seg[4], channels: seg[3] };
  else if (unet && unet.length === 5) out.head = { kind: 'unet', numClasses: unet[4], channels: unet[3] };
  else if (fc && fc.length === 2) out.head = { kind: 'classification', numClasses: fc[1] };
  return out;
}

/** Name and shape a PyTorch tensor will have in MedFL (undefined for num_batches_tracked); for inference before conversion. */
export function med3dSpecFromTorch(t: { readonly name: string; readonly shape: readonly number[] }): { name: string; shape: number[] } | undefined {
  const name = med3dNameFromTorch(t.name);
  if (name === undefined) return undefined;
  return { name, shape: torchToTfjsPermutation(t.shape.length).map((p) => t.shape[p]) };
}
