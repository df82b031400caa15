/**
 * Optimisers over Float32Arrays with PyTorch's update rules (SGD with momentum and weight decay, Adam),
 * parameter groups selected by what a parameter is (part, stage, layer type) rather than by name
 * patterns: a learning-rate scale per group (MedicalNet trains its new head at ×100) and freezing.
 * One fused pass per tensor per step, no temporaries.
 */
import { z } from 'zod';
import type { ParamInfo } from './types.ts';

export const ParamSelectorSchema = z
  .object({
    part: z.enum(['encoder', 'head']).optional(),
    /** Stage names as the architecture defines them, e.g. "stem", "layer1" … "layer4", "head". */
    stage: z.union([z.string(), z.array(z.string()).min(1)]).optional(),
    layerType: z.enum(['conv', 'norm', 'dense', 'other']).optional(),
  })
  .strict();

export const GroupRuleSchema = z
  .object({
    select: ParamSelectorSchema,
    /** Multiplies the base learning rate for the selected parameters. */
    lrScale: z.number().positive().optional(),
    /** Selected parameters are not updated (BatchNorm statistics of frozen layers still follow the data). */
    freeze: z.boolean().optional(),
  })
  .strict();

export const OptimizerSpecSchema = z
  .object({
    kind: z.enum(['adam', 'sgd']).default('adam'),
    /** SGD momentum (PyTorch semantics: the buffer starts at the first gradient). */
    momentum: z.number().min(0).max(0.999).default(0.9),
    beta1: z.number().min(0).max(0.9999).default(0.9),
    beta2: z.number().min(0).max(0.99999).default(0.999),
    eps: z.number().positive().default(1e-8),
    /** L2 penalty added to the gradient (PyTorch `weight_decay`), applied to conv/dense weights only. */
    weightDecay: z.number().min(0).default(0),
    /** Applied in order; a later rule overrides an earlier one for the parameters both select. */
    groups: z.array(GroupRuleSchema).default([]),
  })
  .strict();

export type ParamSelector = z.infer<typeof ParamSelectorSchema>;
export type GroupRule = z.infer<typeof GroupRuleSchema>;
export type OptimizerSpec = z.infer<typeof OptimizerSpecSchema>;

export const DEFAULT_OPTIMIZER: OptimizerSpec = OptimizerSpecSchema.parse({});

export function selects(s: ParamSelector, p: ParamInfo): boolean {
  if (s.part !== undefined && p.part !== s.part) return false;
  if (s.layerType !== undefined && p.layerType !== s.layerType) return false;
  if (s.stage !== undefined) {
    const stages = typeof s.stage === 'string' ? [s.stage] : s.stage;
    if (!stages.includes(p.stage)) return false;
  }
  return true;
}

export interface ParamGroupSetting {
  readonly lrScale: number;
  readonly frozen: boolean;
}

/** Learning-rate scale and frozen flag for each trainable parameter. Throws on a rule that selects nothing (a typo). */
export function resolveGroups(params: readonly ParamInfo[], groups: readonly GroupRule[]): Map<string, ParamGroupSetting> {
  const out = new Map<string, ParamGroupSetting>();
  for (const p of params) if (p.trainable) out.set(p.name, { lrScale: 1, frozen: false });
  groups.forEach((rule, i) => {
    let hits = 0;
    for (const p of params) {
      if (!p.trainable || !selects(rule.select, p)) continue;
      hits++;
      const cur = out.get(p.name)!;
      out.set(p.name, { lrScale: rule.lrScale ?? cur.lrScale, frozen: rule.freeze ?? cur.frozen });
    }
    if (hits === 0) {
      const stages = [...new Set(params.map((p) => p.stage))].join(', ');
      throw new Error(`optimizer group ${i + 1} (${JSON.stringify(rule.select)}) selects no trainable parameter; stages here are: ${stages}`);
    }
  });
  return out;
}

/** Whether weight decay applies to a parameter: convolution and dense weights, never biases or norms. */
export function decays(p: ParamInfo): boolean {
  return p.layerType === 'conv' || p.layerType === 'dense' ? !p.name.endsWith('.bias') : false;
}

/** Fused per-tensor update kernels (the native addon's); the JS loops below are the reference and fallback. */
export interface OptimizerKernels {
  adamStep(w: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, stepSize: number, beta1: number, beta2: number, eps: number, sqrtC2: number, weightDecay: number): void;
  sgdStep(w: Float32Array, g: Float32Array, buf: Float32Array, lr: number, momentum: number, weightDecay: number, first: number): void;
}

/** The JS loops of both optimisers (PyTorch's update, term for term): the reference the addon's kernels match. */
export const JS_OPTIMIZER_KERNELS: OptimizerKernels = {
  adamStep(w, g, m, v, stepSize, beta1, beta2, eps, sqrtC2, wd) {
    for (let i = 0; i < w.length; i++) {
      const gi = g[i] + wd * w[i];
      const mi = beta1 * m[i] + (1 - beta1) * gi;
      const vi = beta2 * v[i] + (1 - beta2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      w[i] -= (stepSize * mi) / (Math.sqrt(vi) / sqrtC2 + eps);
    }
  },
  sgdStep(w, g, buf, lr, momentum, wd, first) {
    for (let i = 0; i < w.length; i++) {
      const gi = g[i] + wd * w[i];
      const b = first ? gi : momentum * buf[i] + gi;
      buf[i] = b;
      w[i] -= lr * (momentum > 0 ? b : gi);
    }
  },
};

/** The optimiser kernels a convolution-kernel object brings (the oneDNN addon's), if any. */
export function optimizerKernelsOf(k: object): OptimizerKernels | undefined {
  const addon = (k as { addon?: Partial<OptimizerKernels> }).addon;
  return addon && typeof addon.adamStep === 'function' && typeof addon.sgdStep === 'function' ? (addon as OptimizerKernels) : undefined;
}

/**
 * What the optimiser remembers about one parameter (PyTorch's `state[p]`): its update count, which Adam's bias
 * correction needs and which tells SGD whether its momentum buffer has started, and its moment buffers.
 */
export interface ParamOptimizerState {
  /** Updates this parameter has had. */
  readonly step: number;
  /** Adam's first moment (`exp_avg`) or SGD's momentum buffer. */
  readonly m: Float32Array;
  /** Adam's second moment (`exp_avg_sq`); absent for SGD. */
  readonly v?: Float32Array;
}

/** Optimiser state by parameter name; a parameter without an entry starts fresh. */
export type OptimizerState = ReadonlyMap<string, ParamOptimizerState>;

/**
 * Why `state` cannot seed an optimiser of `kind` over `params` (unknown name, wrong size, Adam state for SGD or
 * the reverse, a bad step count), or undefined when it fits.
 */
export function optimizerStateProblem(state: OptimizerState, kind: OptimizerSpec['kind'], params: readonly ParamInfo[]): string | undefined {
  const byName = new Map(params.map((p) => [p.name, p]));
  for (const [name, s] of state) {
    const p = byName.get(name);
    if (!p) return `state for unknown parameter ${name}`;
    const n = p.shape.reduce((a, b) => a * b, 1);
    if (!Number.isInteger(s.step) || s.step < 0) return `${name}: step count ${s.step} is not a non-negative integer`;
    if (s.m.length !== n) return `${name}: moment holds ${s.m.length} values, the parameter ${n}`;
    if (kind === 'adam' && s.v?.length !== n) return `${name}: ${s.v ? `second moment holds ${s.v.length} values, the parameter ${n}` : 'no second moment (SGD state) for Adam'}`;
    if (kind === 'sgd' && s.v) return `${name}: Adam state (a second moment) for SGD`;
  }
  return undefined;
}

interface Slot {
  readonly name: string;
  readonly value: Float32Array;
  readonly lrScale: number;
  readonly decay: boolean;
  readonly m: Float32Array;
  readonly v?: Float32Array;
  /** Updates so far, per parameter: a parameter restored from an earlier round continues its own count. */
  t: number;
}

export class Optimizer {
  private readonly slots: Slot[] = [];

  /**
   * `values` are updated in place. Parameters that are frozen or not trainable get no slot (and need
   * no gradient). `initial` seeds the named parameters' state (copied); the others start fresh.
   */
  constructor(
    private readonly spec: OptimizerSpec,
    private readonly learningRate: number,
    params: readonly ParamInfo[],
    values: ReadonlyMap<string, Float32Array>,
    private readonly kernels?: OptimizerKernels,
    initial?: OptimizerState,
  ) {
    if (!(learningRate > 0)) throw new Error(`optimizer: learning rate must be > 0, got ${learningRate}`);
    const problem = initial && optimizerStateProblem(initial, spec.kind, params);
    if (problem) throw new Error(`optimizer: initial state does not fit: ${problem}`);
    const groups = resolveGroups(params, spec.groups);
    for (const p of params) {
      const g = groups.get(p.name);
      if (!g || g.frozen) continue;
      const value = values.get(p.name);
      if (!value) throw new Error(`optimizer: no value for parameter ${p.name}`);
      const decay = decays(p);
      const from = initial?.get(p.name);
      this.slots.push({
        name: p.name,
        value,
        lrScale: g.lrScale,
        decay,
        m: from ? new Float32Array(from.m) : new Float32Array(value.length),
        v: spec.kind === 'adam' ? (from ? new Float32Array(from.v!) : new Float32Array(value.length)) : undefined,
        t: from?.step ?? 0,
      });
    }
  }

  /** Names of the parameters this optimiser updates (so callers allocate gradients for those only). */
  get trained(): string[] {
    return this.slots.map((s) => s.name);
  }

  /** The state of every updated parameter: the optimiser's own buffers (copy them before stepping again). */
  state(): OptimizerState {
    return new Map(this.slots.map((s) => [s.name, { step: s.t, m: s.m, ...(s.v ? { v: s.v } : {}) }]));
  }

  /** One update; `lrFactor` scales every group's learning rate for this step (a learning-rate schedule). */
  step(grads: ReadonlyMap<string, Float32Array>, lrFactor = 1): void {
    if (!(lrFactor >= 0 && Number.isFinite(lrFactor))) throw new Error(`optimizer: learning-rate factor must be finite and ≥ 0, got ${lrFactor}`);
    const { kind, momentum, beta1, beta2, eps, weightDecay } = this.spec;
    for (const s of this.slots) {
      const g = grads.get(s.name);
      if (!g) throw new Error(`optimizer: missing gradient for ${s.name}`);
      const t = ++s.t;
      const w = s.value;
      const lr = this.learningRate * s.lrScale * lrFactor;
      const wd = s.decay ? weightDecay : 0;
      const m = s.m;
      const k = this.kernels ?? JS_OPTIMIZER_KERNELS;
      if (kind === 'sgd') {
        k.sgdStep(w, g, m, lr, momentum, wd, t === 1 ? 1 : 0);
        continue;
      }
      k.adamStep(w, g, m, s.v!, lr / (1 - Math.pow(beta1, t)), beta1, beta2, eps, Math.sqrt(1 - Math.pow(beta2, t)), wd);
    }
  }
}
