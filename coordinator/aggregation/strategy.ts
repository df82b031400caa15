/**
 * The aggregation seam. A strategy starts one aggregator per round; the aggregator checks each update
 * (check), folds the ones that pass (add), and produces the new shared weights at the end (finish).
 * Strategies are composed from parts (combine rule, server optimiser, filters: composed.ts), not subclassed.
 */
import type { TensorBundle, TensorSpec } from '../../shared/tensors/bundle.ts';
import type { RoundBase, TensorReader } from './base-blocks.ts';

export interface UpdateInfo {
  readonly site: string;
  readonly numSamples: number;
  /** The update holds x_i − x_base (a delta-encoded upload) instead of the weights x_i. */
  readonly isDelta?: boolean;
}

/** The outcome of check(): a reason to refuse, or what add() may reuse (the delta's L2 norm). */
export interface Verdict {
  readonly problem?: string;
  readonly norm?: number;
}

/** One of several waiting updates handed over at once: decoded, or a reader over its (float32) file. */
export type BatchItem =
  | { readonly update: TensorBundle; readonly info: UpdateInfo }
  | {
      readonly reader: TensorReader;
      readonly info: UpdateInfo;
      /** The whole update decoded: only to name the tensor and index of a refused update's bad value (rare). */
      readonly decode?: () => TensorBundle;
    };

export interface RoundContext {
  /** Sites asked this round (the expected count DP divides by). */
  readonly expected?: number;
  /** Updates may arrive delta-encoded (plan.compression.delta): keep the base model. */
  readonly deltaUpdates?: boolean;
}

export interface RoundAggregator {
  /**
   * Checks an update against the plan's rules without changing any state; an update with a problem
   * must not be passed to add(). Pure: calling it and then refusing leaves the round untouched.
   */
  check(update: TensorBundle, info: UpdateInfo): Verdict;
  /**
   * check() and add() in one pass over the update, where the strategy can: the verdict, and the update counted
   * when it has no problem (nothing counted when it has one). Undefined when this round cannot fold while it
   * checks; then check() and add() as usual.
   */
  checkAndAdd?(update: TensorBundle, info: UpdateInfo): Verdict | undefined;
  /**
   * checkAndAdd() for several waiting updates in one pass over the round's state: the verdicts of calling it on each
   * in turn, and the same result. Undefined when this round cannot (nothing counted); then one at a time.
   */
  checkAndAddBatch?(items: readonly BatchItem[]): Verdict[] | undefined;
  /** Takes out an update that checkAndAddBatch() counted (e.g. storing it failed). Given wherever checkAndAddBatch is. */
  retractItem?(item: BatchItem, verdict: Verdict): void;
  /** Takes out an update that checkAndAdd() counted (e.g. storing it failed). Given wherever checkAndAdd is. */
  retract?(update: TensorBundle, info: UpdateInfo, verdict: Verdict): void;
  /** Folds one checked update in. Must not keep a reference to `update`'s arrays. */
  add(update: TensorBundle, info: UpdateInfo, verdict?: Verdict): void;
  readonly count: number;
  /**
   * The new shared weights; call once, after the last add. The tensors may share memory with the
   * strategy (no model-sized copy), so consume them before the strategy's next begin().
   */
  finish(): TensorBundle;
  /**
   * Lowers the weight of an update already added from info.numSamples to `to` (plan maxWeightShare). Optional:
   * a strategy that weighs nothing by samples (median, DP) may leave it out or ignore it.
   */
  reweight?(update: TensorBundle, info: UpdateInfo, to: number): void;
  /** Drops a round that will not finish (no quorum): deletes what it spilled. */
  discard?(): void;
}

/** What a strategy carries from round to round (server-optimiser moments, recent norms), for the store. */
export interface StrategyState {
  readonly json: string;
  /** Model-sized state (e.g. Adam's m and v), stored as a safetensors file next to the models. */
  readonly tensors?: TensorBundle;
}

export interface AggregationStrategy {
  readonly name: string;
  /**
   * `current` holds the shared tensors of the round's base model: decoded, or a reader over its file (the
   * coordinator's case; the round reads it a block at a time and closes it at finish() or discard()). It must not
   * change while the round runs.
   */
  begin(current: RoundBase, specs: readonly TensorSpec[], ctx?: RoundContext): RoundAggregator;
  /** State after the last finish(), or undefined when the strategy keeps none. */
  exportState?(): StrategyState | undefined;
  /** Continues from state exported by an earlier process. */
  restoreState?(s: StrategyState): void;
  /** Forgets all carried state (a round's result was not published, or the operator rolled back). */
  reset?(): void;
}
