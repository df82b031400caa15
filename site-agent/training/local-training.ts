/**
 * One round of local work at a site: merge the global shared tensors with the site's own tensors
 * (its head, and anything the plan keeps local), train on local scans, evaluate on local held-back
 * cases, keep the local tensors here, and return only the shared tensors as the update.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { architectureFor } from '../../shared/model/registry.ts';
import { localParams, merge, pick } from '../../shared/model/sharing.ts';
import type { ModelArchitecture, Trainer, VolumeCase } from '../../shared/model/types.ts';
import { createTrainer } from '../../shared/model/trainer-factory.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { checkAgainstSpecs, findNonFinite, type TensorBundle } from '../../shared/tensors/bundle.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { patchToVolumeCase, SiteData } from '../data/site-data.ts';
import { augmentOptions, DataSettingsSchema, siteDataOptions } from '../data/settings.ts';
import type { PreparedCase } from '../data/types.ts';
import type { Logger } from '../../shared/util/log.ts';

export interface LocalTrainingOptions {
  siteName: string;
  dataDir: string;
  localDir: string;
  log: Logger;
  engine?: string;
}

export interface LocalRoundResult {
  /** safetensors bytes of exactly the plan's shared tensors. */
  update: Buffer;
  numSamples: number;
  /** Aggregate numbers only: losses, Dice means, counts. */
  metrics: Record<string, number>;
}

export class LocalTraining {
  engineName: string | undefined;
  private trainer: { key: string; trainer: Trainer } | undefined;
  private dataset: { key: string; data: SiteData } | undefined;

  constructor(private readonly o: LocalTrainingOptions) {}

  async run(settings: TaskSettings, modelBytes: Buffer, ctx: { round: number; onProgress?: (p: number) => void }): Promise<LocalRoundResult> {
    const { log } = this.o;
    const arch = architectureFor(settings.model);
    const trainer = await this.trainerFor(arch, settings);
    const dataSettings = settings.data ?? DataSettingsSchema.parse({});
    const data = await this.siteDataFor(settings);
    const usable = data.train.filter((r) => !data.isBad(r));
    if (usable.length === 0) {
      throw new Error(`no usable labelled training cases in the site's data folder (${data.skipped().length} skipped); run \`medfl site check-data\` to see why`);
    }
    const augment = augmentOptions(dataSettings);
    // Patches come from the site's bounded cache, one batch at a time; whole volumes are never all in memory.
    const source = {
      cases: usable.length,
      sample: async (count: number, rng: () => number) =>
        (await data.sampleBatch(data.train, count, rng, { augment })).map((p, i) => patchToVolumeCase(p, `batch-${i}`)),
    };

    const global = decodeSafetensors(modelBytes).bundle;
    const sharedSpecs = arch.params().filter((p) => settings.sharedTensors.includes(p.name));
    const problem = checkAgainstSpecs(global, sharedSpecs) ?? findNonFinite(global);
    if (problem) throw new Error(`the global model does not fit this site's architecture: ${problem}`);

    const local = this.loadLocal(arch, settings);
    const start = merge(merge(arch.init(this.siteSeed(settings.model.seed)), local), global);
    const steps = settings.local.steps ?? Math.max(1, Math.ceil(((settings.local.epochs ?? 1) * usable.length) / settings.local.batchSize));
    const t0 = performance.now();
    log.info({ round: ctx.round, steps, engine: trainer.engine, trainCases: usable.length }, 'local training started');
    const result = await trainer.train({
      weights: start,
      cases: [],
      source,
      steps,
      batchSize: settings.local.batchSize,
      learningRate: settings.local.learningRate,
      seed: this.siteSeed(settings.model.seed) + ctx.round,
      proximalMu: settings.local.proximalMu,
      optimizer: settings.local.optimizer,
      onStep: (s) => ctx.onProgress?.((s + 1) / steps),
    });
    const trainSeconds = (performance.now() - t0) / 1000;
    const val = await this.validationCases(data);
    const evaluation = val.length > 0 ? await trainer.evaluate(result.weights, val) : undefined;

    this.saveLocal(arch, settings, result.weights);
    const update = pick(result.weights, settings.sharedTensors.map((name) => ({ name })));
    const metrics: Record<string, number> = {
      train_loss: result.loss,
      train_loss_first: result.firstLoss,
      num_train: result.samples,
      num_val: val.length,
      train_seconds: trainSeconds,
    };
    if (evaluation) {
      metrics.val_dice_mean = evaluation.meanDice;
      evaluation.dicePerClass.forEach((d, i) => { metrics[`val_dice_class_${i + 1}`] = d; });
    }
    log.info({ round: ctx.round, loss: round4(result.loss), firstLoss: round4(result.firstLoss), valDice: evaluation ? round4(evaluation.meanDice) : null, seconds: round4(trainSeconds) }, 'local training done');
    return { update: encodeSafetensors(update, { round: String(ctx.round) }), numSamples: result.samples, metrics };
  }

  private async trainerFor(arch: ModelArchitecture, settings: TaskSettings): Promise<Trainer> {
    const key = JSON.stringify(settings.model);
    if (this.trainer?.key !== key) {
      const { trainer, tried } = await createTrainer(arch, { engine: this.o.engine });
      this.engineName = trainer.engine;
      this.o.log.info({ engine: trainer.engine, architecture: arch.id, tried }, 'compute engine selected');
      this.trainer = { key, trainer };
    }
    return this.trainer.trainer;
  }

  private async siteDataFor(settings: TaskSettings): Promise<SiteData> {
    const dataSettings = settings.data ?? DataSettingsSchema.parse({});
    const key = JSON.stringify({ patch: settings.model.patch, data: dataSettings });
    if (this.dataset?.key !== key) {
      const patch = [...settings.model.patch] as [number, number, number];
      const data = await SiteData.open(this.o.dataDir, siteDataOptions(dataSettings, patch, this.o.log));
      if (data.skipped().length > 0) this.o.log.warn({ skipped: data.skipped().length }, 'some cases are unusable and are skipped (see debug log or `medfl site check-data`)');
      this.dataset = { key, data };
    }
    return this.dataset.data;
  }

  /** Held-back validation cases (imagesTs + labelsTs), whole volumes, single channel. */
  private async validationCases(data: SiteData): Promise<VolumeCase[]> {
    const out: VolumeCase[] = [];
    for (const ref of data.val) {
      const c: PreparedCase | undefined = await data.load(ref);
      if (!c || !c.label) continue;
      if (c.channels.length !== 1) throw new Error(`validation case ${ref.id} has ${c.channels.length} channels; the trainers take one`);
      out.push({ id: ref.id, shape: [c.shape[0], c.shape[1], c.shape[2]], image: c.channels[0], label: c.label });
    }
    return out;
  }

  /** The site's own tensors live in a file keyed by the architecture, so a plan change never mixes layouts. */
  private localPath(arch: ModelArchitecture, settings: TaskSettings): string {
    const key = sha256Hex(JSON.stringify({ model: settings.model, share: settings.share })).slice(0, 16);
    return join(this.o.localDir, `${arch.id}-${key}.safetensors`);
  }

  private loadLocal(arch: ModelArchitecture, settings: TaskSettings): TensorBundle {
    const path = this.localPath(arch, settings);
    if (!existsSync(path)) return new Map();
    const bundle = decodeSafetensors(readFileSync(path)).bundle;
    const specs = localParams(arch, settings.share);
    const problem = checkAgainstSpecs(bundle, specs) ?? findNonFinite(bundle);
    if (problem) throw new Error(`the site's saved local tensors (${path}) are unusable: ${problem}. Move the file away to start the head afresh.`);
    return bundle;
  }

  private saveLocal(arch: ModelArchitecture, settings: TaskSettings, weights: TensorBundle): void {
    const local = pick(weights, localParams(arch, settings.share));
    writeFileAtomic(this.localPath(arch, settings), encodeSafetensors(local), 0o600);
  }

  /** Each site starts its own head from its own seed; the shared part comes from the global model. */
  private siteSeed(base: number): number {
    return (parseInt(sha256Hex(this.o.siteName).slice(0, 8), 16) ^ base) >>> 0;
  }
}

const round4 = (x: number) => Math.round(x * 1e4) / 1e4;

export type { VolumeCase };
