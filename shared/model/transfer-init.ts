/**
 * Transfer initialisation: how a federation plan's start weights are made, as pure functions on weight
 * bundles (no tfjs). A plan names one strategy with a spec string (see docs/transfer-init.md):
 *
 *   scratch          arch.init(seed): Conv Kaiming-normal fan_out, BN identity (MedicalNet's init, docs/transfer-init.md)
 *   pretrained       every encoder tensor copied from a pretrained 3D bundle; the head from arch.init(seed)
 *   partial:k        Transfusion's hybrid ("weight transfusion", Raghu et al. 2019): the stem and the lowest k
 *                    encoder stages copied (Med3D: stem = conv1+bn1, then layer1..layerk), the rest scratch
 *   mean-var         Transfusion's Mean-Var init (§2): each conv/dense tensor of the encoder drawn i.i.d. from
 *                    N(μ, σ²) with μ, σ of the pretrained tensor; BatchNorm reset to identity; head scratch
 *   inflate-2d:1xk   2D → 3D (Wacker et al., §3): the 2D k×k kernel in the centre depth slice of the 3D kernel,
 *                    zeros elsewhere (= a 1×k×k conv with depth padding): each slice gets the 2D response
 *   inflate-2d:i3d   2D → 3D (I3D, §3): the 2D kernel repeated over the kD depth taps and divided by kD:
 *                    a volume of identical slices gets the 2D response
 *
 * One channel → C channels (pretrained, partial:k, mean-var; adaptInputChannels): a pretrained stem conv with one
 * input channel, where the model takes C (multi-modal scans), is replicated over the C input channels and divided
 * by C — the I3D rule applied to channels instead of depth: C identical channels give exactly the pretrained
 * response, and the kernel's scale per input stays that of a one-channel net fed the channels' mean.
 *
 * Every strategy returns weights for ALL parameters of the architecture plus an InitReport saying which
 * tensors came from the source (copied) and which were made fresh (reinitialised), with details, so the
 * coordinator and sites can log exactly what happened. Tensors "re-initialised as scratch" are always the
 * very tensors `arch.init(seed)` gives (same seed → same values as the scratch strategy).
 *
 * Inputs:
 *   ctx.pretrained  a 3D bundle in MedFL names and layouts (encoder.conv1.weight [kD,kH,kW,in,out], …), e.g.
 *                   med3dFromTorch(arch, tensors, { encoderOnly: true }) of a MedicalNet checkpoint, or a
 *                   MedFL model file. head.* tensors in it are ignored (and listed); every other problem
 *                   (missing, unexpected, mis-shaped, non-finite) is thrown at once as one CheckpointMappingError.
 *   ctx.source2d    a 2D ResNet state_dict in torchvision NAMES and PyTorch LAYOUTS (conv1.weight [64,3,7,7],
 *                   bn1.running_mean, layer1.0.conv1.weight, layer2.0.downsample.0.weight, fc.weight, …), e.g.
 *                   decodeSafetensors(bytes).bundle, or source2dFromTorch(readCheckpoint(bytes).tensors).
 */
import { type NamedTensor, type TensorBundle, elementCount, makeBundle } from '../tensors/bundle.ts';
import { gaussian, mulberry32 } from '../util/random.ts';
import { CheckpointMappingError, type MappingProblem, permute } from '../checkpoints/torch-mapping.ts';
import { isFloatingDType, tensorToFloat32, type TorchTensor } from '../checkpoints/pth.ts';
import type { ModelArchitecture, ParamInfo } from './types.ts';

// -------------------------------------------------------------------------------------------------
// The seam

export interface InitContext {
  /** Seed of every freshly drawn tensor (scratch parts via arch.init(seed); Mean-Var samples). */
  readonly seed: number;
  /** 3D pretrained weights in MedFL names/layouts (pretrained, partial:k, mean-var). */
  readonly pretrained?: TensorBundle;
  /** 2D torchvision-layout ResNet state_dict in PyTorch names/layouts (inflate-2d:*). */
  readonly source2d?: TensorBundle;
}

export interface InitReport {
  /** The canonical spec string of the strategy, e.g. "partial:2". */
  readonly strategy: string;
  /** Parameters whose values come from the source (verbatim, or converted for inflate-2d). */
  readonly copied: readonly string[];
  /** Parameters made fresh; copied ∪ reinitialised = all parameters, disjoint. */
  readonly reinitialised: readonly string[];
  /** Subset of copied converted 2D → 3D (inflate-2d: conv kernels). */
  readonly inflated: readonly string[];
  /** Subset of reinitialised drawn from N(μ, σ²) of the pretrained tensor (mean-var). */
  readonly resampled: readonly string[];
  /** Subset of reinitialised set to the BatchNorm identity γ=1, β=0, mean 0, var 1 (mean-var). */
  readonly reset: readonly string[];
  /** Subset of copied/resampled whose one-channel source kernel was replicated over C input channels and divided by C. */
  readonly adaptedInputs: readonly string[];
  /** Source tensors that were not used (head.* of a pretrained bundle, fc.* of a 2D net, …). */
  readonly ignored: readonly string[];
  /** Encoder stages copied, in order (partial:k; pretrained: all). */
  readonly copiedStages: readonly string[];
  /** Mean-Var: μ and σ of each pretrained tensor that was resampled. */
  readonly sourceStats: Readonly<Record<string, { readonly mean: number; readonly std: number }>>;
  /** Human-readable remarks worth logging (geometry differences, RGB → grey, …). */
  readonly notes: readonly string[];
}

export interface InitResult {
  /** Weights for every parameter of the architecture (encoder and head). */
  readonly weights: TensorBundle;
  readonly report: InitReport;
}

export interface InitStrategy {
  /** Canonical spec string, e.g. "scratch", "partial:2", "inflate-2d:i3d". */
  readonly name: string;
  /** What the strategy reads besides the seed. */
  readonly needs: 'nothing' | 'pretrained' | 'source2d';
  init(arch: ModelArchitecture, ctx: InitContext): InitResult;
}

export type InitSpec =
  | { readonly kind: 'scratch' }
  | { readonly kind: 'pretrained' }
  | { readonly kind: 'partial'; readonly stages: number }
  | { readonly kind: 'mean-var' }
  | { readonly kind: 'inflate-2d'; readonly mode: '1xk' | 'i3d' };

/** The accepted spec strings, for help texts and plan validation messages. */
export const INIT_SPEC_FORMS = ['scratch', 'pretrained', 'partial:<k>', 'mean-var', 'inflate-2d:1xk', 'inflate-2d:i3d'] as const;

export class InitSpecError extends Error {
  override name = 'InitSpecError';
}

/** Parses a plan's init string (surrounding whitespace ignored, otherwise exact and case-sensitive). */
export function parseInitSpec(spec: string): InitSpec {
  const s = String(spec).trim();
  if (s === 'scratch') return { kind: 'scratch' };
  if (s === 'pretrained') return { kind: 'pretrained' };
  if (s === 'mean-var') return { kind: 'mean-var' };
  if (s === 'inflate-2d:1xk') return { kind: 'inflate-2d', mode: '1xk' };
  if (s === 'inflate-2d:i3d') return { kind: 'inflate-2d', mode: 'i3d' };
  const m = /^partial:(\d{1,3})$/.exec(s);
  if (m) return { kind: 'partial', stages: Number(m[1]) };
  if (s.startsWith('partial')) throw new InitSpecError(`init "${s}": partial needs a stage count, e.g. "partial:2" (stem + layer1..layer2)`);
  if (s.startsWith('inflate-2d')) throw new InitSpecError(`init "${s}": inflate-2d needs a mode: "inflate-2d:1xk" (Wacker et al.) or "inflate-2d:i3d" (I3D)`);
  throw new InitSpecError(`unknown init "${s}": expected one of ${INIT_SPEC_FORMS.join(', ')}`);
}

export function formatInitSpec(spec: InitSpec): string {
  switch (spec.kind) {
    case 'partial':
      return `partial:${spec.stages}`;
    case 'inflate-2d':
      return `inflate-2d:${spec.mode}`;
    default:
      return spec.kind;
  }
}

export function isInitSpec(spec: string): boolean {
  try {
    parseInitSpec(spec);
    return true;
  } catch {
    return false;
  }
}

export function initStrategyFromSpec(spec: string | InitSpec): InitStrategy {
  const p = typeof spec === 'string' ? parseInitSpec(spec) : spec;
  const name = formatInitSpec(p);
  switch (p.kind) {
    case 'scratch':
      return { name, needs: 'nothing', init: (arch, ctx) => initScratch(arch, ctx) };
    case 'pretrained':
      return { name, needs: 'pretrained', init: (arch, ctx) => initPartial(arch, ctx, undefined, name) };
    case 'partial':
      return { name, needs: 'pretrained', init: (arch, ctx) => initPartial(arch, ctx, p.stages, name) };
    case 'mean-var':
      return { name, needs: 'pretrained', init: (arch, ctx) => initMeanVar(arch, ctx, name) };
    case 'inflate-2d':
      return { name, needs: 'source2d', init: (arch, ctx) => initInflate2d(arch, ctx, p.mode, name) };
  }
}

/** One line for logs: "partial:2: 30 copied (stem, layer1, layer2), 42 reinitialised, 0 ignored". */
export function summarizeInitReport(r: InitReport): string {
  const parts = [`${r.copied.length} copied${r.copiedStages.length > 0 ? ` (${r.copiedStages.join(', ')})` : ''}`];
  if (r.inflated.length > 0) parts.push(`${r.inflated.length} of them inflated 2D→3D`);
  parts.push(`${r.reinitialised.length} reinitialised`);
  if (r.resampled.length > 0) parts.push(`${r.resampled.length} of them Mean-Var resampled, ${r.reset.length} BN reset`);
  if (r.ignored.length > 0) parts.push(`${r.ignored.length} source tensors ignored`);
  return `${r.strategy}: ${parts.join(', ')}`;
}

// -------------------------------------------------------------------------------------------------
// Helpers

/** Distinct encoder stages in parameter order (Med3D: stem, layer1, layer2, layer3, layer4). */
export function encoderStages(arch: ModelArchitecture): string[] {
  const out: string[] = [];
  for (const p of arch.params()) if (p.part === 'encoder' && !out.includes(p.stage)) out.push(p.stage);
  return out;
}

/**
 * The stages partial:k copies: the stem (a stage named "stem", when the encoder has one) plus the first k
 * other encoder stages in parameter order. Throws when k exceeds the number of non-stem stages.
 */
export function partialStages(arch: ModelArchitecture, k: number): string[] {
  const stages = encoderStages(arch);
  const hasStem = stages[0] === 'stem';
  const rest = hasStem ? stages.slice(1) : stages;
  if (!Number.isInteger(k) || k < 0 || k > rest.length) {
    throw new InitSpecError(`init "partial:${k}": ${arch.id} has ${rest.length} encoder stages after the stem (${rest.join(', ')}); k must be 0..${rest.length}`);
  }
  return [...(hasStem ? ['stem'] : []), ...rest.slice(0, k)];
}

interface Builder {
  tensors: Map<string, NamedTensor>;
  copied: string[];
  reinitialised: string[];
  inflated: string[];
  resampled: string[];
  reset: string[];
  adaptedInputs: string[];
  ignored: string[];
  copiedStages: string[];
  sourceStats: Record<string, { mean: number; std: number }>;
  notes: string[];
}

function builder(): Builder {
  return { tensors: new Map(), copied: [], reinitialised: [], inflated: [], resampled: [], reset: [], adaptedInputs: [], ignored: [], copiedStages: [], sourceStats: {}, notes: [] };
}

function finish(arch: ModelArchitecture, b: Builder, strategy: string): InitResult {
  const params = arch.params();
  for (const p of params) if (!b.tensors.has(p.name)) throw new Error(`internal: init strategy ${strategy} produced no tensor for ${p.name}`);
  if (b.tensors.size !== params.length) throw new Error(`internal: init strategy ${strategy} produced ${b.tensors.size} tensors for ${params.length} parameters`);
  return {
    weights: makeBundle(b.tensors.values()),
    report: {
      strategy,
      copied: b.copied,
      reinitialised: b.reinitialised,
      inflated: b.inflated,
      resampled: b.resampled,
      reset: b.reset,
      adaptedInputs: b.adaptedInputs,
      ignored: b.ignored.sort(),
      copiedStages: b.copiedStages,
      sourceStats: b.sourceStats,
      notes: b.notes,
    },
  };
}

function put(b: Builder, p: ParamInfo, data: Float32Array): void {
  if (data.length !== elementCount(p.shape)) throw new Error(`internal: ${p.name} needs ${elementCount(p.shape)} values, got ${data.length}`);
  b.tensors.set(p.name, { name: p.name, dtype: 'F32', shape: [...p.shape], data });
}

function scratchTensor(scratch: TensorBundle, p: ParamInfo): Float32Array {
  const t = scratch.get(p.name);
  if (!t || elementCount(t.shape) !== elementCount(p.shape)) throw new Error(`internal: ${p.name} missing or mis-sized in arch.init()`);
  return t.data;
}

const fmt = (s: readonly number[]) => `[${s.join(',')}]`;

function firstNonFinite(d: Float32Array): number {
  for (let i = 0; i < d.length; i++) if (d[i] - d[i] !== 0) return i;
  return -1;
}

function countNonFinite(d: Float32Array): number {
  let n = 0;
  for (let i = 0; i < d.length; i++) if (d[i] - d[i] !== 0) n++;
  return n;
}

// -------------------------------------------------------------------------------------------------
// scratch

function initScratch(arch: ModelArchitecture, ctx: InitContext): InitResult {
  requireSeed(ctx);
  const scratch = arch.init(ctx.seed);
  const b = builder();
  for (const p of arch.params()) {
    put(b, p, scratchTensor(scratch, p));
    b.reinitialised.push(p.name);
  }
  return finish(arch, b, 'scratch');
}

function requireSeed(ctx: InitContext): void {
  if (!ctx || !Number.isInteger(ctx.seed)) throw new Error(`init: ctx.seed must be an integer, got ${String(ctx?.seed)}`);
}

// -------------------------------------------------------------------------------------------------
// pretrained / partial:k / mean-var: the pretrained bundle is checked against the whole encoder

const RUNNING_STAT = /^(.*)\.(running_mean|running_var)$/;

/**
 * A BatchNorm running statistic whose layer is, in `arch`, a norm without statistics (group/instance norm):
 * a BatchNorm checkpoint transfers γ and β by name, and the statistics are dropped.
 */
function isDroppedRunningStat(name: string, byName: ReadonlyMap<string, ParamInfo>): boolean {
  const m = RUNNING_STAT.exec(name);
  return m !== null && byName.get(`${m[1]}.weight`)?.layerType === 'norm' && !byName.has(name);
}

/** The notes line for running statistics checkPretrainedEncoder dropped, if any. */
function droppedStatsNote(b: Builder): void {
  const dropped = b.ignored.filter((n) => !n.startsWith('head.') && RUNNING_STAT.test(n));
  if (dropped.length === 0) return;
  b.notes.push(`BatchNorm → group/instance norm: running statistics of ${dropped.length / 2} norm layers dropped (the model's norm layers keep none); γ and β transfer by name`);
}

/**
 * Checks `pretrained` against the encoder of `arch` (MedFL names and shapes): every problem is thrown at once
 * as a CheckpointMappingError. Returns the names of ignored tensors: head tensors, and the BatchNorm running
 * statistics of layers that are group/instance norm in `arch`.
 */
export function checkPretrainedEncoder(arch: ModelArchitecture, pretrained: TensorBundle | undefined, strategy: string): string[] {
  if (!pretrained) throw new Error(`init "${strategy}" needs pretrained weights (ctx.pretrained), none were given`);
  const enc = arch.params().filter((p) => p.part === 'encoder');
  const byName = new Map(enc.map((p) => [p.name, p]));
  const problems: MappingProblem[] = [];
  const ignored: string[] = [];
  for (const [name, t] of pretrained) {
    if (byName.has(name)) continue;
    if (name.startsWith('head.') || isDroppedRunningStat(name, byName)) {
      ignored.push(name);
      continue;
    }
    problems.push({ kind: 'unexpected', name, torchKeys: [], detail: `"${name}" ${fmt(t.shape)}` });
  }
  for (const p of enc) {
    const t = pretrained.get(p.name);
    if (!t) {
      problems.push({ kind: 'missing', name: p.name, torchKeys: [], detail: `"${p.name}" ${fmt(p.shape)} (${p.layerType}, ${p.part}/${p.stage})` });
      continue;
    }
    if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i])) {
      problems.push({ kind: 'mis-shaped', name: p.name, torchKeys: [], detail: `"${p.name}": pretrained ${fmt(t.shape)}, model expects ${fmt(p.shape)}` });
      continue;
    }
    if (t.data.length !== elementCount(p.shape)) {
      problems.push({ kind: 'mis-shaped', name: p.name, torchKeys: [], detail: `"${p.name}": ${t.data.length} values for shape ${fmt(t.shape)}` });
      continue;
    }
    const bad = countNonFinite(t.data);
    if (bad > 0) {
      const i = firstNonFinite(t.data);
      problems.push({ kind: 'non-finite', name: p.name, torchKeys: [], detail: `"${p.name}": ${bad} of ${t.data.length} values are NaN/Inf, first at flat index ${i}` });
    }
  }
  if (problems.length > 0) {
    const hints: string[] = [];
    const names = [...pretrained.keys()];
    if (names.length > 0 && !names.some((n) => n.startsWith('encoder.'))) {
      hints.push(
        `the pretrained bundle has no "encoder.*" names (it has e.g. "${names[0]}"): it must be in MedFL names and layouts; convert a PyTorch/MedicalNet state_dict with med3dFromTorch(arch, tensors, { encoderOnly: true })`,
      );
    }
    const isDown = (n: string) => /(^|\.)downsample\./.test(n);
    const missing = problems.filter((q) => q.kind === 'missing');
    const unexpected = problems.filter((q) => q.kind === 'unexpected');
    if (missing.length > 0 && missing.every((q) => isDown(q.name)) && !unexpected.some((q) => isDown(q.name))) {
      hints.push('only downsample (shortcut) weights are missing: the pretrained weights look like shortcut type A; build the model with shortcut A');
    }
    if (unexpected.length > 0 && unexpected.every((q) => isDown(q.name)) && !missing.some((q) => isDown(q.name))) {
      hints.push('the extra tensors are all downsample (shortcut) weights: the pretrained weights look like shortcut type B; build the model with shortcut B');
    }
    if (problems.some((q) => q.kind === 'mis-shaped') && missing.length === 0 && unexpected.length === 0) {
      hints.push('all names match but some shapes do not: a different depth or width multiplier?');
    }
    if (missing.length > 0 && missing.every((q) => RUNNING_STAT.test(q.name))) {
      hints.push('only BatchNorm running statistics are missing: the pretrained weights come from a group/instance-norm model; build the model with model.norm group or instance');
    }
    throw new CheckpointMappingError(problems, hints);
  }
  return ignored;
}

/** pretrained (copyStages undefined: every encoder stage) and partial:k. */
function initPartial(arch: ModelArchitecture, ctx: InitContext, k: number | undefined, strategy: string): InitResult {
  requireSeed(ctx);
  const stages = k === undefined ? encoderStages(arch) : partialStages(arch, k);
  const { bundle: pretrained, adapted } = adaptInputChannels(arch, ctx.pretrained);
  const ignored = checkPretrainedEncoder(arch, pretrained, strategy);
  const scratch = arch.init(ctx.seed);
  const b = builder();
  // Only what is actually copied counts as adapted (partial:0 still copies the stem, where the input conv is).
  const copiedAdapted = adapted.filter((n) => stages.includes(arch.params().find((p) => p.name === n)!.stage));
  adaptedNote(b, copiedAdapted, arch);
  b.ignored.push(...ignored);
  b.copiedStages.push(...stages);
  for (const p of arch.params()) {
    if (p.part === 'encoder' && stages.includes(p.stage)) {
      put(b, p, Float32Array.from(pretrained!.get(p.name)!.data)); // never alias the caller's arrays
      b.copied.push(p.name);
    } else {
      put(b, p, scratchTensor(scratch, p));
      b.reinitialised.push(p.name);
    }
  }
  if (k !== undefined) {
    const rest = encoderStages(arch).filter((s) => !stages.includes(s));
    if (rest.length > 0) b.notes.push(`encoder stages ${rest.join(', ')} re-initialised as scratch (seed ${ctx.seed})`);
  }
  droppedStatsNote(b);
  b.notes.push(`head re-initialised as scratch (seed ${ctx.seed})`);
  return finish(arch, b, strategy);
}

/**
 * The input conv of the encoder (stem stage, 5-D, the model's input channels C > 1 on axis 3) for which `pretrained`
 * holds a one-channel kernel of otherwise the same shape: that kernel replicated over the C input channels and
 * divided by C (W[.., c, o] = W₁[.., 0, o] / C), so that C identical channels x give Σ_c W₁·x / C = W₁·x, the
 * pretrained response. Every other tensor is passed on untouched; a bundle with nothing to adapt is returned as it is.
 */
export function adaptInputChannels(arch: ModelArchitecture, pretrained: TensorBundle | undefined): { bundle: TensorBundle | undefined; adapted: string[] } {
  if (!pretrained) return { bundle: pretrained, adapted: [] };
  const adapted: string[] = [];
  const out = new Map<string, NamedTensor>(pretrained);
  for (const p of arch.params()) {
    if (p.part !== 'encoder' || p.stage !== 'stem' || p.layerType !== 'conv' || p.shape.length !== 5) continue;
    const t = pretrained.get(p.name);
    const C = p.shape[3];
    if (!t || C === 1 || t.shape.length !== 5 || t.shape[3] !== 1) continue;
    if (![0, 1, 2, 4].every((a) => t.shape[a] === p.shape[a]) || t.data.length !== elementCount(t.shape)) continue; // left to the shape check
    // [kD, kH, kW, 1, O] → [kD, kH, kW, C, O]: each tap's O outputs repeated C times, scaled by 1/C.
    const O = p.shape[4];
    const taps = t.data.length / O;
    const data = new Float32Array(taps * C * O);
    for (let k = 0; k < taps; k++) {
      for (let c = 0; c < C; c++) for (let o = 0; o < O; o++) data[(k * C + c) * O + o] = t.data[k * O + o] / C;
    }
    out.set(p.name, { name: p.name, dtype: 'F32', shape: [...p.shape], data });
    adapted.push(p.name);
  }
  return adapted.length === 0 ? { bundle: pretrained, adapted } : { bundle: makeBundle(out.values()), adapted };
}

function adaptedNote(b: Builder, adapted: readonly string[], arch: ModelArchitecture): void {
  if (adapted.length === 0) return;
  b.adaptedInputs.push(...adapted);
  const C = arch.params().find((p) => p.name === adapted[0])!.shape[3];
  b.notes.push(`${adapted.join(', ')}: one-channel pretrained kernel replicated over ${C} input channels and divided by ${C} (${C} identical channels give the pretrained response)`);
}

/** 32-bit seed of a tensor's Mean-Var stream: FNV-1a of its name mixed with the plan seed. */
function tensorSeed(seed: number, name: string): number {
  let h = 0x811c9dc5 ^ Math.imul(seed | 0, 0x9e3779b1);
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** BatchNorm identity value for a norm parameter, by the last component of its name. */
function normIdentity(name: string): number | undefined {
  const last = name.slice(name.lastIndexOf('.') + 1);
  if (last === 'weight' || last === 'gamma' || last === 'running_var' || last === 'moving_variance' || last === 'moving_var') return 1;
  if (last === 'bias' || last === 'beta' || last === 'running_mean' || last === 'moving_mean') return 0;
  return undefined;
}

function meanStd(d: Float32Array): { mean: number; std: number } {
  let s = 0;
  for (let i = 0; i < d.length; i++) s += d[i];
  const mean = s / d.length;
  let v = 0;
  for (let i = 0; i < d.length; i++) v += (d[i] - mean) * (d[i] - mean);
  return { mean, std: Math.sqrt(v / d.length) };
}

function initMeanVar(arch: ModelArchitecture, ctx: InitContext, strategy: string): InitResult {
  requireSeed(ctx);
  // μ and σ are those of the adapted kernel (÷C): the drawn stem then answers C channels at the pretrained scale.
  const { bundle: pretrained, adapted } = adaptInputChannels(arch, ctx.pretrained);
  const ignored = checkPretrainedEncoder(arch, pretrained, strategy);
  const scratch = arch.init(ctx.seed);
  const b = builder();
  adaptedNote(b, adapted, arch);
  b.ignored.push(...ignored);
  const unknownNorm: string[] = [];
  for (const p of arch.params()) {
    if (p.part !== 'encoder') {
      put(b, p, scratchTensor(scratch, p));
      b.reinitialised.push(p.name);
      continue;
    }
    if (p.layerType === 'norm') {
      const v = normIdentity(p.name);
      if (v === undefined) {
        unknownNorm.push(p.name);
        continue;
      }
      put(b, p, new Float32Array(elementCount(p.shape)).fill(v));
      b.reinitialised.push(p.name);
      b.reset.push(p.name);
    } else if (p.layerType === 'conv' || p.layerType === 'dense') {
      const src = pretrained!.get(p.name)!.data;
      const { mean, std } = meanStd(src);
      const rng = mulberry32(tensorSeed(ctx.seed, p.name));
      const out = new Float32Array(src.length);
      for (let i = 0; i < out.length; i++) out[i] = mean + std * gaussian(rng);
      put(b, p, out);
      b.reinitialised.push(p.name);
      b.resampled.push(p.name);
      b.sourceStats[p.name] = { mean, std };
    } else {
      put(b, p, scratchTensor(scratch, p));
      b.reinitialised.push(p.name);
      b.notes.push(`"${p.name}" (layer type ${p.layerType}) has no Mean-Var rule: re-initialised as scratch`);
    }
  }
  if (unknownNorm.length > 0) throw new Error(`init "${strategy}": cannot tell the BatchNorm identity value of ${unknownNorm.map((n) => `"${n}"`).join(', ')} (expected …weight/bias/running_mean/running_var)`);
  droppedStatsNote(b);
  b.notes.push(`BatchNorm reset to identity (γ=1, β=0, running mean 0, var 1); conv/dense tensors drawn from N(μ, σ²) of the pretrained tensor (seed ${ctx.seed}); head re-initialised as scratch`);
  return finish(arch, b, strategy);
}

// -------------------------------------------------------------------------------------------------
// inflate-2d

/**
 * A PyTorch state_dict as read by shared/checkpoints/pth.ts → a bundle in the same names and layouts (what
 * ctx.source2d expects): num_batches_tracked dropped, floating tensors converted to float32; a non-floating
 * tensor is an error. (readCheckpoint already strips a `module.` prefix shared by all keys.)
 */
export function source2dFromTorch(tensors: ReadonlyMap<string, TorchTensor>): TensorBundle {
  const out: NamedTensor[] = [];
  const bad: string[] = [];
  for (const [key, t] of tensors) {
    if (key === 'num_batches_tracked' || key.endsWith('.num_batches_tracked')) continue;
    if (!isFloatingDType(t.dtype)) {
      bad.push(`"${key}" (${t.dtype})`);
      continue;
    }
    const data = tensorToFloat32(t);
    out.push({ name: key, dtype: 'F32', shape: [...t.shape], data: data === t.data ? Float32Array.from(data) : data });
  }
  if (bad.length > 0) throw new Error(`2D checkpoint: non-floating tensors ${bad.join(', ')}`);
  return makeBundle(out);
}

/** The 2D source with a `module.` prefix shared by every key removed. */
function strip2dPrefix(source: TensorBundle): Map<string, NamedTensor> {
  const keys = [...source.keys()];
  const strip = keys.length > 0 && keys.every((k) => k.startsWith('module.'));
  const m = new Map<string, NamedTensor>();
  for (const [k, t] of source) {
    const key = strip ? k.slice('module.'.length) : k;
    if (key.endsWith('num_batches_tracked')) continue;
    m.set(key, t);
  }
  return m;
}

/** Layer prefix of a parameter name: everything before the last dot. */
const layerOf = (name: string) => name.slice(0, name.lastIndexOf('.'));

/**
 * 2D conv [O, I, kH, kW] (PyTorch) → 3D tfjs filter [kD, kH, kW, in, O]. With `grey` the I = 3 RGB input
 * channels are summed into one (what an RGB net computes on a grey image fed as R = G = B).
 */
function inflateConv(src: NamedTensor, kD: number, grey: boolean, mode: '1xk' | 'i3d'): Float32Array {
  const [o, i, kh, kw] = src.shape;
  const hwio = permute(src.data, src.shape, [2, 3, 1, 0]).data; // [kH, kW, I, O]
  const cin = grey ? 1 : i;
  const plane = new Float32Array(kh * kw * cin * o); // [kH, kW, cin, O]
  if (grey) {
    for (let y = 0; y < kh * kw; y++) {
      for (let c = 0; c < i; c++) for (let q = 0; q < o; q++) plane[y * o + q] += hwio[(y * i + c) * o + q];
    }
  } else {
    plane.set(hwio);
  }
  const out = new Float32Array(kD * plane.length);
  if (mode === 'i3d') {
    const scaled = plane.map((v) => v / kD);
    for (let d = 0; d < kD; d++) out.set(scaled, d * plane.length);
  } else {
    out.set(plane, ((kD - 1) / 2) * plane.length);
  }
  return out;
}

function initInflate2d(arch: ModelArchitecture, ctx: InitContext, mode: '1xk' | 'i3d', strategy: string): InitResult {
  requireSeed(ctx);
  if (!ctx.source2d) throw new Error(`init "${strategy}" needs a 2D source checkpoint (ctx.source2d), none was given`);
  const source = strip2dPrefix(ctx.source2d);
  const params = arch.params();
  const enc = params.filter((p) => p.part === 'encoder');
  const keyOf = (p: ParamInfo) => (p.name.startsWith('encoder.') ? p.name.slice('encoder.'.length) : p.name);

  // Which encoder layers have a 2D counterpart: all of their tensors, or none (a partial layer is an error).
  const layers = new Map<string, ParamInfo[]>();
  for (const p of enc) {
    const l = layerOf(p.name);
    const list = layers.get(l);
    if (list) list.push(p);
    else layers.set(l, [p]);
  }
  const problems: MappingProblem[] = [];
  const mapped = new Map<string, Float32Array>();
  const used = new Set<string>();
  const notes: string[] = [];
  const greyLayers: string[] = [];
  for (const ps of layers.values()) {
    const present = ps.filter((p) => source.has(keyOf(p)));
    if (present.length === 0) continue;
    if (present.length < ps.length) {
      for (const p of ps) {
        if (!source.has(keyOf(p))) {
          problems.push({ kind: 'missing', name: p.name, torchKeys: [], detail: `"${keyOf(p)}" for ${p.name} ${fmt(p.shape)}: the 2D checkpoint has other tensors of layer "${layerOf(keyOf(p))}" but not this one` });
        }
      }
      for (const p of present) used.add(keyOf(p));
      continue;
    }
    for (const p of ps) {
      const key = keyOf(p);
      const t = source.get(key)!;
      used.add(key);
      const problem = (detail: string) => problems.push({ kind: 'mis-shaped', name: p.name, torchKeys: [key], detail: `"${key}" → ${p.name}: ${detail}` });
      if (t.data.length !== elementCount(t.shape)) {
        problem(`${t.data.length} values for shape ${fmt(t.shape)}`);
        continue;
      }
      const bad = countNonFinite(t.data);
      if (bad > 0) {
        problems.push({ kind: 'non-finite', name: p.name, torchKeys: [key], detail: `"${key}": ${bad} of ${t.data.length} values are NaN/Inf, first at flat index ${firstNonFinite(t.data)}` });
        continue;
      }
      if (p.shape.length === 5) {
        const [kD, kH, kW, cin, cout] = p.shape;
        if (t.shape.length !== 4) {
          problem(`2D checkpoint ${fmt(t.shape)} is not a Conv2d weight [out,in,kH,kW]${t.shape.length === 5 ? ' (it is already 3D: use init "pretrained")' : ''}; model expects 3D ${fmt(p.shape)} = Conv3d [${cout},${cin},${kD},${kH},${kW}]`);
          continue;
        }
        const [o, i, kh, kw] = t.shape;
        const grey = cin === 1 && i === 3;
        const why: string[] = [];
        if (o !== cout) why.push(`${o} output channels, model has ${cout}`);
        if (i !== cin && !grey) why.push(`${i} input channels, model has ${cin}`);
        if (kh !== kH || kw !== kW) why.push(`kernel ${kh}×${kw}, model has ${kH}×${kW} in-plane`);
        if (mode === '1xk' && kD % 2 !== 1) why.push(`depth ${kD} of the 3D kernel is even: no centre slice for inflate-2d:1xk`);
        if (why.length > 0) {
          problem(`Conv2d ${fmt(t.shape)} vs Conv3d [${cout},${cin},${kD},${kH},${kW}]: ${why.join('; ')}`);
          continue;
        }
        if (grey) greyLayers.push(key);
        mapped.set(p.name, inflateConv(t, kD, grey, mode));
      } else if (p.shape.length === 2) {
        // A dense layer inside an encoder (none in Med3D): PyTorch Linear [out, in] → [in, out].
        if (t.shape.length !== 2 || t.shape[0] !== p.shape[1] || t.shape[1] !== p.shape[0]) {
          problem(`2D checkpoint ${fmt(t.shape)}, model expects Linear [${p.shape[1]},${p.shape[0]}]`);
          continue;
        }
        mapped.set(p.name, permute(t.data, t.shape, [1, 0]).data);
      } else {
        if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i])) {
          problem(`2D checkpoint ${fmt(t.shape)}, model expects ${fmt(p.shape)}`);
          continue;
        }
        mapped.set(p.name, Float32Array.from(t.data));
      }
    }
  }
  if (mapped.size === 0 && problems.length === 0) {
    const k = [...source.keys()];
    problems.push({
      kind: 'missing',
      name: enc[0]?.name ?? '',
      torchKeys: [],
      detail: `no 2D checkpoint tensor matches any encoder parameter (checkpoint keys look like "${k[0] ?? '(none)'}", expected torchvision keys like "${enc[0] ? keyOf(enc[0]) : 'conv1.weight'}")`,
    });
  }
  if (problems.length > 0) {
    const hints: string[] = [];
    const c1 = source.get('conv1.weight');
    const m1 = enc.find((p) => p.name === 'encoder.conv1.weight');
    if (c1 && m1 && c1.shape.length === 4 && c1.shape[0] !== m1.shape[4]) {
      hints.push(`width mismatch: the 2D network has ${c1.shape[0]} base planes, the model ${m1.shape[4]}; inflation needs equal widths (Med3D widthMultiplier = ${c1.shape[0]}/64 = ${c1.shape[0] / 64})`);
    }
    throw new CheckpointMappingError(problems, hints);
  }

  const scratch = arch.init(ctx.seed);
  const b = builder();
  for (const p of params) {
    const m = mapped.get(p.name);
    if (m) {
      put(b, p, m);
      b.copied.push(p.name);
      if (p.shape.length === 5) b.inflated.push(p.name);
    } else {
      put(b, p, scratchTensor(scratch, p));
      b.reinitialised.push(p.name);
    }
  }
  for (const k of source.keys()) if (!used.has(k)) b.ignored.push(k);
  if (b.ignored.some((k) => /(^|\.)downsample\./.test(k))) notes.push('2D downsample (shortcut projection) tensors without a 3D counterpart were ignored: the model has parameter-free type-A shortcuts there');
  const copiedStages = encoderStages(arch).filter((s) => enc.some((p) => p.stage === s && mapped.has(p.name)));
  b.copiedStages.push(...copiedStages);
  notes.push(
    mode === 'i3d'
      ? 'I3D: each 2D kernel repeated over the kD depth taps and divided by kD (a volume of identical slices gives the 2D response away from the depth borders)'
      : '1×k×k (Wacker et al.): each 2D kernel in the centre depth slice of the 3D kernel, zeros elsewhere (every slice gets the 2D response of the slice the conv is centred on)',
  );
  if (greyLayers.length > 0) notes.push(`RGB → grey: the 3 input channels of ${greyLayers.join(', ')} summed into 1 (a grey image fed as R = G = B)`);
  const encReinit = b.reinitialised.filter((n) => n.startsWith('encoder.'));
  if (encReinit.length > 0) notes.push(`${encReinit.length} encoder tensors have no 2D counterpart and are re-initialised as scratch: ${encReinit.join(', ')}`);
  if (arch.id === 'med3d') {
    notes.push(
      'geometry differs from the 2D net: Med3D strides 2 in depth too (conv1, maxpool, layer2) and runs layer3/layer4 with stride 1 and dilation 2/4 where torchvision strides 2; kernels are copied as they are',
    );
  }
  b.notes.push(...notes);
  b.notes.push(`head re-initialised as scratch (seed ${ctx.seed})`);
  return finish(arch, b, strategy);
}
