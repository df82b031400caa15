/**
 * The aggregation seam. A strategy starts one aggregator per round; the aggregator folds updates in
 * as they arrive (streaming, so memory stays O(model)) and produces the new shared weights at the end.
 * More strategies (median, trimmed mean, server optimisers, DP) plug in here without touching rounds.
 */
import type { TensorBundle, TensorSpec } from '../../shared/tensors/bundle.ts';

export interface UpdateInfo {
  readonly site: string;
  readonly numSamples: number;
}

export interface RoundAggregator {
  /** Folds one validated update in. Must not keep a reference to `update`'s arrays. */
  add(update: TensorBundle, info: UpdateInfo): void;
  readonly count: number;
  /**
   * The new shared weights; call once, after the last add. The tensors may share memory with the
   * strategy (no model-sized copy), so consume them before the strategy's next begin().
   */
  finish(): TensorBundle;
}

export interface AggregationStrategy {
  readonly name: string;
  /** `current` holds the shared tensors of the round's base model. */
  begin(current: TensorBundle, specs: readonly TensorSpec[]): RoundAggregator;
}
