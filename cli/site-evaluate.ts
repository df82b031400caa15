/**
 * `medfl site evaluate`: how the federation's model does on this site's own labelled scans — a global model
 * version (shared tensors) with this site's own tensors (its head, and what the plan keeps local), scored on a
 * labelled folder at full resolution. Runs inside the site; nothing is sent anywhere.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Plan } from '../shared/plan/schema.ts';
import type { Logger } from '../shared/util/log.ts';

export interface SiteEvaluateOptions {
  /** Enrolled site directory (its local tensors live in <dir>/local). */
  dir: string;
  /** The site's data folder (for its dataset.json: labels and channels). */
  data: string;
  /** Labelled folder to score: imagesTs/ + labelsTs/, or an MSD folder with labels. */
  test: string;
  /** Global model version (MedFL safetensors of the shared tensors). */
  model: string;
  /** The federation's plan (model, share and data settings decide the architecture and the site's local file). */
  plan: Plan;
  engine?: string;
  /** Default: the site-evaluate logger at MEDFL_LOG_LEVEL. */
  log?: Logger;
}

export interface SiteEvaluation {
  meanDice: number;
  dicePerClass: readonly number[];
  cases: number;
}

export async function runSiteEvaluate(o: SiteEvaluateOptions): Promise<SiteEvaluation> {
  const [{ LocalTraining }, { SiteHome }, { architectureFor }, { sharedParams }, { taskSettingsForPlan }, { loadTestCases, siteMeta }, { createLogger }] = await Promise.all([
    import('../site-agent/training/local-training.ts'),
    import('../site-agent/home.ts'),
    import('../shared/model/registry.ts'),
    import('../shared/model/sharing.ts'),
    import('../shared/protocol/task.ts'),
    import('./experiment/data.ts'),
    import('../shared/util/log.ts'),
  ]);
  const home = new SiteHome(resolve(o.dir));
  const siteName = home.config().siteName;
  const log = o.log ?? createLogger('site-evaluate', { site: siteName });
  const plan = o.plan;
  const arch = architectureFor(plan.model);
  const settings = taskSettingsForPlan(plan, 'medfl-evaluate', sharedParams(arch, plan.share).map((p) => p.name));
  const lt = new LocalTraining({ siteName, dataDir: resolve(o.data), localDir: home.localDir, log, engine: o.engine });
  if (!lt.hasLocalTensors(settings)) {
    throw new Error(`this site has no local tensors for the plan's model (${home.localDir}): it has not trained in this federation, or the plan differs from the one it trained with`);
  }
  const patch = [...plan.model.patch] as [number, number, number];
  const test = await loadTestCases(resolve(o.test), siteMeta(resolve(o.data)), patch, { ...(plan.data.spacing ? { spacing: plan.data.spacing } : {}), normalization: plan.data.normalization, biasCorrection: plan.data.biasCorrection });
  const r = await lt.evaluateModel(settings, readFileSync(resolve(o.model)), test.cases);
  return { meanDice: r.meanDice, dicePerClass: r.dicePerClass, cases: test.cases.length };
}
