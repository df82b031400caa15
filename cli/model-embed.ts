/**
 * `medfl model embed --model FILE.safetensors --input VOLUME --out FEATURES.npy [--arch resnet10 --shortcut A|B --width 0.125]`
 *
 * Runs the Med3D encoder (eval mode) on one volume and writes the layer4 features as float32 .npy,
 * N×D′×H′×W′×C channels-last (D′ = ⌈⌈⌈D/2⌉/2⌉/2⌉, C = 512·expansion·width).
 *
 * Model file: safetensors with either
 *   - MedFL names and layouts ("encoder.conv1.weight" [7,7,7,1,64], …), as MedFL writes model files, or
 *   - a PyTorch/MedicalNet state_dict (keys "conv1.weight" [64,1,7,7,7], …; "module." prefixes allowed),
 *     converted on load (see med3dFromTorch).
 * Only encoder tensors are used; a head in the file is ignored. The architecture comes from, in order of
 * precedence: the flags, the file's __metadata__ (`architecture: "med3d"`, `med3d: {"depth":…,"shortcut":…,
 * "widthMultiplier":…,"head":…}`, see med3dMetadata), and finally the tensors themselves (block counts,
 * projection weights, conv1 width; see inferMed3dOptions). Any tensor that does not fit is an error.
 *
 * Input: .nii / .nii.gz (one 3-D volume, shape [Z,Y,X] = [D,H,W], intensities used as stored: normalise
 * beforehand as the model was trained), or .npy float32 D×H×W or N×D×H×W×C. A model with C input channels
 * (plan model.inputChannels, e.g. FLAIR, T1w, T1gd, T2w) takes C NIfTI files, one per channel in the model's
 * channel order (as the MSD files _0000…_000{C-1}), all on one grid, or one .npy with C channels last.
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { selectEngine } from '../shared/engine/select.ts';
import { readNpy, writeNpy } from '../shared/io/npy.ts';
import {
  createMed3d,
  describeMed3d,
  inferMed3dOptions,
  med3dFromTorch,
  med3dOptionsFromMetadata,
  med3dSpecFromTorch,
  MED3D_DEPTHS,
  type Med3dDepth,
  type Med3dOptions,
  type Med3dShortcut,
} from '../shared/model/med3d.ts';
import { med3dEmbed } from '../shared/model/med3d-forward.ts';
import type { TensorBundle } from '../shared/tensors/bundle.ts';
import { decodeSafetensors } from '../shared/tensors/safetensors.ts';
import { readNifti } from '../site-agent/data/nifti.ts';

export interface EmbedOptions {
  readonly model: string;
  /** One volume, or one NIfTI per input channel (channel order). */
  readonly input: string | readonly string[];
  readonly out: string;
  /** "resnet10", "resnet50", "r18", "34", … (overrides the file). */
  readonly arch?: string;
  readonly shortcut?: string;
  /** Width multiplier, e.g. 0.125 (overrides the file). */
  readonly width?: number | string;
  /** Compute engine: auto (default), cpu, tfjs-node, tfjs-node-gpu (as MEDFL_ENGINE). */
  readonly engine?: string;
  /** Progress lines for people (default: none). */
  readonly log?: (line: string) => void;
}

export interface EmbedResult {
  readonly architecture: string;
  readonly engine: string;
  readonly inputShape: readonly number[];
  readonly outputShape: readonly number[];
  readonly seconds: number;
}

export class EmbedError extends Error {
  override name = 'EmbedError';
}

export function parseDepth(arch: string): Med3dDepth {
  const m = /^(?:med3d-?|medicalnet-?)?(?:resnet|r)?-?(\d+)$/i.exec(arch.trim());
  const d = m ? Number(m[1]) : NaN;
  if (!MED3D_DEPTHS.includes(d as Med3dDepth)) throw new EmbedError(`--arch "${arch}": expected resnet10, resnet18, resnet34, resnet50 or resnet101`);
  return d as Med3dDepth;
}

/** Encoder weights of a model file in MedFL layout plus the architecture options it implies. */
function readModel(buf: Uint8Array, file: string): { layout: 'medfl' | 'pytorch'; found: Partial<Med3dOptions>; convert: (arch: ReturnType<typeof createMed3d>) => TensorBundle } {
  let decoded;
  try {
    decoded = decodeSafetensors(buf);
  } catch (e) {
    throw new EmbedError(`${file}: ${(e as Error).message}`);
  }
  const { bundle, metadata } = decoded;
  const names = [...bundle.keys()];
  const medfl = names.filter((n) => n.startsWith('encoder.') || n.startsWith('head.')).length;
  if (medfl > 0 && medfl !== names.length) throw new EmbedError(`${file}: mixes MedFL names (encoder.*, head.*) with other tensor names`);
  const layout = medfl > 0 ? 'medfl' : 'pytorch';
  const specs = layout === 'medfl' ? [...bundle.values()] : [...bundle.values()].flatMap((t) => med3dSpecFromTorch(t) ?? []);
  let fromMeta: Partial<Med3dOptions> | undefined;
  try {
    fromMeta = med3dOptionsFromMetadata(metadata);
  } catch (e) {
    throw new EmbedError(`${file}: ${(e as Error).message}`);
  }
  const found = { ...inferMed3dOptions(specs), ...(fromMeta ?? {}) };
  return {
    layout,
    found,
    convert: (arch) => {
      if (layout === 'medfl') return bundle;
      return med3dFromTorch(arch, bundle.values(), { encoderOnly: true });
    },
  };
}

type Volume = { shape: [number, number, number, number, number]; data: Float32Array };

/** The input as N×D×H×W×C: one file, or one NIfTI per channel interleaved channels last. */
async function readInput(paths: readonly string[]): Promise<Volume> {
  if (paths.length === 0) throw new EmbedError('--input: no volume given');
  if (paths.length === 1) return readVolume(paths[0]);
  const channels: Volume[] = [];
  for (const p of paths) {
    if (p.toLowerCase().endsWith('.npy')) throw new EmbedError(`${basename(p)}: several inputs are one NIfTI per channel; give a multi-channel .npy (N×D×H×W×C) on its own`);
    channels.push(await readVolume(p));
  }
  const s0 = channels[0].shape;
  const other = channels.findIndex((v) => v.shape.some((d, a) => d !== s0[a]));
  if (other >= 0) throw new EmbedError(`${basename(paths[other])}: ${channels[other].shape.slice(1, 4).join('×')} voxels where ${basename(paths[0])} has ${s0.slice(1, 4).join('×')}: the channels of one scan must share one grid`);
  const C = channels.length;
  const n = channels[0].data.length;
  const data = new Float32Array(n * C);
  for (let c = 0; c < C; c++) for (let v = 0; v < n; v++) data[v * C + c] = channels[c].data[v];
  return { shape: [s0[0], s0[1], s0[2], s0[3], C], data };
}

async function readVolume(path: string): Promise<Volume> {
  const lower = path.toLowerCase();
  if (lower.endsWith('.npy')) {
    const a = await readNpy(path);
    if (a.shape.length === 3) return { shape: [1, a.shape[0], a.shape[1], a.shape[2], 1], data: a.data };
    if (a.shape.length === 5) return { shape: a.shape as [number, number, number, number, number], data: a.data };
    throw new EmbedError(`${basename(path)}: .npy shape (${a.shape.join(', ')}) is not D×H×W or N×D×H×W×C (channels last)`);
  }
  if (lower.endsWith('.nii') || lower.endsWith('.nii.gz')) {
    const v = await readNifti(path);
    // NIfTI x-fastest [X,Y,Z] is MedFL's [D,H,W] = [Z,Y,X] in the same memory order.
    return { shape: [1, v.dims[2], v.dims[1], v.dims[0], 1], data: v.data };
  }
  throw new EmbedError(`${basename(path)}: input must be .nii, .nii.gz or .npy`);
}

export async function runEmbed(opts: EmbedOptions): Promise<EmbedResult> {
  const log = opts.log ?? (() => {});
  const t0 = performance.now();
  let modelBytes: Buffer;
  try {
    modelBytes = await readFile(opts.model);
  } catch (e) {
    throw new EmbedError(`${opts.model}: cannot read model file (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const model = readModel(modelBytes, basename(opts.model));

  const flags: { -readonly [K in keyof Med3dOptions]?: Med3dOptions[K] } = {};
  if (opts.arch !== undefined) flags.depth = parseDepth(opts.arch);
  if (opts.shortcut !== undefined) {
    const s = opts.shortcut.toUpperCase();
    if (s !== 'A' && s !== 'B') throw new EmbedError(`--shortcut "${opts.shortcut}": expected A or B`);
    flags.shortcut = s as Med3dShortcut;
  }
  if (opts.width !== undefined) {
    const w = Number(opts.width);
    if (!(w > 0)) throw new EmbedError(`--width "${opts.width}": expected a positive number such as 1, 0.25 or 0.125`);
    flags.widthMultiplier = w;
  }
  const o = { ...model.found, ...flags };
  if (o.depth === undefined) throw new EmbedError(`${basename(opts.model)}: cannot tell the ResNet depth from the file; pass --arch resnet10|18|34|50|101`);
  if (o.shortcut === undefined) throw new EmbedError(`${basename(opts.model)}: cannot tell the shortcut type from the file; pass --shortcut A|B`);

  const vol = await readInput(typeof opts.input === 'string' ? [opts.input] : opts.input);
  const [, D, H, W, C] = vol.shape;
  const modelChannels = o.inChannels ?? 1;
  if (C !== modelChannels) {
    throw new EmbedError(
      `the input has ${C} channel(s) but the model takes ${modelChannels}: give ${modelChannels === 1 ? 'one volume' : `${modelChannels} NIfTI files (one per channel, in the model's order) or a .npy with ${modelChannels} channels last`}`,
    );
  }
  let arch;
  try {
    // The head is not used for embedding; keep the file's when it has one (so its tensors are recognised).
    arch = createMed3d({
      depth: o.depth,
      shortcut: o.shortcut,
      widthMultiplier: o.widthMultiplier,
      head: o.head ?? { kind: 'segmentation', numClasses: 2 },
      patch: [D, H, W],
      norm: o.norm,
      normGroups: o.normGroups,
      inChannels: modelChannels,
    });
  } catch (e) {
    throw new EmbedError((e as Error).message);
  }
  let weights: TensorBundle;
  try {
    weights = model.convert(arch);
  } catch (e) {
    throw new EmbedError(`${basename(opts.model)}: ${(e as Error).message}`);
  }
  log(`model     ${describeMed3d(arch)} (${model.layout} layout)`);

  const engine = await selectEngine({ force: opts.engine });
  const tf = engine.tf;
  log(`engine    ${engine.name}`);
  log(`input     ${vol.shape.join('×')} (N×D×H×W×C)`);
  const x = tf.tensor(vol.data, vol.shape) as TfModule.Tensor5D;
  let feats: TfModule.Tensor5D;
  try {
    feats = med3dEmbed(tf, arch, weights, x);
  } catch (e) {
    throw new EmbedError((e as Error).message);
  } finally {
    x.dispose();
  }
  const outShape = [...feats.shape];
  const data = new Float32Array(feats.dataSync() as Float32Array);
  feats.dispose();
  writeNpy(opts.out, { shape: outShape, data });
  const seconds = (performance.now() - t0) / 1000;
  log(`features  ${outShape.join('×')} (N×D′×H′×W′×C) → ${opts.out} in ${seconds.toFixed(1)} s`);
  return { architecture: describeMed3d(arch), engine: engine.name, inputShape: vol.shape, outputShape: outShape, seconds };
}
