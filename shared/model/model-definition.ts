/**
 * What an architecture tells the rest of MedFL about itself. Each model is one module under `models/` that exports a
 * ModelDefinition, and the registry (registry.ts) lists them once: the plan schema takes its architecture names and
 * model-section checks from there, the trainer factory its trainers, `medfl model export` its export formats.
 */
import type { EngineAttempt } from '../engine/select.ts';
import type { Plan } from '../plan/schema.ts';
import type { LayerType, ModelArchitecture, Trainer } from './types.ts';

/** The plan's validated `model` section. */
export type PlanModel = Plan['model'];

/** A problem with a plan, located by its path (relative to `model` in modelProblems, to the plan's root in planProblems). */
export interface PlanProblem {
  readonly path: readonly (string | number)[];
  readonly message: string;
}

export interface TrainerChoice {
  readonly trainer: Trainer;
  /** Every engine considered, in order, with why it was or was not used. */
  readonly tried: readonly EngineAttempt[];
}

export interface TrainerOptions {
  /** Forced tfjs engine (MEDFL_ENGINE), for architectures that train on tfjs. */
  readonly engine?: string;
  /** Forced convolution kernels (MEDFL_KERNELS), for architectures that train on MedFL's tape. */
  readonly kernels?: string;
}

/** File formats `medfl model export` can write for an architecture. */
export type ExportFormat = 'torch' | 'onnx';

export interface ModelDefinition<Id extends string = string> {
  /** Stable name written into plans and model files (`model.architecture`). */
  readonly id: Id;
  /** One line for docs and errors. */
  readonly summary: string;
  /** The architecture a validated plan's model section describes. */
  create(model: PlanModel): ModelArchitecture;
  /** Problems within the model section (the plan schema reports them with their line, at the coordinator and at sites). */
  modelProblems(model: PlanModel): PlanProblem[];
  /** Problems between the model and the plan's other sections (checked when a plan file is read). */
  planProblems(plan: Plan): PlanProblem[];
  /** Layer types kept at each site when the plan leaves `share.keepLocal` out (FedBN for layers with running statistics). */
  defaultKeepLocal(model: PlanModel): readonly LayerType[];
  /** A trainer on the best engine this machine offers; its engine code is loaded only here (a coordinator never trains). */
  createTrainer(arch: ModelArchitecture, opts: TrainerOptions): Promise<TrainerChoice>;
  /** What `medfl model export` writes for this architecture (none: it refuses, naming the ones that can). */
  readonly exportFormats: readonly ExportFormat[];
}
