/**
 * The trainer for an architecture, from its registered definition: Med3D runs on MedFL's Float32Array tape with the
 * selected convolution kernels (oneDNN or JS); the small tiny3d net on the selected tfjs engine. Both report their engine.
 */
import type { TrainerChoice, TrainerOptions } from './model-definition.ts';
import { modelDefinition } from './registry.ts';
import type { ModelArchitecture } from './types.ts';

export async function createTrainer(arch: ModelArchitecture, opts: TrainerOptions = {}): Promise<TrainerChoice> {
  return modelDefinition(arch.id).createTrainer(arch, opts);
}
