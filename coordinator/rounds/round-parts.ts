/**
 * What the round lifecycle's steps (opening, close, recovery) are built from: the engine's store, model files, plan,
 * strategy, shared tensors, feature hooks, events and log, passed through unchanged.
 */
import type { ParamInfo } from '../../shared/model/types.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { AggregationStrategy } from '../aggregation/strategy.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { FeatureHooks } from './feature-hooks.ts';
import type { RoundEvents } from './round-events.ts';

export interface RoundParts {
  store: CoordinatorStore;
  models: ModelFiles;
  plan: Plan;
  strategy: AggregationStrategy;
  shared: ParamInfo[];
  features: FeatureHooks;
  events: RoundEvents;
  log: Logger;
}
