/**
 * The trainer for an architecture: Med3D runs on our Float32Array engine with the selected convolution
 * kernels (oneDNN or JS); the small tiny3d net runs on the selected tfjs engine. Both report their engine.
 */
import { selectConvKernels } from '../engine/conv-select.ts';
import { selectEngine, type EngineAttempt } from '../engine/select.ts';
import { MED3D_ID, type Med3dArchitecture } from './med3d.ts';
import { createMed3dTrainer } from './med3d-trainer.ts';
import { createTfjsTrainer } from './tfjs-trainer.ts';
import type { ModelArchitecture, Trainer } from './types.ts';

export interface TrainerChoice {
  readonly trainer: Trainer;
  /** Every engine considered, in order, with why it was or was not used. */
  readonly tried: readonly EngineAttempt[];
}

export async function createTrainer(arch: ModelArchitecture, opts: { engine?: string; kernels?: string } = {}): Promise<TrainerChoice> {
  if (arch.id === MED3D_ID) {
    const sel = await selectConvKernels({ force: opts.kernels });
    return { trainer: createMed3dTrainer(arch as Med3dArchitecture, sel.kernels), tried: sel.tried };
  }
  const engine = await selectEngine({ force: opts.engine });
  return { trainer: createTfjsTrainer(arch, engine), tried: engine.tried };
}
