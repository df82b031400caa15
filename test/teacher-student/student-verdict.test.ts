/**
 * Noisy Student's test at each site (site-agent/training/student-verdict.ts): after a round with a generation's
 * pseudo-labels, the model the site receives next must beat that teacher on its validation cases, or the generation
 * is retired there for good — even when the per-round teacher-versus-model check would let it back in because the
 * students fell behind it.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { studentVerdict } from '../../site-agent/training/student-verdict.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { taskSettingsFor } from '../helpers/task-settings.ts';
import { teacherSite } from '../helpers/teacher-site.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { metricsTable } from '../../cli/status.ts';

describe('studentVerdict', () => {
  it('keeps a generation only when its students beat it', () => {
    expect(studentVerdict(0.5, 0.51)).toEqual({ retire: false });
    expect(studentVerdict(0.5, 0.5)).toEqual({ retire: true, why: 'student not better' });
    expect(studentVerdict(0.5, 0.4)).toEqual({ retire: true, why: 'student not better' });
  });

  it('retires when either score is unmeasured (fails closed)', () => {
    expect(studentVerdict(Number.NaN, 0.5)).toEqual({ retire: true, why: 'unmeasured' });
    expect(studentVerdict(0.5, Number.NaN)).toEqual({ retire: true, why: 'unmeasured' });
  });
});

describe('a site retires a generation whose students did not beat it', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-ts-verdict-'));
  const dataDir = join(work, 'data');
  const plan = defaultPlan({
    model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 },
    local: { steps: 12, batchSize: 2, learningRate: 0.01 },
    // modelMargin 0: these tests start from a round that learns from the very model it received (the teacher).
    teacherStudent: { enabled: true, promoteEvery: 1, ratio: 1, confidence: 0.6, minTeacherDice: 0, maxForegroundFactor: 0, modelMargin: 0 },
  });
  const settings = (teacher: Buffer, generation: number, modelMargin?: number): TaskSettings =>
    taskSettingsFor(plan, {
      teacherStudent: { ...plan.teacherStudent, ...(modelMargin === undefined ? {} : { modelMargin }) },
      teacher: { modelHash: sha256Hex(teacher), modelSize: teacher.length, generation },
    });
  const plain = (): TaskSettings => taskSettingsFor(plan, { teacherStudent: plan.teacherStudent });
  const log = pino({ level: 'silent' });
  let round1Update: Buffer;
  /** All weights 0: predicts background everywhere, validation Dice 0. */
  let blank: Buffer;

  const site = async (name: string) => {
    const localDir = join(work, name);
    const lt = new LocalTraining({ siteName: 'site-a', dataDir, localDir, log, engine: 'cpu' });
    await lt.run(plain(), round1Update, { round: 1 });
    return { lt, localDir };
  };
  const choice = (localDir: string) => JSON.parse(readFileSync(join(localDir, readdirSync(localDir).find((f) => f.endsWith('teacher-choice.json'))!), 'utf8'));

  beforeAll(async () => {
    ({ round1Update, blank } = await teacherSite(work, dataDir, plan, plain(), log));
  }, 120_000);

  it('after students fall below their teacher, its pseudo-labels stay off although the teacher now leads the model', async () => {
    const { lt, localDir } = await site('fell');
    // Round 2: the teacher is the received model itself, so the check lets it in; the verdict is now pending.
    const r2 = await lt.run(settings(round1Update, 1), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r2.metrics).toMatchObject({ pseudo_used: 1, teacher_generation: 1 });
    expect(r2.metrics.student_beat_teacher).toBeUndefined();
    expect(choice(localDir)).toMatchObject({ generation: 1, pendingRound: 2 });
    // Round 3: what the students made (here: a model that finds nothing) is below the teacher. The per-round check
    // alone would use the teacher (it leads the model); the verdict retires it.
    const r3 = await lt.run(settings(round1Update, 1), blank, { round: 3, teacherBytes: round1Update });
    expect(r3.metrics).toMatchObject({ pseudo_used: 0, student_beat_teacher: 0, teacher_retired: 1, model_val_dice: 0 });
    expect(r3.metrics.teacher_val_dice).toBeGreaterThan(0);
    expect(r3.metrics.teacher_generation).toBeUndefined();
    expect(choice(localDir)).toMatchObject({ generation: 1, retired: true });
    expect(choice(localDir).pendingRound).toBeUndefined();
    const rows = Object.entries(r3.metrics).map(([key, value]) => ({ round: 3, site: 'site-a', key, value }));
    expect(metricsTable(rows)).toMatch(/off: generation retired/);
    // Round 4: still retired; no second verdict.
    const r4 = await lt.run(settings(round1Update, 1), blank, { round: 4, teacherBytes: round1Update });
    expect(r4.metrics).toMatchObject({ pseudo_used: 0, teacher_retired: 1 });
    expect(r4.metrics.student_beat_teacher).toBeUndefined();
    // A newer generation that does not beat the retired one on validation is not adopted either.
    const r5 = await lt.run(settings(round1Update, 2), blank, { round: 5, teacherBytes: round1Update });
    expect(r5.metrics).toMatchObject({ pseudo_used: 0, teacher_retired: 1 });
  }, 240_000);

  it('keeps a generation whose students beat it, and the per-round check decides as before', async () => {
    const { lt, localDir } = await site('beat');
    // Round 2: a teacher that finds nothing, let through by the widest margin; the verdict is pending.
    const r2 = await lt.run(settings(blank, 1, 1), round1Update, { round: 2, teacherBytes: blank });
    expect(r2.metrics).toMatchObject({ pseudo_used: 1, teacher_generation: 1, teacher_val_dice: 0 });
    // Round 3: the received model beats the teacher (Dice > 0): not retired, and the margin still lets it in.
    const r3 = await lt.run(settings(blank, 1, 1), round1Update, { round: 3, teacherBytes: blank });
    expect(r3.metrics).toMatchObject({ pseudo_used: 1, student_beat_teacher: 1, teacher_generation: 1 });
    expect(r3.metrics.teacher_retired).toBeUndefined();
    expect(choice(localDir)).toMatchObject({ generation: 1, pendingRound: 3 });
    expect(choice(localDir).retired).toBeUndefined();
  }, 240_000);
});
