/**
 * What aggregation carries across rounds (a server optimiser's moments, recent norms): restored from the store at
 * start-up and after a close that was not committed, written in each close's transaction, and its superseded tensor
 * file deleted once the next one is durable.
 */
import { rmSync } from 'node:fs';
import type { Logger } from '../../shared/util/log.ts';
import type { AggregationStrategy } from '../aggregation/strategy.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { CoordinatorStore } from '../store/store.ts';

/** Store meta keys of what aggregation carries across rounds (written in the round-close transaction). */
export const AGGREGATION_STATE_KEY = 'aggregation_state';

interface StoredState {
  json: string;
  tensors: string | null;
}

export class AggregationState {
  constructor(
    private readonly store: CoordinatorStore,
    private readonly models: ModelFiles,
    private readonly strategy: AggregationStrategy,
    private readonly log: Logger,
  ) {}

  /** The strategy's state from the store, so a restarted coordinator continues it. */
  restore(): void {
    const raw = this.store.getMeta(AGGREGATION_STATE_KEY);
    if (raw && this.strategy.restoreState) {
      const s = JSON.parse(raw) as StoredState;
      this.strategy.restoreState({ json: s.json, tensors: s.tensors ? this.models.load(s.tensors) : undefined });
      this.log.info({ strategy: this.strategy.name, tensors: s.tensors?.slice(0, 12) ?? null }, 'aggregation state restored');
    }
  }

  /** Back to the state last committed (a finished aggregator already moved it on in memory). */
  reset(): void {
    this.strategy.reset?.();
    this.restore();
  }

  /**
   * The server optimiser's moments (FedAdam, …) belong to the restoration objective's updates: the fine-tuning
   * stage starts them afresh instead of steering its first steps with another objective's history.
   */
  forgetPretraining(): void {
    if (!this.store.getMeta(AGGREGATION_STATE_KEY)) return;
    this.strategy.reset?.();
    this.store.deleteMeta(AGGREGATION_STATE_KEY);
    this.log.info({ strategy: this.strategy.name }, "fine-tuning starts with fresh aggregation state (the pretraining stage's is dropped)");
  }

  /** The stored state now (read before a close, to prune what the close supersedes). */
  stored(): string | undefined {
    return this.store.getMeta(AGGREGATION_STATE_KEY);
  }

  /** The strategy's state after round `round` as store meta (its tensors saved as a file), or nothing if it has none. */
  exportMeta(round: number): Record<string, string> {
    const state = this.strategy.exportState?.();
    if (!state) return {};
    const tensors = state.tensors ? this.models.save(state.tensors, { kind: 'aggregation-state', round: String(round) }).hash : null;
    return { [AGGREGATION_STATE_KEY]: JSON.stringify({ json: state.json, tensors }) };
  }

  /** After a committed close: deletes the tensor file of the state `previous` unless `meta` still names it. Throws what deleting threw. */
  pruneSuperseded(previous: string | undefined, meta: Record<string, string>): void {
    const oldTensors = previous ? (JSON.parse(previous) as StoredState).tensors : null;
    const newTensors = meta[AGGREGATION_STATE_KEY] ? (JSON.parse(meta[AGGREGATION_STATE_KEY]) as StoredState).tensors : oldTensors;
    if (oldTensors && oldTensors !== newTensors && !this.store.getModel(oldTensors)) rmSync(this.models.pathFor(oldTensors), { force: true });
  }
}
