/**
 * The federation's first global model, made the way the plan's `model.init` says: from scratch, from
 * pretrained weights (all, or the lowest k stages), Mean-Var from pretrained statistics, or inflated
 * from a 2D network. Paths in the plan are relative to the plan file.
 */
import { readFileSync, existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import type { Plan } from '../../shared/plan/schema.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { initStrategyFromSpec, source2dFromTorch, summarizeInitReport } from '../../shared/model/transfer-init.ts';
import { readTorchCheckpointFile } from '../../shared/checkpoints/pth.ts';
import type { Logger } from '../../shared/util/log.ts';

export async function initialWeights(arch: ModelArchitecture, plan: Plan, planPath: string | undefined, log: Logger): Promise<TensorBundle> {
  const strategy = initStrategyFromSpec(plan.model.init);
  const base = planPath ? dirname(planPath) : process.cwd();
  const file = (key: 'pretrained' | 'source2d'): string => {
    const p = plan.model[key];
    if (!p) throw new Error(`plan model.init is '${strategy.name}', which needs model.${key}: ${key === 'pretrained' ? 'a .safetensors from `medfl model import`' : 'a torchvision-layout 2D ResNet (.pth or .safetensors)'}`);
    const abs = resolve(base, p);
    if (!existsSync(abs)) throw new Error(`plan model.${key}: no file at ${abs}`);
    return abs;
  };
  const pretrained = strategy.needs === 'pretrained' ? decodeSafetensors(readFileSync(file('pretrained'))).bundle : undefined;
  const source2d = strategy.needs === 'source2d' ? source2dFromTorch((await readTorchCheckpointFile(file('source2d'))).tensors) : undefined;
  const result = strategy.init(arch, { seed: plan.model.seed, pretrained, source2d });
  log.info({ init: strategy.name, summary: summarizeInitReport(result.report) }, 'initial global model made');
  return result.weights;
}
