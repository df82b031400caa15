/**
 * Federated self-supervised pretraining SIMULATED IN ONE PROCESS, for `medfl experiment` (an init that starts
 * from an encoder the sites pretrained together): the very site code of a real pretraining round
 * (LocalTraining → pretraining-round.ts: data loader, corruptions, restoration decoder kept per site) and the
 * plan's aggregation (strategyFromPlan), round after round, without gRPC or a coordinator store. It writes the
 * same encoder file a coordinator writes when its pretraining stage ends (pretrained-encoder-file.ts), which
 * `model.init: pretrained` and `medfl experiment --pretrained` read.
 *
 * The plan's `pretraining` section gives rounds, steps, learning rate and corruptions; it runs whether or not
 * `pretraining.enabled` is set (that switch is for a real coordinator's stage).
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Plan } from '../shared/plan/schema.ts';
import type { Logger } from '../shared/util/log.ts';
import type { EncoderProvenance } from '../shared/model/pretrained-encoder-file.ts';
import type { Med3dArchitecture } from '../shared/model/med3d.ts';
import { generatedSiteName } from '../shared/protocol/site-names.ts';

export interface FederatedPretrainingOptions {
  /** Site data folders (MSD layout); every scan in them is pretraining data. Never the test folder. */
  siteDirs: readonly string[];
  plan: Plan;
  /** The model seed (initial encoder, each site's decoder, batches and corruptions). */
  seed: number;
  /** The encoder file and the sites' local folders (their decoders) go here. */
  outDir: string;
  log: Logger;
  engine?: string;
  /** Progress lines for a terminal, one per round. */
  say?: (line: string) => void;
}

export interface FederatedPretrainingResult {
  /** The encoder file (MedFL safetensors with provenance metadata). */
  encoderPath: string;
  provenance: EncoderProvenance;
  /** Wall-clock seconds of the whole stage. */
  seconds: number;
  secondsPerRound: number[];
  /** Restoration loss per round: mean over sites of each site's last-quarter training loss. */
  lossPerRound: number[];
  /** Mean over sites of each site's first-step loss, per round. */
  firstLossPerRound: number[];
}

export async function simulateFederatedPretraining(o: FederatedPretrainingOptions): Promise<FederatedPretrainingResult> {
  const [{ LocalTraining }, { architectureFor }, { sharedParams, pick }, { strategyFromPlan }, { decodeUpdate }, { encodeSafetensors, decodeSafetensors }, { TaskSettingsSchema }, { stageSettings }, encoderFile] =
    await Promise.all([
      import('../site-agent/training/local-training.ts'),
      import('../shared/model/registry.ts'),
      import('../shared/model/sharing.ts'),
      import('../coordinator/aggregation/index.ts'),
      import('../shared/tensors/update-codec.ts'),
      import('../shared/tensors/safetensors.ts'),
      import('../shared/protocol/task.ts'),
      import('../coordinator/rounds/pretraining-stage.ts'),
      import('../shared/model/pretrained-encoder-file.ts'),
    ]);
  const started = performance.now();
  if (o.plan.model.architecture !== 'med3d') throw new Error('federated pretraining needs model.architecture med3d');
  if (o.siteDirs.length === 0) throw new Error('federated pretraining needs at least one site folder');
  const out = resolve(o.outDir);
  mkdirSync(out, { recursive: true });
  const plan: Plan = { ...o.plan, model: { ...o.plan.model, seed: o.seed }, pretraining: { ...o.plan.pretraining, enabled: true } };
  const arch = architectureFor(plan.model) as Med3dArchitecture;
  const shared = sharedParams(arch, plan.share);
  const siteNames = o.siteDirs.map((_, i) => generatedSiteName(i));
  // A fresh stage: decoders left by an earlier run in the same folder would start this one half-trained.
  rmSync(join(out, 'sites'), { recursive: true, force: true });
  const sites = o.siteDirs.map((d, i) => {
    const localDir = join(out, 'sites', siteNames[i], 'local');
    mkdirSync(localDir, { recursive: true });
    return new LocalTraining({ siteName: siteNames[i], dataDir: resolve(d), localDir, log: o.log, ...(o.engine ? { engine: o.engine } : {}) });
  });
  const strategy = strategyFromPlan(plan, { spillDir: join(out, 'spill') });
  const scratch = arch.init(o.seed);
  let global = pick(scratch, shared);
  const lossPerRound: number[] = [];
  const firstLossPerRound: number[] = [];
  const secondsPerRound: number[] = [];

  for (let r = 1; r <= plan.pretraining.rounds; r++) {
    const t0 = performance.now();
    const settings = TaskSettingsSchema.parse({
      federation: 'medfl-experiment',
      model: { ...plan.model, pretrained: undefined, source2d: undefined },
      local: plan.local,
      share: plan.share,
      sharedTensors: shared.map((p) => p.name),
      data: plan.data,
      totalRounds: plan.rounds,
      ...stageSettings(plan, { kind: 'pretraining', index: r }),
    });
    const agg = strategy.begin(global, shared, { expected: sites.length });
    const losses: number[] = [];
    const firsts: number[] = [];
    for (const [i, lt] of sites.entries()) {
      const res = await lt.run(settings, encodeSafetensors(global), { round: r });
      const d = decodeUpdate(res.update);
      const info = { site: siteNames[i], numSamples: res.numSamples, isDelta: d.isDelta };
      const verdict = agg.check(d.bundle, info);
      if (verdict.problem) throw new Error(`pretraining round ${r}: the aggregation refused ${siteNames[i]}'s update: ${verdict.problem}`);
      agg.add(d.bundle, info, verdict);
      losses.push(res.metrics.restoration_loss);
      firsts.push(res.metrics.restoration_loss_first);
    }
    // A copy: the aggregate's arrays may be reused by the strategy's next round.
    global = decodeSafetensors(encodeSafetensors(agg.finish())).bundle;
    lossPerRound.push(mean(losses));
    firstLossPerRound.push(mean(firsts));
    secondsPerRound.push((performance.now() - t0) / 1000);
    o.log.info({ round: r, rounds: plan.pretraining.rounds, loss: lossPerRound[r - 1], seconds: secondsPerRound[r - 1] }, 'simulated pretraining round done');
    o.say?.(`  pretraining round ${r}/${plan.pretraining.rounds}: restoration loss ${lossPerRound[r - 1].toFixed(4)} (first step ${firstLossPerRound[r - 1].toFixed(4)}), ${secondsPerRound[r - 1].toFixed(0)} s`);
  }

  const { bundle, notPretrained } = encoderFile.assembleEncoder(arch, global, scratch);
  const { path, provenance } = encoderFile.writePretrainedEncoder(out, arch, bundle, {
    objective: plan.pretraining.objective,
    sites: siteNames,
    rounds: plan.pretraining.rounds,
    stepsPerRound: plan.pretraining.steps,
    learningRate: plan.pretraining.learningRate,
    transforms: plan.pretraining.transforms,
    federation: 'medfl-experiment',
    createdAt: new Date().toISOString(),
    notPretrained,
  });
  return { encoderPath: path, provenance, seconds: (performance.now() - started) / 1000, secondsPerRound, lossPerRound, firstLossPerRound };
}

const mean = (xs: readonly number[]) => xs.reduce((a, v) => a + v, 0) / xs.length;
