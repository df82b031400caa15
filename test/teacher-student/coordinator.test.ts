/**
 * The coordinator's teacher: promoted every `promoteEvery` rounds (event published), named in every task with
 * its hash, size and generation, downloadable like any model version, and kept across a restart.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { ModelCache } from '../../site-agent/transport/model-cache.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { promotion, parseTeacher, TEACHER_KEY } from '../../coordinator/rounds/teacher.ts';
import { InprocFederation } from '../aggregation/inproc.ts';
import { join } from 'node:path';

const plan = (ts: string) =>
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 3',
    'minSites: 2',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 60',
    `teacherStudent: ${ts}`,
    '',
  ].join('\n');

const feds: InprocFederation[] = [];
afterAll(async () => {
  for (const f of feds) await f.close();
});

describe('teacher promotion rule', () => {
  it('promotes every promoteEvery rounds, counts generations, and never when disabled', () => {
    const p = parsePlan(plan('{ enabled: true, promoteEvery: 2 }'));
    expect(promotion(p, 1, 'a'.repeat(64), undefined)).toBeUndefined();
    const g1 = promotion(p, 2, 'b'.repeat(64), undefined);
    expect(g1).toEqual({ modelHash: 'b'.repeat(64), generation: 1, round: 2 });
    expect(promotion(p, 4, 'c'.repeat(64), g1)?.generation).toBe(2);
    expect(promotion(p, 2, 'c'.repeat(64), g1)).toBeUndefined(); // a round already promoted is not promoted twice
    expect(promotion(parsePlan(plan('{ enabled: false, promoteEvery: 1 }')), 1, 'a'.repeat(64), undefined)).toBeUndefined();
    expect(() => parseTeacher('{"generation":1}')).toThrow(/malformed.*delete the meta key 'teacher'/);
  });

  it('the plan section is off by default and refuses unknown keys', () => {
    expect(parsePlan('rounds: 1\n').teacherStudent).toMatchObject({ enabled: false, promoteEvery: 2, ratio: 1, confidence: 0.9, labels: 'soft', flipTTA: false, classBalance: true, dropout: 0.5, strongAugment: true, minTeacherDice: 0.5 });
    expect(() => parsePlan('teacherStudent: { enabled: true, temperature: 2 }\n')).toThrow(/temperature/);
  });
});

describe('a coordinator with teacherStudent on', () => {
  it('promotes round results to teacher, names the teacher in tasks, and keeps it across a restart', async () => {
    const f = await InprocFederation.create(plan('{ enabled: true, promoteEvery: 1, ratio: 2, confidence: 0.8 }'), ['site-a', 'site-b']);
    feds.push(f);
    const sites = f.connect(['site-a', 'site-b']);
    const runRound = async (round: number) => {
      for (const [i, s] of f.sites.entries()) {
        const t = await f.task(s, round);
        const base = f.model(t.modelHash);
        const next = makeBundle([...base.values()].map((x) => ({ ...x, data: x.data.map((v) => v + 0.01 * (i + round)) })));
        const ack = await f.upload(s, t, encodeSafetensors(next));
        expect(ack.accepted, ack.reason).toBe(true);
      }
      await f.closedRounds(round);
    };
    const t1 = TaskSettingsSchema.parse(JSON.parse((await f.task(sites[0], 1)).settingsJson));
    expect(t1.teacherStudent).toMatchObject({ enabled: true, ratio: 2, confidence: 0.8 });
    expect(t1.teacher).toBeUndefined(); // no teacher before the first promotion
    await runRound(1);
    const r1 = f.coord!.store.getRound(1)!.resultModelHash!;
    const promoted = f.events.filter((e) => e.type === 'teacher.promoted');
    expect(promoted).toEqual([expect.objectContaining({ round: 1, model: r1, generation: 1 })]);

    const task2 = await f.task(sites[0], 2);
    const t2 = TaskSettingsSchema.parse(JSON.parse(task2.settingsJson));
    expect(t2.teacher).toMatchObject({ modelHash: r1, generation: 1 });
    // The site fetches the teacher by hash through DownloadModel, like the model.
    const cache = new ModelCache(join(f.work, 'site-a', 'teacher-cache'));
    await cache.ensure(sites[0].client, t2.teacher!.modelHash, t2.teacher!.modelSize);
    expect([...cache.hashes()]).toContain(r1);

    await runRound(2);
    const r2 = f.coord!.store.getRound(2)!.resultModelHash!;
    expect(parseTeacher(f.coord!.store.getMeta(TEACHER_KEY))).toEqual({ modelHash: r2, generation: 2, round: 2 });
    await f.stop();
    await f.start();
    const again = f.connect(['site-a', 'site-b']);
    const t3 = TaskSettingsSchema.parse(JSON.parse((await f.task(again[0], 3)).settingsJson));
    expect(t3.teacher).toMatchObject({ modelHash: r2, generation: 2 });
  });
});
