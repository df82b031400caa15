/**
 * Noisy student at a site: teacher pseudo-labels (soft/hard, confidence mask, class balance, flip TTA), kept on
 * the site's disk one case at a time, and a round that trains the noised student on labelled + pseudo-labelled
 * patches while sending back only the shared tensors and aggregate metrics.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { flipVolume, pickBalancedClass, pseudoTarget, teacherProbs } from '../../site-agent/training/pseudo-label.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import { TaskSettingsSchema, type TaskSettings } from '../../shared/protocol/task.ts';
import { taskSettingsFor } from '../helpers/task-settings.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick, sharedParams } from '../../shared/model/sharing.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { chooseTeacher } from '../../site-agent/training/teacher-choice.ts';
import { CONFIDENCE_GRID } from '../../site-agent/training/confidence-calibration.ts';
import type { Trainer, VolumeCase } from '../../shared/model/types.ts';

describe('pseudo-label targets', () => {
  const probs = Float32Array.from([0.9, 0.1, 0.55, 0.45, 0.2, 0.8]);

  it('soft keeps the teacher softmax, hard takes the argmax; the confidence threshold masks voxels', () => {
    const soft = pseudoTarget(probs, 2, { labels: 'soft', confidence: 0.6 });
    expect(Array.from(soft.target)).toEqual(Array.from(probs));
    expect(Array.from(soft.mask)).toEqual([1, 0, 1]);
    expect(Array.from(soft.argmax)).toEqual([0, 0, 1]);
    const hard = pseudoTarget(probs, 2, { labels: 'hard', confidence: 0.3 });
    expect(Array.from(hard.target)).toEqual([1, 0, 1, 0, 0, 1]);
    expect(Array.from(hard.mask)).toEqual([1, 1, 1]);
  });

  it('balances classes by drawing crop-centre classes uniformly among those present, whatever their frequency', () => {
    const perClass = [new Uint32Array(9000), new Uint32Array(0), new Uint32Array(10)];
    const rng = mulberry32(1);
    const counts = [0, 0, 0];
    for (let i = 0; i < 2000; i++) counts[pickBalancedClass(perClass, rng)!]++;
    expect(counts[1]).toBe(0);
    expect(counts[0] / 2000).toBeCloseTo(0.5, 1);
    expect(counts[2] / 2000).toBeCloseTo(0.5, 1);
    expect(pickBalancedClass([new Uint32Array(0), new Uint32Array(0)], rng)).toBeUndefined();
  });

  it('flip TTA maps each flipped prediction back (a flip-equivariant teacher is unchanged by it)', async () => {
    const shape: [number, number, number] = [3, 4, 5];
    const image = Float32Array.from({ length: 60 }, (_, i) => Math.sin(i));
    expect(Array.from(flipVolume(flipVolume(image, shape, [true, false, true], 1), shape, [true, false, true], 1))).toEqual(Array.from(image));
    // A voxel-wise teacher: p(fg) = sigmoid(intensity), so every flip gives the same map back.
    const voxelwise = {
      architecture: { numClasses: 2 },
      predictProbs: async (_w: unknown, vc: VolumeCase) => {
        const out = new Float32Array(vc.image.length * 2);
        vc.image.forEach((v, i) => { const p = 1 / (1 + Math.exp(-v)); out[2 * i] = 1 - p; out[2 * i + 1] = p; });
        return out;
      },
    } as unknown as Trainer;
    const plain = await teacherProbs(voxelwise, new Map(), { id: 'x', shape, image }, false);
    const tta = await teacherProbs(voxelwise, new Map(), { id: 'x', shape, image }, true);
    for (let i = 0; i < plain.length; i++) expect(tta[i]).toBeCloseTo(plain[i], 6);
  });
});

describe('a teacher–student round at a site', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-ts-'));
  const dataDir = join(work, 'data');
  const localDir = join(work, 'local');
  const plan = defaultPlan({
    model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 },
    local: { steps: 3, batchSize: 2, learningRate: 0.005 },
    // modelMargin 1: these tests are about labelling and adoption, so the per-round teacher-versus-model check
    // (teacher-vs-model.test.ts) lets every measured teacher through here.
    teacherStudent: { enabled: true, promoteEvery: 1, ratio: 1, confidence: 0.6, flipTTA: true, minTeacherDice: 0, maxForegroundFactor: 0, modelMargin: 1 },
  });
  const arch = architectureFor(plan.model);
  const shared = sharedParams(arch, plan.share).map((p) => p.name);
  const settings = (teacher?: { hash: string; size: number; generation: number }, minTeacherDice = 0): TaskSettings =>
    taskSettingsFor(plan, {
      teacherStudent: { ...plan.teacherStudent, minTeacherDice },
      ...(teacher ? { teacher: { modelHash: teacher.hash, modelSize: teacher.size, generation: teacher.generation } } : {}),
    });
  const log = pino({ level: 'silent' });
  let lt: LocalTraining;
  let round1Update: Buffer;

  beforeAll(async () => {
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 3, valCases: 1, size: [16, 16, 16], seed: 11, intensityShift: 0 });
    await writePhantomPool(dataDir, { siteName: 'site-a', cases: 3, size: [16, 16, 16], seed: 11, intensityShift: 0 });
    lt = new LocalTraining({ siteName: 'site-a', dataDir, localDir, log, engine: 'cpu' });
    // Round 1: no teacher yet (plain supervised training); the site's head is saved locally.
    const r1 = await lt.run(settings(), encodeSafetensors(pick(arch.init(3), sharedParams(arch, plan.share))), { round: 1 });
    round1Update = r1.update;
    expect(r1.metrics.teacher_generation).toBeUndefined();
  }, 120_000);

  it('labels the pool with the teacher and its own head of that generation, trains the student, sends only shared tensors', async () => {
    const headFile = readdirSync(localDir).find((f) => f.endsWith('.safetensors') && !f.includes('teacher'))!;
    const headAfterRound1 = readFileSync(join(localDir, headFile));
    const teacher = { hash: sha256Hex(round1Update), size: round1Update.length, generation: 1 };
    const r2 = await lt.run(settings(teacher), round1Update, { round: 2, teacherBytes: round1Update });
    // The teacher's head is the site's head from the round the teacher was aggregated in.
    const snapshot = readdirSync(localDir).find((f) => f.includes('teacher-g1'))!;
    expect(readFileSync(join(localDir, snapshot)).equals(headAfterRound1)).toBe(true);
    // Pseudo-labels: one file per pool case on the site's disk, plus the pool description.
    const pseudoDirs = readdirSync(join(localDir, 'pseudo'));
    expect(pseudoDirs).toHaveLength(1);
    const files = readdirSync(join(localDir, 'pseudo', pseudoDirs[0])).sort();
    expect(files).toEqual(['meta.json', 'pool-0.safetensors', 'pool-1.safetensors', 'pool-2.safetensors']);
    const meta = JSON.parse(readFileSync(join(localDir, 'pseudo', pseudoDirs[0], 'meta.json'), 'utf8'));
    expect(meta).toMatchObject({ generation: 1, numClasses: 2, stats: { cases: 3, voxels: 3 * 16 ** 3 } });
    const label = decodeSafetensors(readFileSync(join(localDir, 'pseudo', pseudoDirs[0], 'pool-0.safetensors'))).bundle;
    expect(label.get('target')!.shape).toEqual([16 ** 3, 2]);
    // Aggregate metrics only, and the update holds exactly the shared tensors.
    expect(r2.metrics).toMatchObject({ teacher_generation: 1, pseudo_cases: 3 });
    expect(r2.metrics.teacher_val_dice).toBeGreaterThanOrEqual(0);
    expect(r2.metrics.pseudo_confident_fraction).toBeGreaterThan(0);
    expect(r2.metrics.pseudo_confident_fraction).toBeLessThanOrEqual(1);
    expect(Number.isFinite(r2.metrics.train_loss)).toBe(true);
    expect([...decodeSafetensors(r2.update).bundle.keys()].sort()).toEqual([...shared].sort());
    // The same generation again: labels are reused from disk, not recomputed.
    const before = statSync(join(localDir, 'pseudo', pseudoDirs[0], 'meta.json')).mtimeMs;
    const r3 = await lt.run(settings(teacher), r2.update, { round: 3, teacherBytes: round1Update });
    expect(statSync(join(localDir, 'pseudo', pseudoDirs[0], 'meta.json')).mtimeMs).toBe(before);
    expect(r3.metrics.teacher_generation).toBe(1);
    // Another teacher under the same generation number (a federation started afresh): labelled again, new head snapshot.
    const other = { hash: sha256Hex(r3.update), size: r3.update.length, generation: 1 };
    await lt.run(settings(other), r3.update, { round: 4, teacherBytes: r3.update });
    const [dir2] = readdirSync(join(localDir, 'pseudo'));
    expect(JSON.parse(readFileSync(join(localDir, 'pseudo', dir2, 'meta.json'), 'utf8')).teacherHash).toBe(other.hash);
    expect(readdirSync(localDir).filter((f) => f.includes('teacher-g1'))).toHaveLength(2);
  }, 120_000);

  it('does not use a teacher that scores below minTeacherDice on the site\'s validation cases', async () => {
    const gated = new LocalTraining({ siteName: 'site-a', dataDir, localDir: join(work, 'local-gated'), log, engine: 'cpu' });
    await gated.run(settings(), round1Update, { round: 1 });
    const teacher = { hash: sha256Hex(round1Update), size: round1Update.length, generation: 1 };
    const r = await gated.run(settings(teacher, 1), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r.metrics.teacher_generation).toBeUndefined();
    expect(r.metrics.teacher_val_dice).toBeGreaterThanOrEqual(0);
    expect(r.metrics.teacher_val_dice).toBeLessThanOrEqual(1);
    expect(existsSync(join(work, 'local-gated', 'pseudo'))).toBe(false);
  }, 120_000);

  it('keeps the generation it uses when a newer teacher does not beat it on the site\'s validation cases', async () => {
    const dir = join(work, 'local-choice');
    const site = new LocalTraining({ siteName: 'site-a', dataDir, localDir: dir, log, engine: 'cpu' });
    await site.run(settings(), round1Update, { round: 1 });
    const g1 = { hash: sha256Hex(round1Update), size: round1Update.length, generation: 1 };
    const r2 = await site.run(settings(g1), round1Update, { round: 2, teacherBytes: round1Update });
    expect(r2.metrics.teacher_generation).toBe(1);
    const [g1Dir] = readdirSync(join(dir, 'pseudo'));
    // Generation 2: a teacher that predicts background everywhere (all weights 0) — it cannot beat generation 1.
    const zero = encodeSafetensors(makeBundle([...decodeSafetensors(round1Update).bundle.values()].map((t) => ({ ...t, data: new Float32Array(t.data.length) }))));
    const g2 = { hash: sha256Hex(zero), size: zero.length, generation: 2 };
    const r3 = await site.run(settings(g2), r2.update, { round: 3, teacherBytes: zero });
    expect(r3.metrics).toMatchObject({ teacher_generation: 1, teacher_kept: 1, teacher_candidate_dice: 0 });
    expect(r3.metrics.teacher_val_dice).toBe(r2.metrics.teacher_val_dice);
    // The first generation's pseudo-labels were neither deleted nor recomputed.
    expect(readdirSync(join(dir, 'pseudo'))).toEqual([g1Dir]);
  }, 120_000);

  it('calibrates the pseudo-label confidence on its validation cases when the plan asks, and masks the pool with it', async () => {
    const dir = join(work, 'local-calibrated');
    const site = new LocalTraining({ siteName: 'site-a', dataDir, localDir: dir, log, engine: 'cpu' });
    await site.run(settings(), round1Update, { round: 1 });
    const g1 = { hash: sha256Hex(round1Update), size: round1Update.length, generation: 1 };
    const base = settings(g1);
    // 0.55 is on no calibration grid point: a threshold from the grid shows the calibration ran.
    const calibrated = TaskSettingsSchema.parse({ ...base, teacherStudent: { ...base.teacherStudent, confidence: 0.55, confidenceTarget: 0.9 } });
    const r = await site.run(calibrated, round1Update, { round: 2, teacherBytes: round1Update });
    expect(CONFIDENCE_GRID).toContain(r.metrics.teacher_confidence);
    const [poolDir] = readdirSync(join(dir, 'pseudo'));
    const meta = JSON.parse(readFileSync(join(dir, 'pseudo', poolDir, 'meta.json'), 'utf8'));
    expect(meta.confidence).toBe(r.metrics.teacher_confidence);
    // Soft labels are the teacher's probabilities: the stored mask is exactly "max probability ≥ the calibrated threshold".
    const b = decodeSafetensors(readFileSync(join(dir, 'pseudo', poolDir, 'pool-0.safetensors'))).bundle;
    const target = b.get('target')!.data as Float32Array;
    const mask = b.get('mask')!.data as Float32Array;
    for (let v = 0; v < mask.length; v++) expect(mask[v]).toBe(Math.max(target[2 * v], target[2 * v + 1]) >= meta.confidence ? 1 : 0);
  }, 120_000);

  it('adopts a new generation only when it passes the floor and beats the one in use; unmeasured never', () => {
    const prev = { generation: 1, modelHash: 'a'.repeat(64), dice: 0.6, dir: '/x' };
    expect(chooseTeacher({ generation: 1, dice: 0.4 }, undefined, 0.3)).toEqual({ use: 'new' });
    expect(chooseTeacher({ generation: 1, dice: 0.2 }, undefined, 0.3)).toEqual({ use: 'none' });
    expect(chooseTeacher({ generation: 1, dice: Number.NaN }, undefined, 0)).toEqual({ use: 'none' });
    expect(chooseTeacher({ generation: 2, dice: 0.7 }, prev, 0.3)).toEqual({ use: 'new' });
    expect(chooseTeacher({ generation: 2, dice: 0.6 }, prev, 0.3)).toEqual({ use: 'previous', why: 'not better' });
    expect(chooseTeacher({ generation: 2, dice: 0.2 }, prev, 0.3)).toEqual({ use: 'previous', why: 'below floor' });
    expect(chooseTeacher({ generation: 2, dice: Number.NaN }, prev, 0)).toEqual({ use: 'previous', why: 'below floor' });
    // A federation started afresh (generation numbers went back): the earlier choice does not count.
    expect(chooseTeacher({ generation: 1, dice: 0.4 }, { ...prev, generation: 3 }, 0.3)).toEqual({ use: 'new' });
  });

  it('names a site-independent model key only when every tensor is shared (so a caller may score it once)', () => {
    expect(lt.siteIndependentModelKey(settings(), round1Update)).toBeUndefined(); // the head stays at the site
    const all = TaskSettingsSchema.parse({ ...settings(), share: { parts: ['encoder', 'head'], keepLocal: [] }, sharedTensors: arch.params().map((p) => p.name) });
    expect(lt.siteIndependentModelKey(all, round1Update)).toBe(sha256Hex(round1Update));
  });

  it('says what is wrong when the teacher bytes are missing', async () => {
    const teacher = { hash: sha256Hex(round1Update), size: round1Update.length, generation: 1 };
    await expect(lt.run(settings(teacher), round1Update, { round: 4 })).rejects.toThrow(/task names teacher .* but its bytes were not given/);
    expect(existsSync(join(localDir, 'pseudo'))).toBe(true);
  });
});
