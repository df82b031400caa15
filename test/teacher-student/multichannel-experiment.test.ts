/**
 * `medfl experiment` on 4-channel sites (BraTS-like generated MSD folders): the threshold, federated and
 * teacher–student arms run with model.inputChannels 4, the teacher pseudo-labels the sites' unlabelled 4-channel
 * scans, and what is not supported yet with several channels (federated self-supervised pretraining, the
 * one-channel generated federation) is refused by name before anything runs.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runExperiment } from '../../cli/experiment.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { writeMultiChannelSite } from '../helpers/multichannel-site.ts';

const size = [16, 16, 16] as const;
const plan = PlanSchema.parse({
  model: { architecture: 'med3d', widthMultiplier: 0.0625, patch: [16, 16, 16], inputChannels: 4 },
  rounds: 2,
  local: { steps: 1, batchSize: 2 },
  // modelMargin 0: the arm must pseudo-label in two rounds, where the teacher is the model just received.
  teacherStudent: { promoteEvery: 1, confidence: 0.5, minTeacherDice: 0, modelMargin: 0 },
});
const phantom = { sites: 2, cases: 2, valCases: 1, poolCases: 1, testCases: 1 };

describe('medfl experiment with 4-channel inputs', () => {
  it('runs threshold, federated and teacher–student arms, pseudo-labelling 4-channel unlabelled scans', async () => {
    const root = mkdtempSync(join(tmpdir(), 'medfl-exp-mc-'));
    const sites = [join(root, 'site-a'), join(root, 'site-b')];
    for (const [i, dir] of sites.entries()) {
      await writeMultiChannelSite(dir, { cases: 3, valCases: 1, size, seed: 10 + i });
      // The third training case loses its label: the site's unlabelled pool.
      rmSync(join(dir, 'labelsTr', 'mm_002.nii.gz'));
    }
    const test = join(root, 'test');
    await writeMultiChannelSite(test, { cases: 2, size, seed: 30 });
    const lines: string[] = [];
    const r = await runExperiment({
      out: join(root, 'out'), plan, arms: ['threshold', 'federated', 'teacher-student'], inits: ['scratch'], seeds: [1], sites, test, phantom, engine: 'cpu', say: (l) => lines.push(l),
    });
    expect(r.runs.map((x) => x.arm)).toEqual(['threshold', 'federated', 'teacher-student']);
    for (const x of r.runs) for (const d of x.mean) expect(Number.isFinite(d)).toBe(true);
    expect(lines.some((l) => l.includes('promoted to teacher generation 1'))).toBe(true);
    // Each site's teacher pass wrote its pool's pseudo-labels (generation 1) from the 4-channel scans.
    for (const site of ['site-a', 'site-b']) {
      expect(readdirSync(join(root, 'out', 'work', 'seed-1', 'scratch', 'teacher-student', site, 'pseudo'))).toHaveLength(1);
    }
  }, 400_000);

  it('refuses federated self-supervised pretraining and the one-channel generated federation by name', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-mc-refuse-'));
    await expect(runExperiment({ out, plan, arms: ['federated'], inits: ['scratch'], seeds: [1], phantom, engine: 'cpu' })).rejects.toThrow(
      /model\.inputChannels is 4 but the generated phantom federation has one channel: give --sites and --test/,
    );
    await expect(runExperiment({ out, plan, arms: ['federated'], inits: ['federated-ssl'], seeds: [1], sites: [out], test: out, phantom, engine: 'cpu' })).rejects.toThrow(
      /--inits federated-ssl: restoration pretraining takes one-channel patches, and model\.inputChannels is 4/,
    );
  });
});
