/** What a coordinator hands its round engine. */
import type { EventBus } from '../../shared/events/bus.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { AggregationStrategy } from '../aggregation/strategy.ts';
import type { RefusalWarnings } from '../events/refusal-warnings.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { StandardFeatureOptions } from './features/index.ts';
import type { RoundFeature } from './round-feature.ts';
import type { TaskSigner } from './task-signer.ts';

/** The standard features' own options (where they keep files) pass through the engine untouched. */
export interface RoundEngineOptions extends StandardFeatureOptions {
  store: CoordinatorStore;
  models: ModelFiles;
  plan: Plan;
  architecture: ModelArchitecture;
  strategy: AggregationStrategy;
  bus: EventBus;
  federationId: string;
  /** Signs every task sent to sites (task-signer.ts; the coordinator's: keyTaskSigner with its Ed25519 key). */
  signTask: TaskSigner;
  log: Logger;
  /** Extra time given to an open round found at start-up, so sites can reconnect after a coordinator restart. */
  resumeGraceMs?: number;
  /** All weights of the first global model (plan.model.init); only called when there is no model yet. */
  initialWeights?: () => Promise<TensorBundle>;
  /** How often the engine looks for a rollback made by `medfl coordinator rollback` (default 2 s). */
  rollbackPollMs?: number;
  /** How long to wait before trying again when opening, closing or failing a round hit a storage failure such as a full disk (default 10 s). */
  storageRetryMs?: number;
  /** Least time between two offers of a round's task to one site that reports idle without it (default REOFFER_MS). */
  reofferMs?: number;
  /** Features beyond the standard ones (features/index.ts), called after them (round-feature.ts). */
  features?: RoundFeature[];
  /** Collapses the warn lines of repeated refused uploads (default: one of the engine's own, closed by stop()). */
  refusals?: RefusalWarnings;
}
