/**
 * The per-round teacher-versus-model check (site-agent/training/teacher-vs-model.ts): a site uses pseudo-labels only
 * while its teacher's validation Dice is at least the received model's minus teacherStudent.modelMargin; otherwise
 * it trains on labelled cases alone that round, labels nothing, and reports why in aggregate metrics. Without
 * validation cases there is nothing to compare, and no pseudo-labels (fails closed).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { pseudoLabelUse } from '../../site-agent/training/teacher-vs-model.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { taskSettingsFor } from '../helpers/task-settings.ts';
import { teacherSite } from '../helpers/teacher-site.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { metricsTable } from '../../cli/status.ts';

describe('pseudoLabelUse', () => {
  it('uses pseudo-labels while the teacher is not behind the model by more than the margin', () => {
    expect(pseudoLabelUse(0.6, 0.5, 0)).toEqual({ use: true });
    expect(pseudoLabelUse(0.5, 0.5, 0)).toEqual({ use: true });
    expect(pseudoLabelUse(0.45, 0.5, 0)).toEqual({ use: false, why: 'model ahead' });
    expect(pseudoLabelUse(0.45, 0.5, 0.05)).toEqual({ use: true });
    expect(pseudoLabelUse(0.44, 0.5, 0.05)).toEqual({ use: false, why: 'model ahead' });
    // A negative margin asks the teacher to lead: the model itself (equal scores) is then not a teacher.
    expect(pseudoLabelUse(0.5, 0.5, -0.01)).toEqual({ use: false, why: 'model ahead' });
    expect(pseudoLabelUse(0.52, 0.5, -0.01)).toEqual({ use: true });
  });

  it('fails closed when either score is unmeasured', () => {
    expect(pseudoLabelUse(Number.NaN, 0.5, 1)).toEqual({ use: false, why: 'unmeasured' });
    expect(pseudoLabelUse(0.5, Number.NaN, 1)).toEqual({ use: false, why: 'unmeasured' });
  });
});

describe('a site compares its teacher with the model it received, every round', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-ts-vs-model-'));
  const dataDir = join(work, 'data');
  const plan = defaultPlan({
    model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 },
    local: { steps: 12, batchSize: 2, learningRate: 0.01 },
    teacherStudent: { enabled: true, promoteEvery: 1, ratio: 1, confidence: 0.6, minTeacherDice: 0, maxForegroundFactor: 0 },
  });
  const settings = (teacher?: Buffer, generation = 1, modelMargin?: number): TaskSettings =>
    taskSettingsFor(plan, {
      teacherStudent: { ...plan.teacherStudent, ...(modelMargin === undefined ? {} : { modelMargin }) },
      ...(teacher ? { teacher: { modelHash: sha256Hex(teacher), modelSize: teacher.length, generation } } : {}),
    });
  const log = pino({ level: 'silent' });
  let round1Update: Buffer;
  /** A teacher that predicts background everywhere (all weights 0): validation Dice 0. */
  let blank: Buffer;

  const site = async (name: string, dir = dataDir) => {
    const localDir = join(work, name);
    const lt = new LocalTraining({ siteName: 'site-a', dataDir: dir, localDir, log, engine: 'cpu' });
    await lt.run(settings(), round1Update, { round: 1 });
    return { lt, localDir };
  };

  beforeAll(async () => {
    ({ round1Update, blank } = await teacherSite(work, dataDir, plan, settings(), log));
  }, 120_000);

  it('trains on labelled cases alone, labelling nothing, when the received model beats the teacher', async () => {
    const { lt, localDir } = await site('behind');
    const r = await lt.run(settings(blank), round1Update, { round: 2, teacherBytes: blank });
    expect(r.metrics).toMatchObject({ pseudo_used: 0, teacher_behind_model: 1, teacher_val_dice: 0 });
    expect(r.metrics.model_val_dice).toBeGreaterThan(0);
    expect(r.metrics.teacher_generation).toBeUndefined();
    expect(r.metrics.pseudo_cases).toBeUndefined();
    // No labelling pass and no adoption: the pool folder and the choice file were never written.
    expect(existsSync(join(localDir, 'pseudo'))).toBe(false);
    expect(readdirSync(localDir).filter((f) => f.includes('teacher-choice'))).toEqual([]);
    // The status table says why the round trained without the teacher.
    const rows = Object.entries(r.metrics).map(([key, value]) => ({ round: 2, site: 'site-a', key, value }));
    expect(metricsTable(rows)).toMatch(/off: model 0\.\d{3} > teacher 0\.000/);
  }, 120_000);

  it('by default leaves out a teacher that is the very model it received (it must lead the model by 0.005)', async () => {
    const { lt, localDir } = await site('self');
    expect(plan.teacherStudent.modelMargin).toBe(-0.005);
    const r = await lt.run(settings(round1Update), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r.metrics).toMatchObject({ pseudo_used: 0, teacher_behind_model: 1 });
    expect(r.metrics.model_val_dice).toBe(r.metrics.teacher_val_dice);
    expect(existsSync(join(localDir, 'pseudo'))).toBe(false);
  }, 120_000);

  it('with modelMargin 0 uses the teacher while it is at least as good as the model: the very model version scores the same', async () => {
    const { lt, localDir } = await site('level');
    const r = await lt.run(settings(round1Update, 1, 0), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r.metrics).toMatchObject({ pseudo_used: 1, teacher_generation: 1, pseudo_cases: 2 });
    expect(r.metrics.model_val_dice).toBe(r.metrics.teacher_val_dice);
    expect(r.metrics.teacher_behind_model).toBeUndefined();
    expect(readdirSync(join(localDir, 'pseudo'))).toHaveLength(1);
  }, 120_000);

  it('lets a teacher trail the model by up to modelMargin', async () => {
    const { lt } = await site('margin');
    const r = await lt.run(settings(blank, 1, 1), round1Update, { round: 2, teacherBytes: blank });
    expect(r.metrics).toMatchObject({ pseudo_used: 1, teacher_generation: 1, teacher_val_dice: 0 });
    expect(r.metrics.model_val_dice).toBeGreaterThan(0);
  }, 120_000);

  it('without validation cases, uses no pseudo-labels and says so (fails closed)', async () => {
    const bare = join(work, 'data-no-val');
    await writePhantomSite(bare, { siteName: 'site-a', cases: 3, valCases: 0, size: [16, 16, 16], seed: 11, intensityShift: 0 });
    await writePhantomPool(bare, { siteName: 'site-a', cases: 2, size: [16, 16, 16], seed: 11, intensityShift: 0 });
    const { lt, localDir } = await site('no-val', bare);
    // Even the margin that lets any measured teacher through does not let an unmeasured one through.
    const r = await lt.run(settings(round1Update, 1, 1), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r.metrics).toMatchObject({ num_val: 0, pseudo_used: 0, teacher_gated: 1 });
    expect(r.metrics.teacher_generation).toBeUndefined();
    expect(existsSync(join(localDir, 'pseudo'))).toBe(false);
  }, 120_000);
});
