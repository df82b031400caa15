/**
 * A strategy composed from the parts the plan names (plan.aggregation), with no class per combination:
 *
 *   validation filter → clip filter → combine rule → noise filter → server optimiser
 *
 * - validation: names/dtypes/shapes, sample count, finite values, every proposed weight within ±maxValue and
 *   the delta's L2 norm (absolute bound or k × the median of recently accepted norms), checked by check()
 *   before anything counts;
 * - clip: each delta Δ_i = x_i − x_base scaled by min(1, S/‖Δ_i‖) (plan clipNorm, or dp.clipNorm);
 * - combine: `fedavg` = sample-weighted mean folded as updates arrive into float64 sums (WebAssembly SIMD,
 *   O(model); reweight() lowers a weight afterwards, for plan maxWeightShare),
 *   `median` / `trimmed-mean` coordinate-wise over spilled updates (robust.ts);
 * - noise (DP-FedAvg): uniform weights, N(0, (z·S)²) added to the clipped sum, divided by the sites asked;
 * - server optimiser: none | FedAdam | FedYogi | FedAdagrad on the combined delta (server-optimizer.ts).
 *
 * What is shared (FedBN etc.) is decided before this, by plan.share: the specs handed to begin().
 * Everything works in delta space, so any combination composes; with no clip, no noise, no optimiser
 * and the mean, the result is bit-for-bit the plain FedAvg (sums × 1/Σn); with no norm bound either
 * (validation.maxNormFactor: 0), no base model is kept.
 */
import { elementCount, makeBundle, type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { SimdArena64 } from './simd-axpy.ts';
import { BASE_BLOCK_FLOATS, baseBlocks, baseMaxAbs, isTensorReader, type BaseBlocks, type RoundBase, type TensorReader } from './base-blocks.ts';
import { meanToF32 } from './mean-f32.ts';
import { checkedFold as defaultCheckedFold, checkedFoldBatch as defaultCheckedFoldBatch, unfold, unfoldBlocks, type BatchUpdate, type CheckedFold, type CheckedFoldBatch, type CheckedFoldResult, type FoldTarget } from './checked-fold.ts';
import { WeightedMeanAggregator } from './fedavg.ts';
import { RobustCombiner, type RobustColumns, type RobustRule } from './robust.ts';
import { fileMoments, type MomentsFactory } from './moments.ts';
import { cryptoGaussian } from './gaussian.ts';
import { ServerOptimizer } from './server-optimizer.ts';
import type { AggregationStrategy, BatchItem, RoundAggregator, RoundContext, StrategyState, UpdateInfo, Verdict } from './strategy.ts';
import { deltaNorm, deltaSqLanes as defaultDeltaSqLanes, median, normProblem, samplesProblem, shapeAndSamplesProblem, type DeltaSqLanes, valueBoundMessage, valueBoundProblem, type DeltaNorm, type ValidationRules } from './validate.ts';

export type AggregationConfig = Plan['aggregation'];

export interface ComposedOptions {
  /** Where median / trimmed-mean spill updates (one model per update); default the OS temp dir. */
  spillDir?: string;
  /** Block size of the robust passes (bytes of the n × block matrix). */
  blockBytes?: number;
  /** Fills `out` with N(0, 1) samples; default a CSPRNG (DP noise must not be predictable). */
  gaussian?: (out: Float32Array) => void;
  simd?: boolean;
  /** How median / trimmed mean reduce a block's columns; default the native addon's when built, else JS. */
  columns?: RobustColumns;
  /** How check() measures an update's delta norm; default the native loop when built, else JS (same result). */
  deltaNorm?: DeltaNorm;
  /** How checkAndAdd() checks and folds in one pass; default the native loop when built, else JS (same result). */
  checkedFold?: CheckedFold;
  /** How checkAndAddBatch() checks and folds several updates in one pass; default the native loop when built, else JS. */
  checkedFoldBatch?: CheckedFoldBatch;
  /** How the robust rules measure an update's norm while spilling it (checkAndAdd); default the native loop when built. */
  deltaSqLanes?: DeltaSqLanes;
  /** Where a server optimiser keeps m and v between rounds; default a file in spillDir (no RSS; same results as memory). */
  moments?: MomentsFactory;
}

type Offsets = Map<string, { off: number; n: number }>;

export class ComposedStrategy implements AggregationStrategy {
  readonly name: string;
  private optimizer: ServerOptimizer;
  private readonly rules: ValidationRules;
  private readonly clipNorm: number | undefined;
  /** Norms accepted in the last closed round: the reference for maxNormFactor early in a round. */
  private recentNorms: number[] = [];
  private arena: SimdArena64 | undefined;
  private robustOut: Float32Array | undefined;
  private specs: readonly TensorSpec[] = [];
  private offsets: Offsets = new Map();
  /** Restored tensors waiting for the first begin() (which knows the specs). */
  private pendingTensors: TensorBundle | undefined;

  constructor(readonly cfg: AggregationConfig, private readonly opts: ComposedOptions = {}) {
    this.optimizer = this.newOptimizer();
    this.rules = cfg.validation;
    const clips = [cfg.clipNorm, cfg.dp?.clipNorm].filter((x): x is number => x !== undefined);
    this.clipNorm = clips.length ? Math.min(...clips) : undefined;
    const parts = [cfg.strategy === 'trimmed-mean' ? `trimmed-mean(β=${cfg.trimFraction})` : cfg.strategy];
    if (cfg.serverOptimizer.type !== 'none') parts.push(`${cfg.serverOptimizer.type}(η=${cfg.serverOptimizer.lr})`);
    if (this.clipNorm !== undefined) parts.push(`clip(${this.clipNorm})`);
    if (cfg.dp) parts.push(`dp(z=${cfg.dp.noiseMultiplier})`);
    this.name = parts.join('+');
  }

  private newOptimizer(): ServerOptimizer {
    return new ServerOptimizer(this.cfg.serverOptimizer, this.opts.moments ?? fileMoments(this.opts.spillDir));
  }

  /** Whether rounds read the base model (a block at a time) for deltas, norms or the optimiser. */
  needsBase(ctx: RoundContext = {}): boolean {
    const c = this.cfg;
    return (
      c.strategy !== 'fedavg' || c.serverOptimizer.type !== 'none' || this.clipNorm !== undefined || !!c.dp ||
      c.validation.maxNorm !== undefined || c.validation.maxNormFactor !== undefined || !!ctx.deltaUpdates ||
      c.secureAggregation.enabled
    );
  }

  begin(current: RoundBase, specs: readonly TensorSpec[], ctx: RoundContext = {}): RoundAggregator {
    const offsets: Offsets = new Map();
    let total = 0;
    for (const s of specs) {
      const n = elementCount(s.shape);
      offsets.set(s.name, { off: total, n });
      total += n;
    }
    this.specs = specs;
    this.offsets = offsets;
    if (this.pendingTensors) {
      this.optimizer.restoreTensors(this.pendingTensors, specs, offsets, total);
      this.pendingTensors = undefined;
    }
    // Not copied: read a block at a time where needed (from the model file in the coordinator: no model of RSS).
    let base: BaseBlocks | undefined;
    if (this.needsBase(ctx)) base = baseBlocks(this.ownedBase(current, offsets, total), offsets);
    else if (isTensorReader(current)) current.close();
    let combiner: Combiner;
    if (this.cfg.strategy === 'fedavg') {
      const mean = new WeightedMeanAggregator(specs, { arena: this.arena, simd: this.opts.simd });
      this.arena = mean.simdArena;
      combiner = new MeanCombiner(mean, this.cfg.dp ? { expected: Math.max(1, ctx.expected ?? 1), sigma: this.cfg.dp.noiseMultiplier * this.cfg.dp.clipNorm, gaussian: this.opts.gaussian ?? cryptoGaussian } : undefined);
    } else {
      const rule: RobustRule = this.cfg.strategy === 'median' ? { kind: 'median' } : { kind: 'trimmed-mean', beta: this.cfg.trimFraction };
      if (!this.robustOut || this.robustOut.length !== total) this.robustOut = new Float32Array(total);
      combiner = new RobustCombinerAdapter(new RobustCombiner(rule, offsets, total, this.opts), this.robustOut);
    }
    return new ComposedRound(this, specs, offsets, base, combiner, this.rules, this.clipNorm, [...this.recentNorms], () => (base ? baseMaxAbs(base) : 0), this.opts.deltaNorm ?? deltaNorm, this.opts.checkedFold ?? defaultCheckedFold, this.opts.checkedFoldBatch ?? defaultCheckedFoldBatch, this.opts.deltaSqLanes ?? defaultDeltaSqLanes);
  }

  /**
   * The base as given, unless it is the last round's result still in this strategy's own memory (finish() returns
   * views into the sums or the robust output, which this round reuses): then a copy, flat in spec order.
   */
  private ownedBase(current: RoundBase, offsets: Offsets, total: number): RoundBase {
    if (isTensorReader(current)) return current;
    const mine = [this.arena?.sums.buffer, this.robustOut?.buffer].filter((b) => b !== undefined);
    if (![...offsets.keys()].some((name) => mine.includes(current.get(name)?.data.buffer as ArrayBuffer))) return current;
    const flat = new Float32Array(total);
    const out: NamedTensor[] = [];
    for (const [name, { off, n }] of offsets) {
      const t = current.get(name);
      if (!t || t.data.length !== n) throw new Error(`base model lacks shared tensor ${name} or has the wrong size`);
      flat.set(t.data, off);
      out.push({ ...t, data: flat.subarray(off, off + n) });
    }
    return makeBundle(out);
  }

  /** Called by a round at finish: the optimiser step and the norm reference for the next round. */
  applyOptimizer(base: BaseBlocks | undefined, y: Float32Array): void {
    if (this.cfg.serverOptimizer.type === 'none') return;
    this.optimizer.apply(base!, y);
  }

  roundFinished(norms: readonly number[]): void {
    if (norms.length > 0) this.recentNorms = [...norms];
  }

  exportState(): StrategyState | undefined {
    const tensors = this.optimizer.exportTensors(this.specs, this.offsets);
    return { json: JSON.stringify({ strategy: this.name, optimizerStep: this.optimizer.step, recentNorms: this.recentNorms }), tensors };
  }

  reset(): void {
    this.optimizer.dispose();
    this.optimizer = this.newOptimizer();
    this.recentNorms = [];
    this.pendingTensors = undefined;
  }

  restoreState(s: StrategyState): void {
    const j = JSON.parse(s.json) as { optimizerStep?: number; recentNorms?: number[] };
    this.optimizer.step = j.optimizerStep ?? 0;
    this.recentNorms = j.recentNorms ?? [];
    this.pendingTensors = s.tensors;
  }

  get optimizerStep(): number {
    return this.optimizer.step;
  }
}

interface Combiner {
  readonly count: number;
  /** Adds `scale`·Δ with weight `weight` (the mean's sample weight; ignored by robust rules). */
  add(update: TensorBundle, weight: number, scale: number, isDelta: boolean, site: string): void;
  /** Secure aggregation: Σ wᵢΔᵢ of several sites at once (already weighted), with Σ wᵢ. Mean only. */
  addSum?(sum: TensorBundle, totalWeight: number, sites: number): void;
  /** Lowers the weight of an update already added (plan maxWeightShare). Mean only. */
  reweight?(update: TensorBundle, from: number, to: number, scale: number, isDelta: boolean, site: string): void;
  /** The combined proposal y = base + Δ̄ (flat, spec order). `base` may be undefined only for the plain mean. */
  finish(base: BaseBlocks | undefined): Float32Array;
  discard(): void;
}

class MeanCombiner implements Combiner {
  /** Σ w_i (the divisor). */
  private weight = 0;
  /** Σ a_i over weight-form updates folded with coefficient a_i (what the base must be subtracted by). */
  private baseCoef = 0;

  private readonly target: FoldTarget;

  constructor(
    private readonly mean: WeightedMeanAggregator,
    private readonly dp: { expected: number; sigma: number; gaussian: (out: Float32Array) => void } | undefined,
  ) {
    this.target = { sums: mean.rawSums, foldBlock: (off, x, a) => mean.foldBlock(off, x, a) };
  }

  get count(): number {
    return this.mean.count;
  }

  add(update: TensorBundle, weight: number, scale: number, isDelta: boolean, site: string): void {
    // DP-FedAvg weighs sites uniformly: the sensitivity of the sum is then S, whatever a site claims.
    const w = this.dp ? 1 : weight;
    const a = w * scale;
    this.mean.addWeighted(update, a, site);
    this.weight += w;
    if (!isDelta) this.baseCoef += a;
  }

  /** Checks and folds the update with its weight in one pass (unclipped: the factor needs the norm first). */
  addChecked(update: TensorBundle, weight: number, isDelta: boolean, base: BaseBlocks | undefined, offsets: Offsets, maxValue: number, fold: CheckedFold): CheckedFoldResult {
    const w = this.dp ? 1 : weight;
    const r = fold(update, isDelta, base, offsets, this.target, w, maxValue);
    if (!r.valuesOk) return r;
    this.mean.count++;
    this.weight += w;
    if (!isDelta) this.baseCoef += w;
    return r;
  }

  /**
   * Checks and folds several updates (one encoding) in one pass over the sums, in the batch's order; each result
   * as addChecked's for that update alone. Updates whose values fail are not counted.
   */
  addCheckedBatch(items: readonly { values: BaseBlocks; weight: number }[], isDelta: boolean, base: BaseBlocks | undefined, offsets: Offsets, maxValue: number, fold: CheckedFoldBatch): CheckedFoldResult[] {
    const updates: BatchUpdate[] = items.map((it) => ({ values: it.values, a: this.dp ? 1 : it.weight }));
    const results = fold(updates, isDelta, base, offsets, this.target, maxValue);
    results.forEach((r, j) => {
      if (!r.valuesOk) return;
      this.mean.count++;
      this.weight += updates[j].a;
      if (!isDelta) this.baseCoef += updates[j].a;
    });
    return results;
  }

  /** add() for an update read a block at a time: the same a·x into each sum as addWeighted's fold. */
  addBlocks(values: BaseBlocks, weight: number, scale: number, isDelta: boolean): void {
    const w = this.dp ? 1 : weight;
    const a = w * scale;
    for (let at = 0; at < values.total; at += BASE_BLOCK_FLOATS) {
      const len = Math.min(BASE_BLOCK_FLOATS, values.total - at);
      this.mean.foldBlock(at, values.block(at, len), a);
    }
    this.mean.count++;
    this.weight += w;
    if (!isDelta) this.baseCoef += a;
  }

  /** retract() for an update read a block at a time (`scale` its clip factor as folded; 1 as addCheckedBatch folds). */
  retractBlocks(values: BaseBlocks, weight: number, isDelta: boolean, offsets: Offsets, scale = 1): void {
    const w = this.dp ? 1 : weight;
    const a = w * scale;
    unfoldBlocks(values, offsets, this.target, a);
    this.mean.count--;
    this.weight -= w;
    if (!isDelta) this.baseCoef -= a;
  }

  /** Takes an added update out again (sums −= a·Δ): the count and weights exactly, the sums within float64 rounding. */
  retract(update: TensorBundle, weight: number, scale: number, isDelta: boolean, offsets: Offsets): void {
    const w = this.dp ? 1 : weight;
    const a = w * scale;
    unfold(update, offsets, this.target, a);
    this.mean.count--;
    this.weight -= w;
    if (!isDelta) this.baseCoef -= a;
  }

  addSum(sum: TensorBundle, totalWeight: number, sites: number): void {
    // Already Σ wᵢΔᵢ (under DP: Σ of site-clipped Δᵢ, wᵢ = 1): delta form, folded once with coefficient 1.
    this.mean.addWeighted(sum, 1, `secure-aggregation(${sites} sites)`);
    this.weight += totalWeight;
  }

  /** Changes a folded update's weight from `from` to `to` (maxWeightShare); `scale` is its clip factor as folded. */
  reweight(update: TensorBundle, from: number, to: number, scale: number, isDelta: boolean, site: string): void {
    if (this.dp) return; // DP-FedAvg weighs every site 1: there is no share to cap
    const a = (to - from) * scale;
    this.mean.addWeighted(update, a, site);
    this.mean.count--; // the same update again, not another one
    this.weight += to - from;
    if (!isDelta) this.baseCoef += a;
  }

  finish(base: BaseBlocks | undefined): Float32Array {
    if (this.mean.count === 0) throw new Error('no updates to aggregate');
    // Float64 sums in, float32 result out over the same memory (each sum is read before its slot is written, and
    // the blocks go upwards). The base is read a block at a time.
    const s = this.mean.rawSums;
    const y = this.mean.outputInPlace;
    const n = s.length;
    if (this.dp) {
      // y = b + (Σ a_i x_i − A·b + N(0, σ²)) / E, E = the sites asked (fixed before the round: not data-dependent).
      const inv = 1 / this.dp.expected;
      const noise = new Float32Array(Math.min(n, BASE_BLOCK_FLOATS));
      for (let at = 0; at < n; at += noise.length) {
        const len = Math.min(noise.length, n - at);
        this.dp.gaussian(noise);
        const b = base!.block(at, len);
        for (let i = 0; i < len; i++) {
          const j = at + i;
          y[j] = b[i] + (s[j] - this.baseCoef * b[i] + this.dp.sigma * noise[i]) * inv;
        }
      }
      return y;
    }
    const inv = 1 / this.weight;
    if (this.baseCoef === this.weight) {
      // Plain FedAvg (weights, unclipped): the mean itself, exactly as the streaming FedAvg computes it.
      return meanToF32(s.subarray(0, y.length), inv);
    }
    const k = 1 - this.baseCoef * inv;
    for (let at = 0; at < n; at += BASE_BLOCK_FLOATS) {
      const len = Math.min(BASE_BLOCK_FLOATS, n - at);
      const b = base!.block(at, len);
      for (let i = 0; i < len; i++) y[at + i] = s[at + i] * inv + k * b[i];
    }
    return y;
  }

  discard(): void {}
}

class RobustCombinerAdapter implements Combiner {
  constructor(readonly r: RobustCombiner, private readonly out: Float32Array) {}
  get count(): number {
    return this.r.count;
  }
  add(update: TensorBundle, _weight: number, scale: number, isDelta: boolean, site: string): void {
    this.r.add(update, scale, isDelta, site);
  }
  finish(base: BaseBlocks | undefined): Float32Array {
    this.r.finish(base!, this.out);
    return this.out;
  }
  discard(): void {
    this.r.discard();
  }
}

/** A round aggregator that can take an already-summed secure-aggregation result (the composed fedavg round). */
export interface SumAggregator extends RoundAggregator {
  addSum(sum: TensorBundle, totalWeight: number, sites: number): void;
}

export function acceptsSums(a: RoundAggregator): a is SumAggregator {
  return typeof (a as Partial<SumAggregator>).addSum === 'function';
}

class ComposedRound implements RoundAggregator {
  private readonly norms: number[] = [];
  private finished = false;

  constructor(
    private readonly strategy: ComposedStrategy,
    private readonly specs: readonly TensorSpec[],
    private readonly offsets: Offsets,
    private readonly base: BaseBlocks | undefined,
    private readonly combiner: Combiner,
    private readonly rules: ValidationRules,
    private readonly clipNorm: number | undefined,
    /** Norms of the last closed round; this round's accepted norms are added as they come. */
    private readonly previousNorms: readonly number[],
    /**
     * max |base value|: with ‖Δ‖ it bounds every proposed weight, so honest updates skip the value pass. Computed on
     * the first check() that needs it: a round whose updates all take the checked fold never reads the base for it.
     */
    private readonly baseMaxAbsOf: () => number,
    private readonly deltaNorm: DeltaNorm,
    private readonly checkedFold: CheckedFold,
    private readonly checkedFoldBatch: CheckedFoldBatch,
    private readonly deltaSqLanes: DeltaSqLanes,
  ) {}

  get count(): number {
    return this.combiner.count;
  }

  private maxAbs: number | undefined;
  private get baseMaxAbs(): number {
    return (this.maxAbs ??= this.baseMaxAbsOf());
  }

  check(update: TensorBundle, info: UpdateInfo): Verdict {
    const layout = shapeAndSamplesProblem(update, info, this.specs, this.rules);
    if (layout) return { problem: layout };
    if (info.isDelta && !this.base) return { problem: 'delta-encoded update, but this round keeps no base model (plan.compression.delta is off)' };
    // One pass gives both: a NaN/Inf anywhere makes the norm non-finite.
    const norm = this.deltaNorm(update, !!info.isDelta, this.base, this.offsets);
    if (!Number.isFinite(norm)) {
      for (const t of update.values()) {
        for (let i = 0; i < t.data.length; i++) {
          const v = t.data[i];
          if (v - v !== 0) return { problem: `update holds non-finite values: tensor "${t.name}" holds ${Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf'} at index ${i}` };
        }
      }
      return { problem: `update delta norm overflows float64 (${norm}); values are far too large` };
    }
    const maxValue = this.rules.maxValue;
    // |x_i| ≤ |b_i| + |Δ_i| ≤ max|b| + ‖Δ‖ (without a base, norm is ‖x‖): only an update that could break the bound is scanned.
    if (maxValue !== undefined && norm + this.baseMaxAbs > maxValue) {
      const problem = valueBoundProblem(update, maxValue, info.isDelta && this.base ? { base: this.base, offsets: this.offsets } : undefined);
      if (problem) return { problem };
    }
    // Without a base the pass measured ‖x‖, not a delta: only its finiteness means anything.
    if (!this.base) return {};
    const problem = normProblem(norm, this.rules, this.normReference());
    if (problem) return { problem, norm };
    return { norm };
  }

  /** The accepted norms a relative bound compares with: this round's, plus the last round's until there are enough. */
  private normReference(): readonly number[] {
    return this.norms.length + this.previousNorms.length >= this.rules.normReference ? [...this.previousNorms, ...this.norms] : this.norms;
  }

  /**
   * check() and add() in one pass over the update, when this round can take it in before it knows the verdict: the
   * mean without clipping (checked-fold.ts; a clip factor needs the whole norm before the first value is folded) and
   * median or trimmed mean without clipping (measured while spilled). Returns the verdict; with a problem nothing is
   * counted (the mean's sums within float64 rounding, see checked-fold.ts), without one the update is counted and
   * retract() takes it out again (storing it failed). Returns undefined when this round cannot (clipping, DP): use
   * check() and then add().
   */
  checkAndAdd(update: TensorBundle, info: UpdateInfo): Verdict | undefined {
    if (this.finished) throw new Error('checkAndAdd() after finish()');
    if (this.combiner instanceof RobustCombinerAdapter && this.clipNorm === undefined) return this.checkAndSpill(this.combiner.r, update, info);
    if (!(this.combiner instanceof MeanCombiner) || this.clipNorm !== undefined) return undefined;
    const layout = shapeAndSamplesProblem(update, info, this.specs, this.rules);
    if (layout) return { problem: layout };
    if (info.isDelta && !this.base) return this.check(update, info);
    // Without a bound, the largest finite float still stops NaN and ±Inf.
    const maxValue = this.rules.maxValue ?? Number.MAX_VALUE;
    const r = this.combiner.addChecked(update, info.numSamples, !!info.isDelta, this.base, this.offsets, maxValue, this.checkedFold);
    if (!r.valuesOk || !Number.isFinite(r.norm)) {
      if (r.valuesOk) this.combiner.retract(update, info.numSamples, 1, !!info.isDelta, this.offsets); // the norm overflowed
      // Rare: the unfused check reads it again to name the tensor and index, in the same words as check().
      const v = this.check(update, info);
      return v.problem ? v : { problem: 'update holds a non-finite value or a weight beyond aggregation.validation.maxValue' };
    }
    if (!this.base) return {};
    const problem = normProblem(r.norm, this.rules, this.normReference());
    if (problem) {
      this.combiner.retract(update, info.numSamples, 1, !!info.isDelta, this.offsets);
      return { problem, norm: r.norm };
    }
    this.norms.push(r.norm);
    return { norm: r.norm };
  }

  /**
   * checkAndAdd() for median and trimmed mean without clipping: check() and add() in one read of the update (the
   * norm measured chunk by chunk while the chunk is spilled, robust.ts addMeasured). The same verdicts and norms as
   * check() then add(), and the same spill; a refused update's spill file is deleted again.
   */
  private checkAndSpill(robust: RobustCombiner, update: TensorBundle, info: UpdateInfo): Verdict {
    const layout = shapeAndSamplesProblem(update, info, this.specs, this.rules);
    if (layout) return { problem: layout };
    if (info.isDelta && !this.base) return this.check(update, info);
    const norm = robust.addMeasured(update, !!info.isDelta, this.base, info.site, this.deltaSqLanes);
    const refuse = (v: Verdict): Verdict => {
      robust.removeLast();
      return v;
    };
    // Non-finite: check() reads it again to name the tensor and index (rare).
    if (!Number.isFinite(norm)) return refuse(this.check(update, info));
    const maxValue = this.rules.maxValue;
    // As check(): only an update whose norm could break the value bound is scanned for it.
    if (maxValue !== undefined && norm + this.baseMaxAbs > maxValue) {
      const problem = valueBoundProblem(update, maxValue, info.isDelta && this.base ? { base: this.base, offsets: this.offsets } : undefined);
      if (problem) return refuse({ problem });
    }
    if (!this.base) return {};
    const problem = normProblem(norm, this.rules, this.normReference());
    if (problem) return refuse({ problem, norm });
    this.norms.push(norm);
    return { norm };
  }

  /**
   * checkAndAdd() for several waiting updates at once, in one pass over the sums (checked-fold.ts
   * CheckedFoldBatch): the verdicts, in order, are those of calling checkAndAdd() on each in turn, and with every
   * update accepted the sums are the same bit for bit, however the updates are batched. An update refused for its
   * norm is taken out again after the pass (the sums then within float64 rounding, as with checkAndAdd()). An item
   * is a decoded bundle or a reader over its file (read a block at a time: no model-sized buffer per update).
   * Clipped and DP rounds check and then fold each item (two passes over its blocks), with check() + add()'s result.
   * Undefined for median and trimmed mean (they spill one update at a time); nothing is then counted.
   */
  checkAndAddBatch(items: readonly BatchItem[]): Verdict[] | undefined {
    if (this.finished) throw new Error('checkAndAddBatch() after finish()');
    if (!(this.combiner instanceof MeanCombiner)) return undefined;
    const mean = this.combiner;
    if (this.clipNorm !== undefined) return items.map((item) => this.checkThenAddBlocks(mean, item));
    const verdicts: Verdict[] = new Array(items.length);
    const maxValue = this.rules.maxValue ?? Number.MAX_VALUE;
    // Consecutive updates of one encoding share a pass; the runs go in order, so the order of additions is kept.
    let run: { j: number; values: BaseBlocks }[] = [];
    const flush = () => {
      if (run.length === 0) return;
      const isDelta = !!items[run[0].j].info.isDelta;
      const results = mean.addCheckedBatch(run.map((r) => ({ values: r.values, weight: items[r.j].info.numSamples })), isDelta, this.base, this.offsets, maxValue, this.checkedFoldBatch);
      run.forEach((r, i) => {
        verdicts[r.j] = this.batchVerdict(items[r.j], r.values, results[i]);
      });
      for (const r of run) r.values.close();
      run = [];
    };
    items.forEach((item, j) => {
      const layout = batchLayoutProblem(item, this.specs, this.offsets, this.rules);
      const unfoldable = !!item.info.isDelta && !this.base;
      if (layout || unfoldable) {
        flush();
        verdicts[j] = layout ? { problem: layout } : { problem: 'delta-encoded update, but this round keeps no base model (plan.compression.delta is off)' };
        return;
      }
      if (run.length > 0 && !!items[run[0].j].info.isDelta !== !!item.info.isDelta) flush();
      run.push({ j, values: baseBlocks('reader' in item ? item.reader : item.update, this.offsets) });
    });
    flush();
    return verdicts;
  }

  /**
   * A clipped or DP round's item of a batch: check() then add(), each a pass over the update's blocks (the clip factor
   * needs the whole norm first), read from its file where it is one, so no model-sized buffer holds it. The verdict,
   * norm and sums of check() then add() bit for bit (the norm's lanes carry on from block to block; each sum gets
   * the same a·x).
   */
  private checkThenAddBlocks(mean: MeanCombiner, item: BatchItem): Verdict {
    const { info } = item;
    const layout = batchLayoutProblem(item, this.specs, this.offsets, this.rules);
    if (layout) return { problem: layout };
    if (info.isDelta && !this.base) return { problem: 'delta-encoded update, but this round keeps no base model (plan.compression.delta is off)' };
    const values = baseBlocks('reader' in item ? item.reader : item.update, this.offsets);
    try {
      const isDelta = !!info.isDelta;
      const lanes = new Float64Array(4);
      let sq = 0;
      for (const [, { off, n }] of this.offsets) {
        lanes.fill(0);
        for (let at = 0; at < n; at += BASE_BLOCK_FLOATS) {
          const len = Math.min(BASE_BLOCK_FLOATS, n - at);
          this.deltaSqLanes(values.block(off + at, len), isDelta || !this.base ? undefined : this.base.block(off + at, len), lanes);
        }
        sq += lanes[0] + lanes[1] + lanes[2] + lanes[3];
      }
      const norm = Math.sqrt(sq);
      if (!Number.isFinite(norm)) {
        const named = this.nameProblem(item);
        return { problem: named ?? 'update holds a non-finite value, or its delta norm overflows float64' };
      }
      const maxValue = this.rules.maxValue;
      if (maxValue !== undefined && norm + this.baseMaxAbs > maxValue) {
        const problem = blocksValueBoundProblem(values, this.offsets, maxValue, isDelta ? this.base : undefined);
        if (problem) return { problem };
      }
      if (this.base) {
        const problem = normProblem(norm, this.rules, this.normReference());
        if (problem) return { problem, norm };
      }
      const scale = this.clipNorm !== undefined && norm > this.clipNorm ? this.clipNorm / norm : 1;
      mean.addBlocks(values, info.numSamples, scale, isDelta);
      if (this.base) this.norms.push(norm);
      return this.base ? { norm } : {};
    } finally {
      values.close();
    }
  }

  /**
   * check()'s words for an item whose values failed the batch pass (rare): a bundle is checked again; a file is
   * checked again decoded whole when the item can decode it, so the refusal names the tensor and index as it does
   * one update at a time.
   */
  private nameProblem(item: BatchItem): string | undefined {
    if ('update' in item) return this.check(item.update, item.info).problem;
    return item.decode ? this.check(item.decode(), item.info).problem : undefined;
  }

  /** One update's verdict after a batch pass, decided in the batch's order (the norm reference grows as they are accepted). */
  private batchVerdict(item: BatchItem, values: BaseBlocks, r: CheckedFoldResult): Verdict {
    const mean = this.combiner as MeanCombiner;
    const { info } = item;
    if (!r.valuesOk || !Number.isFinite(r.norm)) {
      if (r.valuesOk) mean.retractBlocks(values, info.numSamples, !!info.isDelta, this.offsets); // the norm overflowed
      const named = this.nameProblem(item);
      return { problem: named ?? 'update holds a non-finite value or a weight beyond aggregation.validation.maxValue' };
    }
    if (!this.base) return {};
    const problem = normProblem(r.norm, this.rules, this.normReference());
    if (problem) {
      mean.retractBlocks(values, info.numSamples, !!info.isDelta, this.offsets);
      return { problem, norm: r.norm };
    }
    this.norms.push(r.norm);
    return { norm: r.norm };
  }

  /** Takes out an update that checkAndAdd() counted (storing it failed): the round is as if it never came. */
  retract(update: TensorBundle, info: UpdateInfo, verdict: Verdict): void {
    if (this.finished) throw new Error('retract() after finish()');
    const norm = verdict.norm;
    if (this.combiner instanceof RobustCombinerAdapter) {
      if (!this.combiner.r.remove(info.site)) throw new Error(`no update from ${info.site} to take out of the round`);
      this.forgetNorm(norm);
      return;
    }
    if (!(this.combiner instanceof MeanCombiner)) throw new Error(`strategy ${this.strategy.name} cannot take an update out of the round`);
    const scale = this.clipNorm !== undefined && norm !== undefined && norm > this.clipNorm ? this.clipNorm / norm : 1;
    this.combiner.retract(update, info.numSamples, scale, !!info.isDelta, this.offsets);
    this.forgetNorm(norm);
  }

  /**
   * Takes out an update that checkAndAddBatch() counted (storing it failed), reading it again from the item (for a
   * reader: its file, a block at a time). The same a·x comes out as went in, so the count and weights are exact and
   * the sums within float64 rounding, as with retract().
   */
  retractItem(item: BatchItem, verdict: Verdict): void {
    if (this.finished) throw new Error('retractItem() after finish()');
    if (!(this.combiner instanceof MeanCombiner)) throw new Error(`strategy ${this.strategy.name} cannot take an update out of the round`);
    const { info } = item;
    const norm = verdict.norm;
    const scale = this.clipNorm !== undefined && norm !== undefined && norm > this.clipNorm ? this.clipNorm / norm : 1;
    const values = baseBlocks('reader' in item ? item.reader : item.update, this.offsets);
    try {
      this.combiner.retractBlocks(values, info.numSamples, !!info.isDelta, this.offsets, scale);
    } finally {
      values.close();
    }
    this.forgetNorm(norm);
  }

  /** Drops a taken-out update's norm from this round's accepted norms. */
  private forgetNorm(norm: number | undefined): void {
    if (norm === undefined) return;
    const at = this.norms.lastIndexOf(norm);
    if (at >= 0) this.norms.splice(at, 1);
  }

  add(update: TensorBundle, info: UpdateInfo, verdict?: Verdict): void {
    if (this.finished) throw new Error('add() after finish()');
    if (info.isDelta && !this.base) throw new Error(`update from ${info.site} is delta-encoded, but this round keeps no base model`);
    const norm = this.base ? (verdict?.norm ?? this.deltaNorm(update, !!info.isDelta, this.base, this.offsets)) : undefined;
    const scale = this.clipNorm !== undefined && norm !== undefined && norm > this.clipNorm ? this.clipNorm / norm : 1;
    this.combiner.add(update, info.numSamples, scale, !!info.isDelta, info.site);
    if (norm !== undefined) this.norms.push(norm);
  }

  /**
   * Lowers the weight of an update already added, from info.numSamples to `to` (plan maxWeightShare, applied by the
   * round engine at close, when every weight is known). Folds (to − from) × the update again; the float64 sums make
   * that exact. Robust rules and DP weigh nothing by samples, so there it changes nothing.
   */
  reweight(update: TensorBundle, info: UpdateInfo, to: number): void {
    if (this.finished) throw new Error('reweight() after finish()');
    if (!this.combiner.reweight || to === info.numSamples) return;
    if (!(to > 0) || to > info.numSamples) throw new Error(`weight of ${info.site} can only be lowered, to a positive value (asked ${to} of ${info.numSamples})`);
    const norm = this.base ? this.deltaNorm(update, !!info.isDelta, this.base, this.offsets) : undefined;
    const scale = this.clipNorm !== undefined && norm !== undefined && norm > this.clipNorm ? this.clipNorm / norm : 1;
    this.combiner.reweight(update, info.numSamples, to, scale, !!info.isDelta, info.site);
  }

  finish(): TensorBundle {
    if (this.finished) throw new Error('finish() called twice');
    this.finished = true;
    let y: Float32Array;
    try {
      y = this.combiner.finish(this.base);
      this.strategy.applyOptimizer(this.base, y);
    } finally {
      this.base?.close();
    }
    this.strategy.roundFinished(this.norms);
    const out: NamedTensor[] = [];
    for (const s of this.specs) {
      const { off, n } = this.offsets.get(s.name)!;
      out.push({ name: s.name, dtype: 'F32', shape: [...s.shape], data: y.subarray(off, off + n) });
    }
    return makeBundle(out);
  }

  discard(): void {
    this.finished = true;
    this.base?.close();
    this.combiner.discard();
  }

  /**
   * Secure aggregation: folds the unmasked Σ wᵢΔᵢ of `sites` sites with Σ wᵢ = `totalWeight` (no single update
   * is seen, so nothing is validated or clipped here; DP noise and the server optimiser follow in finish()).
   */
  addSum(sum: TensorBundle, totalWeight: number, sites: number): void {
    if (this.finished) throw new Error('addSum() after finish()');
    if (!this.combiner.addSum || !this.base) throw new Error('secure aggregation needs strategy fedavg with the base model kept (plan aggregation.secureAggregation)');
    if (!(totalWeight > 0)) throw new Error(`secure aggregation sum carries total weight ${totalWeight}; nothing to divide by`);
    this.combiner.addSum(sum, totalWeight, sites);
  }

  /** Norms of the updates added so far (for events and tests). */
  get acceptedNorms(): readonly number[] {
    return this.norms;
  }
}

/** valueBoundProblem for an update read a block at a time (the proposed weight is base + Δ when `deltaBase` is given). */
function blocksValueBoundProblem(values: BaseBlocks, offsets: Offsets, maxValue: number, deltaBase: BaseBlocks | undefined): string | undefined {
  for (const [name, { off, n }] of offsets) {
    for (let at = 0; at < n; at += BASE_BLOCK_FLOATS) {
      const len = Math.min(BASE_BLOCK_FLOATS, n - at);
      const x = values.block(off + at, len);
      const b = deltaBase?.block(off + at, len);
      for (let i = 0; i < len; i++) {
        const v = b ? b[i] + x[i] : x[i];
        if (v > maxValue || v < -maxValue) return valueBoundMessage(v, name, at + i, maxValue);
      }
    }
  }
  return undefined;
}

/** The layout and sample-count check of a batch item: a bundle as check() does it; a file by its tensors' sizes. */
function batchLayoutProblem(item: BatchItem, specs: readonly TensorSpec[], offsets: Offsets, rules: ValidationRules): string | undefined {
  if ('update' in item) return shapeAndSamplesProblem(item.update, item.info, specs, rules);
  const reader: TensorReader = item.reader;
  for (const [name, { n }] of offsets) {
    const size = reader.size(name);
    if (size !== n) return `update does not match the plan's shared tensors: tensor "${name}" ${size === undefined ? 'is missing' : `holds ${size} values, expected ${n}`}`;
  }
  return samplesProblem(item.info, rules);
}

export { median };
