/**
 * A teacher–student federation of real processes (coordinator + 3 site agents, TLS + tokens): round 1 trains the
 * first teacher, round 2 each site pseudo-labels its unlabelled pool with it and trains a noised student. The wire
 * audit of every site shows that only the plan's shared tensors and aggregate metrics left it — no image, label,
 * pseudo-label or head tensor — while the pseudo-labels and the teacher head stay in the site's directory.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { localParams, sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { parseTeacher, TEACHER_KEY } from '../../coordinator/rounds/teacher.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';

describe('a teacher–student federation', () => {
  let fed: TestFederation;
  // modelMargin 0: round 2's teacher is the very model version the sites receive, which the default margin leaves out.
  const plan = TEST_PLAN({ rounds: 2, minSites: 3 }) + 'teacherStudent: { enabled: true, promoteEvery: 1, ratio: 1, confidence: 0.6, flipTTA: true, minTeacherDice: 0, maxForegroundFactor: 0, modelMargin: 0 }\n';
  const parsed = parsePlan(plan);
  const arch = architectureFor(parsed.model);

  beforeAll(async () => {
    fed = await makeFederation({ sites: 3, plan });
    for (const [i, s] of fed.sites.entries()) await writePhantomPool(fed.dataDir(s), { siteName: s, cases: 3, size: [16, 16, 16], seed: 100 + i, intensityShift: 20 * i });
    await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 150_000)));
    expect(codes).toEqual([0, 0, 0]);
  }, 200_000);

  afterAll(() => fed?.killAll());

  it('promoted round 1 to teacher and every site trained a student from it in round 2', () => {
    const store = fed.store();
    const rounds = store.listRounds();
    expect(rounds.map((r) => r.state)).toEqual(['closed', 'closed']);
    expect(parseTeacher(store.getMeta(TEACHER_KEY))).toEqual({ modelHash: rounds[1].resultModelHash, generation: 2, round: 2 });
    const metrics = store.listMetrics();
    for (const site of fed.sites) {
      const r1 = Object.fromEntries(metrics.filter((m) => m.round === 1 && m.site === site).map((m) => [m.key, m.value]));
      const r2 = Object.fromEntries(metrics.filter((m) => m.round === 2 && m.site === site).map((m) => [m.key, m.value]));
      expect(r1.teacher_generation).toBeUndefined();
      expect(r1.pseudo_used).toBeUndefined();
      expect(r2).toMatchObject({ teacher_generation: 1, pseudo_cases: 3, pseudo_used: 1 });
      // The teacher is the very model version the round started from: the site's check scores them alike.
      expect(r2.model_val_dice).toBe(r2.teacher_val_dice);
      expect(r2.val_dice_class_1).toBeGreaterThanOrEqual(0);
      expect(readFileSync(fed.logPath(site), 'utf8')).toContain('teacher model ready');
    }
    store.close();
  });

  it('kept pseudo-labels and the teacher head at the site', () => {
    for (const site of fed.sites) {
      const local = join(fed.siteDir(site), 'local');
      expect(readdirSync(local).some((f) => f.includes('-teacher-g1-'))).toBe(true);
      const [dir] = readdirSync(join(local, 'pseudo'));
      expect(readdirSync(join(local, 'pseudo', dir)).filter((f) => f.startsWith('pool-'))).toHaveLength(3);
    }
  });

  it('sent nothing but the shared tensors and aggregate metrics: no image, label, pseudo-label or head', () => {
    const shared = sharedParams(arch, parsed.share);
    const heads = localParams(arch, parsed.share).map((p) => p.name);
    expect(heads.length).toBeGreaterThan(0);
    const allowedMethods = new Set(['Heartbeat', 'SubscribeTasks', 'DownloadModel', 'UploadUpdate', 'ReportMetrics'].map((m) => `/medfl.v1.Federation/${m}`));
    const allowedMetrics = /^(num_train|num_val|train_loss|train_loss_first|train_seconds|val_dice_mean|val_dice_class_\d+|teacher_generation|teacher_val_dice|pseudo_cases|pseudo_confident_fraction|pseudo_skipped_by_prior|teacher_gated|teacher_confidence|pseudo_used|model_val_dice|teacher_behind_model)$/;
    const store = fed.store();
    const knownModels = new Set(store.listModels().map((m) => m.hash));
    store.close();
    const voxels = 16 * 16 * 16;
    for (const site of fed.sites) {
      const calls = readFileSync(join(fed.work, 'logs', `${site}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      for (const c of calls) expect(allowedMethods.has(c.method), c.method).toBe(true);
      const uploads = calls.filter((c) => c.method.endsWith('/UploadUpdate'));
      expect(uploads).toHaveLength(2);
      for (const u of uploads) {
        const tensors = u.payload!.tensors as { name: string; shape: number[] }[];
        // Exactly the shared encoder tensors with their plan shapes: no head, no volume-sized tensor.
        expect(tensors.map((t) => `${t.name}:${t.shape.join('x')}`).sort()).toEqual(shared.map((p) => `${p.name}:${p.shape.join('x')}`).sort());
        for (const t of tensors) expect(heads).not.toContain(t.name);
      }
      // Downloads only ask for model versions the coordinator holds (the global models and the teacher).
      const downloads = calls.filter((c) => c.method.endsWith('/DownloadModel'));
      // Two versions: the initial model and round 1's, which is also round 2's teacher — fetched once, then cached by hash.
      expect(downloads.map((d) => (d.messages[0] as { modelHash: string }).modelHash)).toHaveLength(2);
      for (const d of downloads) expect(knownModels.has((d.messages[0] as { modelHash: string }).modelHash)).toBe(true);
      for (const c of calls.filter((x) => x.method.endsWith('/ReportMetrics'))) {
        const values = (c.messages[0] as { values: Record<string, number> }).values;
        for (const k of Object.keys(values)) expect(k).toMatch(allowedMetrics);
      }
      // Outside uploads, no message carries bytes anywhere near the size of a volume, a label or a pseudo-label.
      const byteFields = JSON.stringify(calls.filter((c) => !c.method.endsWith('/UploadUpdate')).map((c) => c.messages)).match(/"bytes":\d+/g) ?? [];
      for (const f of byteFields) expect(Number(f.slice(8))).toBeLessThan(voxels);
      const text = JSON.stringify(calls);
      for (const needle of [fed.dataDir(site), fed.siteDir(site), 'imagesTr', 'labelsTr', '.nii', 'train-0', 'val-0', 'pool-0', 'pseudo-0', 'pseudo/', 'meta.json', 'teacher-g', '"head.']) {
        expect(text).not.toContain(needle);
      }
      expect(existsSync(join(fed.siteDir(site), 'local', 'pseudo'))).toBe(true);
    }
  });
});
