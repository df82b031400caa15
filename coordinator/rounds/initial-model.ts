/** The federation's first global model (round 0), written once when the store has none. */
import { pick } from '../../shared/model/sharing.ts';
import type { ModelArchitecture, ParamInfo } from '../../shared/model/types.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { CoordinatorStore } from '../store/store.ts';

export interface InitialModelOptions {
  store: CoordinatorStore;
  models: ModelFiles;
  plan: Plan;
  architecture: ModelArchitecture;
  shared: ParamInfo[];
  log: Logger;
  /** All weights of the first global model (plan.model.init); default: the architecture's own initialisation. */
  initialWeights?: () => Promise<TensorBundle>;
}

/** Writes the shared tensors of the first model and makes it current, unless a current model exists. */
export async function ensureInitialModel(o: InitialModelOptions): Promise<void> {
  const { store, models, architecture, plan } = o;
  if (store.getMeta('current_model')) return;
  const all = o.initialWeights ? await o.initialWeights() : architecture.init(plan.model.seed);
  const init = pick(all, o.shared);
  const saved = models.save(init, { architecture: architecture.id, round: '0', kind: 'initial' });
  store.addModel({ hash: saved.hash, path: saved.path, round: 0, sizeBytes: saved.sizeBytes, createdAt: Date.now() });
  store.setMeta('current_model', saved.hash);
  o.log.info({ model: saved.hash, params: o.shared.length, bytes: saved.sizeBytes }, 'initial global model written');
}
