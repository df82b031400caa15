/**
 * Every architecture MedFL can train, listed once. Adding a model: write its module under `models/` (a
 * ModelDefinition) and add it to MODELS; the plan schema, the trainer factory and `medfl model export` read it here.
 */
import type { Plan } from '../plan/schema.ts';
import type { ModelDefinition } from './model-definition.ts';
import { med3dModel } from './models/med3d.ts';
import { tiny3dModel } from './models/tiny3d.ts';
import type { ModelArchitecture } from './types.ts';

export const MODELS = [tiny3dModel, med3dModel] as const;

export type ModelId = (typeof MODELS)[number]['id'];

/** The architecture names plans accept, first = the default. */
export const MODEL_IDS = MODELS.map((m) => m.id) as [ModelId, ...ModelId[]];

/** The definition of a registered architecture; an unknown name is refused with the names there are. */
export function modelDefinition(id: string): ModelDefinition {
  const def = MODELS.find((m) => m.id === id);
  if (!def) throw new Error(`unknown model architecture "${id}" (registered: ${MODEL_IDS.join(', ')})`);
  return def;
}

/** The architecture a plan's `model` section names. */
export function architectureFor(model: Plan['model']): ModelArchitecture {
  return modelDefinition(model.architecture).create(model);
}
