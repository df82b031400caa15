import { rmSync } from 'node:fs';
import type { Plan } from '../../shared/plan/schema.ts';
import { ComposedStrategy, type ComposedOptions } from './composed.ts';

/** The plan's aggregation section as one composed strategy (composed.ts); defaults = streaming FedAvg. */
export function strategyFromPlan(plan: Plan, opts: ComposedOptions = {}): ComposedStrategy {
  // Spill files of a round left open by a crash: the engine re-adds that round's updates from the store.
  if (opts.spillDir) rmSync(opts.spillDir, { recursive: true, force: true });
  return new ComposedStrategy(plan.aggregation, opts);
}
