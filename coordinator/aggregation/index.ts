import type { Plan } from '../../shared/plan/schema.ts';
import { ComposedStrategy, type ComposedOptions } from './composed.ts';

/** The plan's aggregation section as one composed strategy (composed.ts); defaults = streaming FedAvg. */
export function strategyFromPlan(plan: Plan, opts: ComposedOptions = {}): ComposedStrategy {
  return new ComposedStrategy(plan.aggregation, opts);
}
