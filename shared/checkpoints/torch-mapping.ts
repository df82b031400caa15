/**
 * Maps a PyTorch state dict (from pth.ts) onto MedFL's parameter list, converting layouts:
 *
 * | PyTorch                                   | MedFL / tfjs                                  | permutation |
 * |-------------------------------------------|-----------------------------------------------|-------------|
 * | Conv3d weight [out, in, kD, kH, kW]       | tf.conv3d filter [kD, kH, kW, in, out]        | (2,3,4,1,0) |
 * | ConvTranspose3d weight [in, out, kD,kH,kW]| tf.conv3dTranspose filter [kD,kH,kW, out, in] | (2,3,4,1,0) |
 * | Conv2d / Conv1d weights (rank 4 / 3)      | [kH,kW,in,out] / [k,in,out]                   | (2,…,1,0)   |
 * | Linear weight [out, in]                   | [in, out]                                     | (1,0)       |
 * | biases, BatchNorm vectors [C], 0-d        | unchanged                                     | —           |
 *
 * (both conv kinds use the same permutation, because tfjs names the transposed
 * filter [.., outC, inC] while PyTorch stores it [inC, outC, ..].)
 *
 * Unlike MedicalNet's own loader, which keeps only keys that already exist in the model (so a
 * prefix mismatch silently loads nothing), this throws ONE CheckpointMappingError listing every
 * problem: missing, unexpected, ambiguous, mis-shaped, non-floating and non-finite tensors.
 */
import { type NamedTensor, type TensorBundle, elementCount, makeBundle } from '../tensors/bundle.ts';
import type { ParamInfo } from '../model/types.ts';
import { isFloatingDType, tensorToFloat32, type TorchTensor } from './pth.ts';

export interface MapStateDictOptions {
  /** MedFL name for a PyTorch key, or undefined to ignore the key (e.g. num_batches_tracked). */
  readonly rename: (torchKey: string) => string | undefined;
  /** Whether a (MedFL-named) weight is a transposed convolution; only changes how it is described. */
  readonly convTranspose?: (ourName: string) => boolean;
}

export type MappingProblemKind = 'missing' | 'unexpected' | 'ambiguous' | 'mis-shaped' | 'dtype' | 'non-finite';

export interface MappingProblem {
  readonly kind: MappingProblemKind;
  /** MedFL parameter name (for 'unexpected': the name the key was renamed to). */
  readonly name: string;
  /** PyTorch key(s) involved, when any. */
  readonly torchKeys: readonly string[];
  readonly detail: string;
}

export class CheckpointMappingError extends Error {
  override name = 'CheckpointMappingError';
  constructor(
    readonly problems: readonly MappingProblem[],
    readonly hints: readonly string[],
  ) {
    super(formatProblems(problems, hints));
  }
  of(kind: MappingProblemKind): MappingProblem[] {
    return this.problems.filter((p) => p.kind === kind);
  }
}

const HEADINGS: Record<MappingProblemKind, string> = {
  missing: 'missing: the model needs these, the checkpoint does not have them',
  unexpected: 'unexpected: the checkpoint has these, the model has no such parameter',
  ambiguous: 'ambiguous: several checkpoint keys map to one parameter',
  'mis-shaped': 'mis-shaped',
  dtype: 'not floating point',
  'non-finite': 'non-finite values (NaN/Inf, after conversion to float32)',
};

function formatProblems(problems: readonly MappingProblem[], hints: readonly string[]): string {
  const lines = [`checkpoint does not match the model: ${problems.length} problem${problems.length === 1 ? '' : 's'}`];
  for (const kind of Object.keys(HEADINGS) as MappingProblemKind[]) {
    const ps = problems.filter((p) => p.kind === kind);
    if (ps.length === 0) continue;
    lines.push(`  ${HEADINGS[kind]} (${ps.length}):`);
    for (const p of ps) lines.push(`    - ${p.detail}`);
  }
  for (const h of hints) lines.push(`  hint: ${h}`);
  return lines.join('\n');
}

const fmt = (s: readonly number[]) => `[${s.join(',')}]`;

/** The permutation taking a PyTorch weight of this rank to MedFL/tfjs layout (identity for rank ≤ 1). */
export function torchToTfjsPermutation(rank: number): number[] {
  if (rank <= 1) return rank === 1 ? [0] : [];
  if (rank === 2) return [1, 0];
  const p: number[] = [];
  for (let i = 2; i < rank; i++) p.push(i);
  p.push(1, 0);
  return p;
}

/** out[i0,…] = data[…] with out axis k = input axis perm[k] (numpy.transpose semantics), C order. */
export function permute(data: Float32Array, shape: readonly number[], perm: readonly number[]): { data: Float32Array; shape: number[] } {
  const rank = shape.length;
  if (perm.length !== rank || [...perm].sort((a, b) => a - b).some((v, i) => v !== i)) throw new Error(`bad permutation (${perm.join(',')}) for rank ${rank}`);
  const outShape = perm.map((a) => shape[a]);
  if (perm.every((a, i) => a === i) || rank <= 1) return { data, shape: outShape };
  const inStrides = new Array<number>(rank);
  let acc = 1;
  for (let i = rank - 1; i >= 0; i--) {
    inStrides[i] = acc;
    acc *= shape[i];
  }
  const srcStride = perm.map((a) => inStrides[a]); // stride in the input for each output axis
  const out = new Float32Array(data.length);
  if (data.length === 0) return { data: out, shape: outShape };
  const idx = new Array<number>(rank).fill(0);
  const last = rank - 1;
  const n = outShape[last];
  const s = srcStride[last];
  let o = 0;
  for (;;) {
    let base = 0;
    for (let i = 0; i < last; i++) base += idx[i] * srcStride[i];
    for (let j = 0; j < n; j++) out[o++] = data[base + j * s];
    let d = last - 1;
    while (d >= 0) {
      if (++idx[d] < outShape[d]) break;
      idx[d] = 0;
      d--;
    }
    if (d < 0) break;
  }
  return { data: out, shape: outShape };
}

function layoutName(rank: number, transposed: boolean): string {
  if (rank === 5) return transposed ? 'ConvTranspose3d [in,out,kD,kH,kW]' : 'Conv3d [out,in,kD,kH,kW]';
  if (rank === 4) return transposed ? 'ConvTranspose2d [in,out,kH,kW]' : 'Conv2d [out,in,kH,kW]';
  if (rank === 3) return transposed ? 'ConvTranspose1d [in,out,k]' : 'Conv1d [out,in,k]';
  if (rank === 2) return 'Linear [out,in]';
  return rank === 1 ? 'vector' : 'scalar';
}

/**
 * Converts `torch` to a bundle holding exactly the `expected` parameters, or throws one
 * CheckpointMappingError listing every problem found.
 */
export function mapStateDict(torch: ReadonlyMap<string, TorchTensor>, expected: readonly ParamInfo[], opts: MapStateDictOptions): TensorBundle {
  const problems: MappingProblem[] = [];
  const byName = new Map(expected.map((p) => [p.name, p]));
  // Group checkpoint keys by target name so ambiguity is seen before anything is converted.
  const sources = new Map<string, string[]>();
  const ignored: string[] = [];
  for (const key of torch.keys()) {
    const name = opts.rename(key);
    if (name === undefined) {
      ignored.push(key);
      continue;
    }
    const list = sources.get(name);
    if (list) list.push(key);
    else sources.set(name, [key]);
  }
  const out: NamedTensor[] = [];
  for (const [name, keys] of sources) {
    const spec = byName.get(name);
    if (!spec) {
      for (const k of keys) {
        const t = torch.get(k)!;
        problems.push({ kind: 'unexpected', name, torchKeys: [k], detail: `${k === name ? `"${k}"` : `"${k}" (as "${name}")`} ${t.dtype} ${fmt(t.shape)}` });
      }
      continue;
    }
    if (keys.length > 1) {
      problems.push({ kind: 'ambiguous', name, torchKeys: keys, detail: `"${name}" ← ${keys.map((k) => `"${k}"`).join(', ')}` });
      continue;
    }
    const key = keys[0];
    const t = torch.get(key)!;
    const from = key === name ? `"${name}"` : `"${name}" (checkpoint "${key}")`;
    const transposed = opts.convTranspose?.(name) ?? false;
    const perm = torchToTfjsPermutation(t.shape.length);
    const converted = perm.map((a) => t.shape[a]);
    if (converted.length !== spec.shape.length || converted.some((d, i) => d !== spec.shape[i])) {
      // Describe the model's expectation in PyTorch layout too, when the ranks agree.
      let asTorch = '';
      if (spec.shape.length === t.shape.length && t.shape.length >= 2) {
        const inv = new Array<number>(perm.length);
        perm.forEach((a, k) => (inv[a] = spec.shape[k]));
        asTorch = ` (= PyTorch ${fmt(inv)})`;
      }
      problems.push({
        kind: 'mis-shaped',
        name,
        torchKeys: [key],
        detail: `${from}: checkpoint ${fmt(t.shape)} ${layoutName(t.shape.length, transposed)}${t.shape.length >= 2 ? ` → ${fmt(converted)}` : ''}, model expects ${fmt(spec.shape)}${asTorch}`,
      });
      continue;
    }
    if (!isFloatingDType(t.dtype)) {
      problems.push({ kind: 'dtype', name, torchKeys: [key], detail: `${from}: ${t.dtype} tensor for a float32 parameter` });
      continue;
    }
    const values = tensorToFloat32(t);
    let bad = 0;
    let first = -1;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v - v !== 0) {
        if (bad++ === 0) first = i;
      }
    }
    if (bad > 0) {
      const v = values[first];
      const sourceNote = t.dtype === 'float32' ? '' : ` (${t.dtype} in the file; values beyond float32 range become Inf)`;
      problems.push({
        kind: 'non-finite',
        name,
        torchKeys: [key],
        detail: `${from}: ${bad} of ${values.length} values are NaN/Inf, first ${Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf'} at flat index ${first} (PyTorch order)${sourceNote}`,
      });
      continue;
    }
    // Never alias the reader's arrays: permute returns its input unchanged for rank ≤ 1.
    const mapped = permute(values === t.data ? Float32Array.from(values) : values, t.shape, perm);
    if (elementCount(mapped.shape) !== mapped.data.length) throw new Error(`internal: ${name} permuted to a wrong size`);
    out.push({ name, dtype: 'F32', shape: [...spec.shape], data: mapped.data });
  }
  for (const p of expected) {
    if (!sources.has(p.name)) problems.push({ kind: 'missing', name: p.name, torchKeys: [], detail: `"${p.name}" ${fmt(p.shape)} (${p.layerType}, ${p.part}/${p.stage})` });
  }
  if (problems.length > 0) throw new CheckpointMappingError(problems, hintsFor(problems, torch, sources, expected));
  return makeBundle(out);
}

function hintsFor(problems: readonly MappingProblem[], torch: ReadonlyMap<string, TorchTensor>, sources: ReadonlyMap<string, string[]>, expected: readonly ParamInfo[]): string[] {
  const hints: string[] = [];
  const missing = problems.filter((p) => p.kind === 'missing');
  const unexpected = problems.filter((p) => p.kind === 'unexpected');
  const matched = [...sources.keys()].filter((n) => expected.some((p) => p.name === n)).length;
  if (matched === 0 && torch.size > 0 && expected.length > 0) {
    const k = [...torch.keys()][0];
    hints.push(`no checkpoint key matched any model parameter: the naming differs (checkpoint keys look like "${k}", model names like "${expected[0].name}"); check the prefix`);
  }
  const isDown = (n: string) => /(^|\.)downsample\./.test(n);
  if (missing.length > 0 && missing.every((p) => isDown(p.name)) && !unexpected.some((p) => isDown(p.name))) {
    hints.push('only downsample (shortcut) weights are missing: the checkpoint looks like shortcut type A; build the model with shortcut A');
  }
  if (unexpected.length > 0 && unexpected.every((p) => isDown(p.name)) && !missing.some((p) => isDown(p.name))) {
    hints.push('the extra keys are all downsample (shortcut) weights: the checkpoint looks like shortcut type B; build the model with shortcut B');
  }
  if (problems.some((p) => p.kind === 'mis-shaped') && missing.length === 0 && unexpected.length === 0) {
    hints.push('all names match but some shapes do not: a different depth/width (architecture or width multiplier) or number of classes?');
  }
  const isStat = (n: string) => /\.running_(mean|var)$/.test(n);
  if (unexpected.length > 0 && unexpected.every((p) => isStat(p.name)) && missing.length === 0) {
    hints.push(
      'the extra keys are all BatchNorm running statistics: the checkpoint is a BatchNorm model and the architecture uses group/instance norm; ' +
        'import it with norm batch and start from it with init pretrained (γ and β transfer by name, the statistics are dropped; docs/transfer-init.md)',
    );
  }
  if (missing.length > 0 && missing.every((p) => isStat(p.name)) && unexpected.length === 0) {
    hints.push('only BatchNorm running statistics are missing: the checkpoint comes from a group/instance-norm model; build the model with norm group or instance');
  }
  return hints;
}

// ---------------------------------------------------------------------------------------------
// MedicalNet naming

/**
 * MedicalNet key → MedFL name: `head.` + key for the segmentation head (`conv_seg.*`), a classifier
 * (`fc.*`) and MedFL's U-Net head (`dec.*`, not in MedicalNet: exported by MedFL, so it reads back),
 * `encoder.` + key for everything else; `num_batches_tracked` is dropped.
 * Expects the DataParallel `module.` prefix to be stripped already (pth.ts does when all keys have it).
 */
export function medicalNetRename(key: string): string | undefined {
  if (key === 'num_batches_tracked' || key.endsWith('.num_batches_tracked')) return undefined;
  if (key.startsWith('conv_seg.') || key.startsWith('fc.') || key.startsWith('dec.')) return `head.${key}`;
  return `encoder.${key}`;
}

/** MedicalNet's only transposed convolution is the first layer of the head, conv_seg.0 (§1.2); the U-Net head's are dec.up1..3. */
export function medicalNetIsConvTranspose(name: string): boolean {
  return name === 'head.conv_seg.0.weight' || /^head\.dec\.up\d\.weight$/.test(name);
}

/** mapStateDict with MedicalNet naming. */
export function mapMedicalNet(torch: ReadonlyMap<string, TorchTensor>, expected: readonly ParamInfo[]): TensorBundle {
  return mapStateDict(torch, expected, { rename: medicalNetRename, convTranspose: medicalNetIsConvTranspose });
}
