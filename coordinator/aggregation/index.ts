import type { Plan } from '../../shared/plan/schema.ts';
import { FedAvg } from './fedavg.ts';
import type { AggregationStrategy } from './strategy.ts';

export function strategyFromPlan(plan: Plan): AggregationStrategy {
  switch (plan.aggregation.strategy) {
    case 'fedavg':
      return new FedAvg();
  }
}
