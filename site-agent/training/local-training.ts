/**
 * One round of local work at a site: merge the global shared tensors with the site's own tensors
 * (its head, and anything the plan keeps local), train on local scans, evaluate on local held-back
 * cases, keep the local tensors here, and return only the shared tensors as the update.
 */
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { architectureFor } from '../../shared/model/registry.ts';
import { localParams, merge, pick } from '../../shared/model/sharing.ts';
import type { ModelArchitecture, Trainer, VolumeCase } from '../../shared/model/types.ts';
import { createTrainer } from '../../shared/model/trainer-factory.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { checkAgainstSpecs, findNonFinite, type TensorBundle } from '../../shared/tensors/bundle.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import type { TeacherStudentSettings } from '../../shared/plan/schema.ts';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import { DEFAULT_OPTIMIZER, optimizerStateProblem, type OptimizerState } from '../../shared/model/optim.ts';
import { federationSchedule } from '../../shared/model/lr-schedule.ts';
import { decodeOptimizerState, encodeOptimizerState } from './optimizer-state-file.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { patchToVolumeCase, preparedToVolumeCase, SiteData } from '../data/site-data.ts';
import { augmentOptions, DataSettingsSchema, siteDataOptions } from '../data/settings.ts';
import type { PreparedCase } from '../data/types.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { AugmentOptions } from '../data/augment.ts';
import { existingPool, labelPool, prunePseudoDirs, PseudoPatches, teacherProbs, type PseudoPool } from './pseudo-label.ts';
import { calibrateConfidence, type CalibrationCase } from './confidence-calibration.ts';
import { chooseTeacher, readTeacherChoice, writeTeacherChoice } from './teacher-choice.ts';
import { pseudoLabelUse } from './teacher-vs-model.ts';
import { studentVerdict } from './student-verdict.ts';
import { applySiteTask, describeSiteTask, loadSiteTask, type SiteTask } from '../task-config.ts';
import type { CaseRef } from '../data/site-data.ts';
import { isRestorationArchitecture, restorationArchitecture } from '../../shared/model/restoration.ts';
import { pretrainingRound, type PretrainingTask } from './pretraining-round.ts';

export interface LocalTrainingOptions {
  siteName: string;
  dataDir: string;
  localDir: string;
  log: Logger;
  engine?: string;
  /**
   * Where the site's task file (task.yaml: its own head, site-agent/task-config.ts) is looked for; default the
   * parent of `localDir`, which for an agent is the site directory (SiteHome.localDir is `<site dir>/local`).
   */
  siteDir?: string;
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
  /**
   * Validation Dice at this site by what was scored (settings, shared tensors, the site's own tensors: scoreKey), so
   * a teacher is scored once per generation, and a model the site already scored (e.g. the aggregate `medfl
   * experiment` validates after a round) is not scored again when it arrives as the next round's model.
   */
  private readonly validationScores = new Map<string, number>();

  /** This site's own head (task.yaml), read once at start so a bad file stops the agent before it connects. */
  readonly siteTask: SiteTask | undefined;

  constructor(private readonly o: LocalTrainingOptions) {
    this.siteTask = loadSiteTask(o.siteDir ?? dirname(o.localDir));
    if (this.siteTask) o.log.info({ head: this.siteTask.config.head, numClasses: this.siteTask.config.numClasses }, `site task file: this site trains its own ${describeSiteTask(this.siteTask.config)} on the shared encoder`);
  }

  /**
   * Whether this site holds a labelled training case for the plan's (or its own) head, from the data folder's layout
   * alone (no voxels read). A site without one — an archive of unlabelled scans — can take part in pretraining
   * rounds, which need no labels, but not in fine-tuning rounds.
   */
  async hasLabelledTrainingCases(planSettings: TaskSettings): Promise<boolean> {
    const settings = applySiteTask(planSettings, this.siteTask);
    const data = await this.siteDataFor(settings);
    if (isClassification(settings)) return data.train.some((r) => r.classLabel !== undefined);
    return data.train.some((r) => r.segmentation);
  }

  /**
   * One round. `teacherBytes` is the teacher model version named in `settings.teacher` (noisy student), when the
   * plan has teacherStudent on and a teacher was promoted. `modelHash` names the model version `modelBytes` were
   * decoded from when they are not its bytes (a float16/int8 download): the version, not the decoding, is what the
   * teacher is compared with, so a teacher that is this very version is not found worse by its rounding.
   */
  async run(planSettings: TaskSettings, modelBytes: Buffer, ctx: { round: number; onProgress?: (p: number) => void; teacherBytes?: Buffer; modelHash?: string }): Promise<LocalRoundResult> {
    if (planSettings.pretraining) return this.pretrain(planSettings, planSettings.pretraining, modelBytes, ctx);
    const { log } = this.o;
    // The site's own head (task.yaml) on the plan's encoder; the shared tensor names stay the plan's.
    const settings = applySiteTask(planSettings, this.siteTask);
    const arch = architectureFor(settings.model);
    const trainer = await this.trainerFor(arch, settings);
    const dataSettings = settings.data ?? DataSettingsSchema.parse({});
    const data = await this.siteDataFor(settings);
    const classification = isClassification(settings);
    const trainRefs = this.trainingRefs(data, settings);
    const usable = trainRefs.filter((r) => !data.isBad(r));
    if (usable.length === 0) {
      throw new Error(`no usable labelled training cases in the site's data folder (${data.skipped().length} skipped); run \`medfl site check-data\` to see why`);
    }
    const global = decodeSafetensors(modelBytes).bundle;
    const sharedSpecs = arch.params().filter((p) => settings.sharedTensors.includes(p.name));
    const problem = checkAgainstSpecs(global, sharedSpecs) ?? findNonFinite(global);
    if (problem) throw new Error(`the global model does not fit this site's architecture: ${problem}`);

    const local = this.loadLocal(arch, settings);
    const start = merge(merge(arch.init(this.siteSeed(settings.model.seed)), local), global);
    // Noisy student: with a teacher, its pseudo-labelled pool joins the labelled patches, and the student is noised.
    // The received model is scored only when a teacher has to be compared with it.
    const modelDice = () => this.validationDice(trainer, data, settings, this.scoreKey(settings, ctx.modelHash ?? sha256Hex(modelBytes), this.localPath(arch, settings)), start);
    const verdict: { beat?: boolean } = {};
    const setup = await this.studentSetup(arch, trainer, settings, data, { ...ctx, modelDice, verdict });
    const student = setup && 'pool' in setup ? setup : undefined;
    const baseAugment = augmentOptions(dataSettings);
    const augment = student?.strongAugment ? strongAugment(baseAugment) : baseAugment;
    const pseudo = student
      ? new PseudoPatches(student.pool, student.dir, data, new Map(data.unlabelled.map((r) => [r.id, r])), [...settings.model.patch] as [number, number, number], {
          foregroundFraction: dataSettings.foregroundFraction,
          augment,
        })
      : undefined;
    // Noisy Student's batches: the plan's batch of labelled patches plus ratio × as many pseudo-labelled ones
    // (loss = labelled + ratio × pseudo, as in Xie et al.), so the student sees as much labelled data as without a teacher.
    const nPseudo = pseudo && pseudo.size > 0 ? Math.round(settings.local.batchSize * student!.ratio) : 0;
    // Patches come from the site's bounded cache, one batch at a time; whole volumes are never all in memory.
    const source = {
      cases: usable.length,
      sample: async (count: number, rng: () => number) => {
        const labelled = (await data.sampleBatch(trainRefs, count - nPseudo, rng, { augment })).map((p, i) => patchToVolumeCase(p, `batch-${i}`));
        return nPseudo > 0 ? [...labelled, ...(await pseudo!.sample(nPseudo, rng))] : labelled;
      },
    };

    // Moments for the site's own tensors (beside the tensors they were made with), and for the shared ones when the
    // plan keeps them too.
    const optimizerState = local.size > 0 || settings.local.keepMoments === 'all' ? this.loadOptimizerState(arch, settings) : undefined;
    const steps = settings.local.steps ?? Math.max(1, Math.ceil(((settings.local.epochs ?? 1) * usable.length) / settings.local.batchSize));
    // After a pretraining stage the fine-tuning rounds are numbered on from it; the schedule counts fine-tuning rounds.
    const learningRateFactor = this.learningRateSchedule(settings, ctx.round - (settings.roundOffset ?? 0), steps);
    const t0 = performance.now();
    log.info({ round: ctx.round, steps, engine: trainer.engine, trainCases: usable.length }, 'local training started');
    const result = await trainer.train({
      weights: start,
      cases: [],
      source,
      steps,
      batchSize: settings.local.batchSize + nPseudo,
      learningRate: settings.local.learningRate,
      seed: this.siteSeed(settings.model.seed) + ctx.round,
      proximalMu: settings.local.proximalMu,
      optimizer: settings.local.optimizer,
      ...(optimizerState ? { optimizerState } : {}),
      ...(learningRateFactor ? { learningRateFactor } : {}),
      ...(student && student.dropout > 0 ? { dropout: student.dropout } : {}),
      onStep: (s) => ctx.onProgress?.((s + 1) / steps),
    });
    const trainSeconds = (performance.now() - t0) / 1000;
    const val = await this.validationCases(data, settings);
    const evaluation = val.length > 0 && !classification ? await trainer.evaluate(result.weights, val) : undefined;
    const accuracy = val.length > 0 && classification ? await classificationMetrics(trainer, result.weights, val, settings.model.numClasses) : undefined;

    this.saveLocal(arch, settings, result.weights);
    if (result.optimizerState) this.saveOptimizerState(arch, settings, result.optimizerState);
    const update = pick(result.weights, settings.sharedTensors.map((name) => ({ name })));
    const metrics: Record<string, number> = {
      train_loss: result.loss,
      train_loss_first: result.firstLoss,
      num_train: result.samples,
      num_val: val.length,
      train_seconds: trainSeconds,
    };
    // Whether the student learnt from pseudo-labels this round, whenever the task named a teacher, so the
    // coordinator can tell the rounds the teacher shaped from those it did not.
    if (settings.teacherStudent?.enabled && settings.teacher) metrics.pseudo_used = student ? 1 : 0;
    if (setup && 'skipped' in setup) {
      // The gate's decision is a metric of its own, so a coordinator sees teachers refused (and why: NaN = unmeasured).
      metrics.teacher_gated = 1;
      if (Number.isFinite(setup.skipped)) metrics.teacher_val_dice = setup.skipped;
    }
    if (verdict.beat !== undefined) {
      // Noisy Student's test of the generation this site used last (student-verdict.ts): did its students beat it?
      metrics.student_beat_teacher = verdict.beat ? 1 : 0;
    }
    if (setup && 'retired' in setup) {
      // The generation in use was retired here because its students did not beat it.
      metrics.teacher_retired = 1;
      if (Number.isFinite(setup.retired.teacherDice)) metrics.teacher_val_dice = setup.retired.teacherDice;
      if (Number.isFinite(setup.retired.modelDice)) metrics.model_val_dice = setup.retired.modelDice;
    }
    if (setup && 'behind' in setup) {
      // The teacher trails the model this round (or either is unmeasured): both scores, aggregates over the validation cases.
      metrics.teacher_behind_model = 1;
      if (Number.isFinite(setup.behind.teacherDice)) metrics.teacher_val_dice = setup.behind.teacherDice;
      if (Number.isFinite(setup.behind.modelDice)) metrics.model_val_dice = setup.behind.modelDice;
    }
    if (student) {
      // Aggregate counts only: never a per-case value.
      if (Number.isFinite(student.teacherDice)) metrics.teacher_val_dice = student.teacherDice;
      if (Number.isFinite(student.modelDice)) metrics.model_val_dice = student.modelDice;
      metrics.teacher_generation = student.generation;
      if (student.pool.confidence !== undefined) metrics.teacher_confidence = student.pool.confidence;
      if (student.candidateDice !== undefined) {
        // A newer teacher was promoted but not adopted here (not better, or below the floor).
        metrics.teacher_kept = 1;
        if (Number.isFinite(student.candidateDice)) metrics.teacher_candidate_dice = student.candidateDice;
      }
      metrics.pseudo_cases = student.pool.stats.cases;
      metrics.pseudo_confident_fraction = student.pool.stats.confidentFraction;
      metrics.pseudo_skipped_by_prior = student.pool.stats.skippedByPrior ?? 0;
    }
    if (evaluation) {
      metrics.val_dice_mean = evaluation.meanDice;
      evaluation.dicePerClass.forEach((d, i) => { metrics[`val_dice_class_${i + 1}`] = d; });
    }
    if (accuracy) {
      metrics.val_accuracy = accuracy.accuracy;
      // Recall of each class present among the validation cases (class 0 included: there is no background).
      accuracy.recall.forEach((r, k) => { if (r !== undefined) metrics[`val_recall_class_${k}`] = r; });
    }
    log.info({ round: ctx.round, loss: round4(result.loss), firstLoss: round4(result.firstLoss), valDice: evaluation ? round4(evaluation.meanDice) : null, ...(accuracy ? { valAccuracy: round4(accuracy.accuracy) } : {}), seconds: round4(trainSeconds) }, 'local training done');
    return { update: encodeSafetensors(update, { round: String(ctx.round) }), numSamples: result.samples, metrics };
  }

  /**
   * A round of the plan's pretraining stage: the encoder under this site's own restoration decoder, trained on every
   * scan the site holds (labels unused), the decoder kept in its own local file; only the shared tensors go back.
   * The plan's encoder is the site's encoder here: a site task file (task.yaml) changes heads only.
   */
  private async pretrain(settings: TaskSettings, pretraining: PretrainingTask, modelBytes: Buffer, ctx: { round: number; onProgress?: (p: number) => void }): Promise<LocalRoundResult> {
    const arch = restorationArchitecture(settings.model);
    const data = await this.siteDataFor(settings);
    return pretrainingRound({
      arch,
      trainer: await this.trainerFor(arch, settings),
      settings,
      pretraining,
      data,
      globalBytes: modelBytes,
      round: ctx.round,
      seed: this.siteSeed(settings.model.seed) + ctx.round,
      initSeed: this.siteSeed(settings.model.seed),
      localDir: this.o.localDir,
      fileKey: this.localKey(settings),
      log: this.o.log,
      ...(ctx.onProgress ? { onProgress: ctx.onProgress } : {}),
    });
  }

  /**
   * Evaluates this site's model — the given shared tensors with the site's own saved local tensors (its head) —
   * on `cases` (e.g. a common test folder in `medfl experiment`). Nothing leaves the site.
   */
  async evaluateModel(planSettings: TaskSettings, sharedBytes: Buffer, cases: readonly VolumeCase[]): Promise<{ dicePerClass: readonly number[]; meanDice: number }> {
    const settings = applySiteTask(planSettings, this.siteTask);
    const arch = architectureFor(settings.model);
    const trainer = await this.trainerFor(arch, settings);
    const shared = decodeSafetensors(sharedBytes).bundle;
    const weights = merge(merge(arch.init(this.siteSeed(settings.model.seed)), this.loadLocal(arch, settings)), shared);
    return trainer.evaluate(weights, cases);
  }

  /**
   * Validation Dice of this site's model (the given shared tensors with its own local tensors) on its held-back
   * validation cases — for model selection by validation, never by test. NaN when the site has none.
   */
  async validateModel(planSettings: TaskSettings, sharedBytes: Buffer): Promise<number> {
    const settings = applySiteTask(planSettings, this.siteTask);
    if (isClassification(settings)) return Number.NaN;
    const arch = architectureFor(settings.model);
    const trainer = await this.trainerFor(arch, settings);
    const weights = merge(merge(arch.init(this.siteSeed(settings.model.seed)), this.loadLocal(arch, settings)), decodeSafetensors(sharedBytes).bundle);
    const key = this.scoreKey(settings, sha256Hex(sharedBytes), this.localPath(arch, settings));
    return this.validationDice(trainer, await this.siteDataFor(settings), settings, key, weights);
  }

  /** Mean validation Dice of `weights` at this site (NaN without validation cases), scored once per `key`. */
  private async validationDice(trainer: Trainer, data: SiteData, settings: TaskSettings, key: string, weights: TensorBundle): Promise<number> {
    const known = this.validationScores.get(key);
    if (known !== undefined) return known;
    const val = await this.validationCases(data, settings);
    const dice = val.length > 0 ? (await trainer.evaluate(weights, val)).meanDice : Number.NaN;
    // A handful of entries covers a generation's teacher and the last models; older ones are never asked for again.
    if (this.validationScores.size >= 16) this.validationScores.delete(this.validationScores.keys().next().value!);
    this.validationScores.set(key, dice);
    return dice;
  }

  /**
   * What a validation score depends on: the settings that shape the network, the validation cases and their scoring
   * (model, share, data), the shared tensors by hash, and the site's own tensors (the file at `localFile`) by content.
   */
  private scoreKey(settings: TaskSettings, sharedHash: string, localFile: string): string {
    const own = existsSync(localFile) ? sha256Hex(readFileSync(localFile)) : 'none';
    return sha256Hex(JSON.stringify({ model: settings.model, share: settings.share, data: settings.data ?? null, sharedHash, own }));
  }

  /**
   * The teacher of this round, if any: the teacher's shared tensors (downloaded by hash) merged with this site's
   * head of that generation — the head the site had when the teacher's aggregate was made, snapshotted the first
   * time the generation is seen. The teacher (eval mode) labels the pool once per generation, to disk. Each round the
   * teacher in use must also hold its own against the received model on the validation cases (teacher-vs-model.ts),
   * else the round trains on labelled cases alone (`behind`); a new generation is then neither labelled nor adopted.
   * After a round with pseudo-labels, the next round first asks whether those students beat their teacher; a
   * generation whose students did not is retired at this site (`retired`, student-verdict.ts).
   */
  private async studentSetup(
    arch: ModelArchitecture,
    trainer: Trainer,
    settings: TaskSettings,
    data: SiteData,
    ctx: { round: number; teacherBytes?: Buffer; modelDice: () => Promise<number>; verdict: { beat?: boolean } },
  ): Promise<StudentSetup | { skipped: number } | { behind: TeacherBehind } | { retired: TeacherBehind } | undefined> {
    const ts = settings.teacherStudent;
    const teacher = settings.teacher;
    if (!ts?.enabled || !teacher) return undefined;
    const { log } = this.o;
    if (!ctx.teacherBytes) throw new Error(`task names teacher ${teacher.modelHash.slice(0, 12)}… but its bytes were not given to the trainer`);
    if (settings.model.architecture === 'med3d' && settings.model.head === 'classification') {
      log.warn({ round: ctx.round }, 'teacher–student needs a segmentation head; training on labelled cases only');
      return undefined;
    }
    const usablePool = data.unlabelled.filter((r) => !data.isBad(r));
    if (usablePool.length === 0) {
      log.info({ round: ctx.round }, 'no unlabelled cases at this site: the student trains on labelled cases only');
      return undefined;
    }
    const headPath = this.teacherHeadPath(arch, settings, teacher.generation, teacher.modelHash);
    if (!existsSync(headPath)) {
      const current = this.localPath(arch, settings);
      if (!existsSync(current)) {
        log.warn({ round: ctx.round, generation: teacher.generation }, 'this site has no head from the teacher generation (it joined later): training on labelled cases only this round');
        return undefined;
      }
      copyFileSync(current, headPath);
    }
    const teacherShared = decodeSafetensors(ctx.teacherBytes).bundle;
    const sharedSpecs = arch.params().filter((p) => settings.sharedTensors.includes(p.name));
    const problem = checkAgainstSpecs(teacherShared, sharedSpecs) ?? findNonFinite(teacherShared);
    if (problem) throw new Error(`the teacher model does not fit this site's architecture: ${problem}`);
    const head = decodeSafetensors(readFileSync(headPath)).bundle;
    const headProblem = checkAgainstSpecs(head, localParams(arch, settings.share)) ?? findNonFinite(head);
    if (headProblem) throw new Error(`the site's teacher head (${headPath}) is unusable: ${headProblem}. Delete it to train on labelled cases only for this generation.`);
    const weights = merge(merge(arch.init(this.siteSeed(settings.model.seed)), head), teacherShared);
    // Quality gate on the site's own held-back cases, once per generation (the teacher and its head do not change).
    const teacherDice = await this.validationDice(trainer, data, settings, this.scoreKey(settings, teacher.modelHash, headPath), weights);
    // Adopt the new generation only if it passes the floor and beats the teacher this site uses (teacher-choice.ts).
    // Fails closed: with no validation case the teacher's Dice is NaN, and an unmeasured teacher is not adopted.
    const parent = join(this.o.localDir, 'pseudo');
    const choicePath = join(this.o.localDir, `${arch.id}-${this.localKey(settings)}-teacher-choice.json`);
    // A generation's pseudo-labels live in one folder per generation; the choice file names only the generation.
    const pseudoDir = (generation: number) => join(parent, `${this.localKey(settings)}-g${generation}`);
    let saved = readTeacherChoice(choicePath);
    if (saved && saved.pendingRound !== undefined && saved.pendingRound < ctx.round && !saved.retired) {
      // The model received now is what this site's last pseudo-labelled round (and the others') made of the teacher.
      const modelDice = await ctx.modelDice();
      const v = studentVerdict(saved.dice, modelDice);
      ctx.verdict.beat = !v.retire;
      if (v.retire) {
        log.info(
          { round: ctx.round, generation: saved.generation, teacherValDice: round4(saved.dice), modelValDice: Number.isFinite(modelDice) ? round4(modelDice) : null },
          v.why === 'unmeasured' ? 'the students of the teacher in use could not be scored here: retiring that generation at this site' : "the students of the teacher in use did not beat it on this site's validation cases: retiring that generation at this site (its pseudo-labels are not used again)",
        );
      }
      saved = { generation: saved.generation, modelHash: saved.modelHash, dice: saved.dice, ...(v.retire ? { retired: true } : {}) };
      writeTeacherChoice(choicePath, saved);
    }
    // A retired generation is not used again, whether the task still names it or a newer one that is not adopted.
    const retired = async (): Promise<{ retired: TeacherBehind }> => ({ retired: { generation: saved!.generation, teacherDice: saved!.dice, modelDice: await ctx.modelDice() } });
    if (saved?.retired && saved.generation >= teacher.generation) return retired();
    const previousPool = saved ? existingPool(pseudoDir(saved.generation), { generation: saved.generation, teacherHash: saved.modelHash }) : undefined;
    const previous = previousPool ? saved : undefined;
    const decision = chooseTeacher({ generation: teacher.generation, dice: teacherDice }, previous, ts.minTeacherDice);
    const measured = Number.isFinite(teacherDice) ? round4(teacherDice) : null;
    // The teacher this round would learn from must not trail the model the site received (teacher-vs-model.ts).
    const behindModel = async (generation: number, dice: number): Promise<{ modelDice: number } | { behind: TeacherBehind }> => {
      const modelDice = await ctx.modelDice();
      const check = pseudoLabelUse(dice, modelDice, ts.modelMargin);
      if (check.use) return { modelDice };
      log.info(
        { round: ctx.round, generation, teacherValDice: Number.isFinite(dice) ? round4(dice) : null, modelValDice: Number.isFinite(modelDice) ? round4(modelDice) : null, margin: ts.modelMargin },
        check.why === 'model ahead' ? "the received model beats the teacher on this site's validation cases: no pseudo-labels this round" : 'the teacher or the received model is unmeasured here: no pseudo-labels this round',
      );
      return { behind: { generation, teacherDice: dice, modelDice } };
    };
    if (decision.use === 'previous' && previous && previousPool) {
      if (previous.retired) {
        log.info(
          { round: ctx.round, generation: teacher.generation, teacherValDice: measured, retired: previous.generation, retiredValDice: round4(previous.dice), needed: ts.minTeacherDice },
          decision.why === 'not better' ? "the new teacher does not beat the retired generation on this site's validation cases: no pseudo-labels this round" : "the new teacher is below the floor on this site's validation cases and the generation before it is retired: no pseudo-labels this round",
        );
        return retired();
      }
      log.info(
        { round: ctx.round, generation: teacher.generation, teacherValDice: measured, kept: previous.generation, keptValDice: round4(previous.dice), needed: ts.minTeacherDice },
        decision.why === 'not better' ? "the new teacher does not beat the one in use on this site's validation cases: keeping the earlier generation's pseudo-labels" : "the new teacher is below the floor on this site's validation cases: keeping the earlier generation's pseudo-labels",
      );
      if (previousPool.cases.length === 0) return undefined;
      const against = await behindModel(previous.generation, previous.dice);
      if ('behind' in against) return against;
      writeTeacherChoice(choicePath, { generation: previous.generation, modelHash: previous.modelHash, dice: previous.dice, pendingRound: ctx.round });
      return { pool: previousPool, dir: pseudoDir(previous.generation), generation: previous.generation, ratio: ts.ratio, dropout: ts.dropout, strongAugment: ts.strongAugment, teacherDice: previous.dice, modelDice: against.modelDice, candidateDice: teacherDice };
    }
    if (decision.use === 'none') {
      log.info({ round: ctx.round, generation: teacher.generation, teacherValDice: measured, needed: ts.minTeacherDice }, Number.isFinite(teacherDice) ? 'teacher too weak on this site\'s validation cases: training on labelled cases only this generation' : 'no validation case to check the teacher on: training on labelled cases only this generation');
      return { skipped: teacherDice };
    }
    // Checked before labelling: a teacher the model already beats costs this site no pseudo-labelling pass.
    const against = await behindModel(teacher.generation, teacherDice);
    if ('behind' in against) return against;
    const dir = pseudoDir(teacher.generation);
    const prior = ts.maxForegroundFactor > 0 ? await this.foregroundPrior(data, settings) : undefined;
    const teacherId = { generation: teacher.generation, teacherHash: teacher.modelHash };
    const labelling = (ts.confidenceTarget ?? 0) > 0 && !existingPool(dir, teacherId) ? await this.calibratedSettings(trainer, weights, data, settings, ts, ctx.round, teacher.generation) : ts;
    const pool = await labelPool(trainer, weights, data, usablePool, dir, teacherId, labelling, log, prior ? { foregroundFraction: prior, maxFactor: ts.maxForegroundFactor } : undefined);
    // Only now that the new labels are complete do the earlier generation's go (they were the fallback).
    prunePseudoDirs(parent, dir);
    writeTeacherChoice(choicePath, { generation: teacher.generation, modelHash: teacher.modelHash, dice: teacherDice, ...(pool.cases.length > 0 ? { pendingRound: ctx.round } : {}) });
    if (pool.cases.length === 0) return undefined;
    return { pool, dir, generation: teacher.generation, ratio: ts.ratio, dropout: ts.dropout, strongAugment: ts.strongAugment, teacherDice, modelDice: against.modelDice };
  }

  /**
   * The teacher–student settings with the confidence threshold calibrated on this site's validation cases (the gate
   * already passed, so there are some): the teacher's probabilities there, against the true labels.
   */
  private async calibratedSettings(trainer: Trainer, weights: TensorBundle, data: SiteData, settings: TaskSettings, ts: TeacherStudentSettings, round: number, generation: number): Promise<TeacherStudentSettings> {
    const cases: CalibrationCase[] = [];
    for (const vc of await this.validationCases(data, settings)) if (vc.label) cases.push({ probs: await teacherProbs(trainer, weights, vc, ts.flipTTA), label: vc.label });
    const cal = calibrateConfidence(cases, trainer.architecture.numClasses, ts.confidenceTarget ?? 0);
    this.o.log.info(
      { round, generation, confidence: cal.confidence, targetPrecision: ts.confidenceTarget, reached: cal.reached, precision: cal.precision.map((p) => (Number.isNaN(p) ? null : round4(p))), keptFraction: round4(cal.keptFraction) },
      cal.reached ? "pseudo-label confidence calibrated on this site's validation cases" : "no confidence threshold reaches the target precision on this site's validation cases: using the highest",
    );
    return { ...ts, confidence: cal.confidence };
  }

  /** Share of foreground voxels over this site's labelled training cases (the pseudo-label sanity prior); undefined without any. */
  private async foregroundPrior(data: SiteData, settings: TaskSettings): Promise<number | undefined> {
    let fg = 0;
    let all = 0;
    for (const ref of this.trainingRefs(data, settings)) {
      const c = await data.load(ref);
      if (!c?.label) continue;
      for (let v = 0; v < c.label.length; v++) if (c.label[v] > 0) fg++;
      all += c.label.length;
    }
    return all > 0 ? fg / all : undefined;
  }

  /** Keyed by generation and teacher hash, so a restarted federation never pairs a new teacher with an old head. */
  private teacherHeadPath(arch: ModelArchitecture, settings: TaskSettings, generation: number, teacherHash: string): string {
    return join(this.o.localDir, `${arch.id}-${this.localKey(settings)}-teacher-g${generation}-${teacherHash.slice(0, 12)}.safetensors`);
  }

  private localKey(settings: TaskSettings): string {
    return sha256Hex(JSON.stringify({ model: settings.model, share: settings.share })).slice(0, 16);
  }

  private async trainerFor(arch: ModelArchitecture, settings: TaskSettings): Promise<Trainer> {
    const key = JSON.stringify({ model: settings.model, restoration: isRestorationArchitecture(arch) });
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
      const want = settings.model.inputChannels ?? 1;
      const have = data.layout.channelNames.length;
      if (have !== want) {
        // Said before any training: otherwise the first batch fails with a tensor shape deep in the network.
        throw new Error(`this site's dataset has ${have} image channel(s) (${data.layout.channelNames.join(', ')}) but the plan's model takes ${want} (model.inputChannels)`);
      }
      if (data.skipped().length > 0) this.o.log.warn({ skipped: data.skipped().length }, 'some cases are unusable and are skipped (see debug log or `medfl site check-data`)');
      this.dataset = { key, data };
    }
    return this.dataset.data;
  }

  /**
   * The labelled training cases this site's head can learn from: those with a segmentation label for a
   * segmentation head, those with a case class for a classification head. Refuses labels the head cannot hold.
   */
  private trainingRefs(data: SiteData, settings: TaskSettings): readonly CaseRef[] {
    const k = settings.model.numClasses;
    const where = this.siteTask ? `this site's task file (${this.siteTask.source})` : 'the plan (model.numClasses)';
    if (isClassification(settings)) {
      const refs = data.train.filter((r) => r.classLabel !== undefined);
      if (refs.length === 0) {
        throw new Error('this site trains a classification head but no training case has a class label: give them in dataset.json ("classification": {"CASE": k}) or classification.csv (case,label)');
      }
      const tooHigh = [...refs, ...data.val].filter((r) => r.classLabel !== undefined && r.classLabel >= k).length;
      if (tooHigh > 0) throw new Error(`${tooHigh} case(s) have a class label ≥ ${k}, but ${where} gives the head ${k} classes (labels 0..${k - 1}); raise numClasses or fix the labels`);
      return refs;
    }
    if (data.labels.length > k) {
      // Only a warning: a dataset may name classes it never uses; a label value ≥ k stops training with its case.
      this.o.log.warn({ datasetClasses: data.labels.length, headClasses: k }, `dataset.json names more label classes than ${where} gives the segmentation head; set numClasses to match if those labels occur`);
    }
    return data.train.filter((r) => r.segmentation);
  }

  /**
   * Held-back validation cases (imagesTs + labelsTs), channels last: whole volumes for a segmentation head; for a
   * classification head the centred patch of each case with a class label (the input size the head trained on).
   */
  private async validationCases(data: SiteData, settings: TaskSettings): Promise<VolumeCase[]> {
    const out: VolumeCase[] = [];
    if (isClassification(settings)) {
      for (const { id, patch } of await data.centrePatches(data.val.filter((r) => r.classLabel !== undefined))) out.push(patchToVolumeCase(patch, id));
      return out;
    }
    for (const ref of data.val) {
      const c: PreparedCase | undefined = await data.load(ref);
      if (!c || !c.label) continue;
      out.push(preparedToVolumeCase(c, ref.id));
    }
    return out;
  }

  /**
   * A key for the weights evaluateModel would score, when they depend on the shared bytes alone (no site task file
   * and nothing kept local): then every site scores the same model, and a caller may score it once. Undefined when
   * the site adds tensors of its own.
   */
  siteIndependentModelKey(planSettings: TaskSettings, sharedBytes: Buffer): string | undefined {
    if (this.siteTask) return undefined;
    const arch = architectureFor(planSettings.model);
    return localParams(arch, planSettings.share).length === 0 ? sha256Hex(sharedBytes) : undefined;
  }

  /** Whether this site has trained under these settings (its own tensors are on disk). */
  hasLocalTensors(planSettings: TaskSettings): boolean {
    const settings = applySiteTask(planSettings, this.siteTask);
    return existsSync(this.localPath(architectureFor(settings.model), settings));
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

  /**
   * Same name as the local tensors' file (same key: a plan change that changes the layout never reuses the
   * moments), in a subfolder so that the local folder's top level keeps holding model tensors only.
   */
  private optimizerStatePath(arch: ModelArchitecture, settings: TaskSettings): string {
    return join(this.o.localDir, 'optimizer-state', basename(this.localPath(arch, settings)));
  }

  /**
   * The state the last round left for the site's own parameters, or undefined (none yet, or it does not fit the
   * plan's optimiser any more: then the moments start afresh, which costs a little convergence, nothing else).
   */
  private loadOptimizerState(arch: ModelArchitecture, settings: TaskSettings): OptimizerState | undefined {
    const path = this.optimizerStatePath(arch, settings);
    if (!existsSync(path)) return undefined;
    const kind = (settings.local.optimizer ?? DEFAULT_OPTIMIZER).kind;
    const shared = new Set(settings.sharedTensors);
    let problem: string | undefined;
    try {
      const saved = decodeOptimizerState(readFileSync(path));
      const sharedName = settings.local.keepMoments === 'all' ? undefined : [...saved.state.keys()].find((n) => shared.has(n));
      problem = saved.kind !== kind ? `it is ${saved.kind} state, the plan trains with ${kind}` : sharedName ? `it holds shared parameter ${sharedName}` : optimizerStateProblem(saved.state, kind, arch.params());
      if (!problem) return saved.state;
    } catch (e) {
      problem = (e as Error).message;
    }
    this.o.log.warn({ problem }, "the site's saved optimiser state does not fit this round's model or optimiser: its moments start afresh");
    return undefined;
  }

  /**
   * Keeps the site's own parameters' state, and the shared parameters' only when the plan asks (keepMoments: all).
   * By default those are dropped: the global model replaces the weights every round, so their old moments describe
   * a point the site no longer starts from — a cost the plan may judge smaller than restarting Adam every round.
   */
  private saveOptimizerState(arch: ModelArchitecture, settings: TaskSettings, state: OptimizerState): void {
    const shared = new Set(settings.sharedTensors);
    const own = settings.local.keepMoments === 'all' ? state : new Map([...state].filter(([name]) => !shared.has(name)));
    if (own.size === 0) return;
    const kind = (settings.local.optimizer ?? DEFAULT_OPTIMIZER).kind;
    writeFileAtomic(this.optimizerStatePath(arch, settings), encodeOptimizerState(own, kind), 0o600);
  }

  /** The plan's learning-rate schedule placed on the federation's steps (this round's share of it); none = constant. */
  private learningRateSchedule(settings: TaskSettings, round: number, steps: number): ((step: number) => number) | undefined {
    const schedule = settings.local.schedule;
    if (!schedule || (schedule.type === 'constant' && schedule.warmupSteps === 0)) return undefined;
    if (settings.totalRounds === undefined) {
      this.o.log.warn({ round }, 'the coordinator sent no totalRounds: the learning-rate schedule runs over this round alone');
      return federationSchedule(schedule, { round: 1, rounds: 1, steps });
    }
    return federationSchedule(schedule, { round, rounds: settings.totalRounds, steps });
  }

  /** Each site starts its own head from its own seed; the shared part comes from the global model. */
  private siteSeed(base: number): number {
    return (parseInt(sha256Hex(this.o.siteName).slice(0, 8), 16) ^ base) >>> 0;
  }
}

const round4 = (x: number) => Math.round(x * 1e4) / 1e4;

/** A round whose teacher trails the received model on validation (or either is unmeasured): no pseudo-labels. */
interface TeacherBehind {
  readonly generation: number;
  readonly teacherDice: number;
  readonly modelDice: number;
}

/** A round that trains the noised student on labelled + pseudo-labelled patches. */
interface StudentSetup {
  readonly pool: PseudoPool;
  readonly dir: string;
  readonly generation: number;
  readonly ratio: number;
  readonly dropout: number;
  readonly strongAugment: boolean;
  /** Validation Dice of the teacher in use, and of the received model it was compared with. */
  readonly teacherDice: number;
  readonly modelDice: number;
  /** A newer generation's validation Dice, when it was not adopted. */
  readonly candidateDice?: number;
}

const isClassification = (settings: TaskSettings) => settings.model.architecture === 'med3d' && settings.model.head === 'classification';

/**
 * Accuracy and per-class recall on class-labelled cases: each class's cases are evaluated as one group, so the
 * group's accuracy is that class's recall (every case still goes through the model once). Aggregates only.
 */
async function classificationMetrics(trainer: Trainer, weights: TensorBundle, cases: readonly VolumeCase[], numClasses: number): Promise<{ accuracy: number; recall: (number | undefined)[] }> {
  const recall: (number | undefined)[] = Array.from({ length: numClasses }, () => undefined);
  let correct = 0;
  let total = 0;
  for (let k = 0; k < numClasses; k++) {
    const group = cases.filter((c) => c.classLabel === k);
    if (group.length === 0) continue;
    const r = await trainer.evaluate(weights, group);
    const acc = r.accuracy ?? Number.NaN;
    recall[k] = acc;
    correct += acc * r.cases;
    total += r.cases;
  }
  return { accuracy: total > 0 ? correct / total : Number.NaN, recall };
}

/** The noised student's augmentation: the plan's, with intensity transforms more often and stronger. */
export function strongAugment(base: AugmentOptions | false): AugmentOptions {
  const b = base === false ? {} : base;
  return {
    ...b,
    flipProbability: 0.5,
    scaleProbability: Math.max(0.4, b.scaleProbability ?? 0),
    scaleRange: [0.7, 1.4],
    shiftProbability: Math.max(0.3, b.shiftProbability ?? 0),
    shiftRange: [-0.2, 0.2],
    noiseProbability: Math.max(0.4, b.noiseProbability ?? 0),
    noiseVariance: [0, 0.1],
  };
}

export type { VolumeCase };
