/**
 * `medfl experiment` on a tiny generated federation: every arm runs once per seed with the same plan, the arms
 * that share a path agree exactly, the teacher arm pseudo-labels, results are reduced to mean ± sd over seeds,
 * and the tables, results.json (with its `summary`) and the SVG are written.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { diceSvg, recommendedPlan, runExperiment, summarise, withOverrides, type ArmRun } from '../../cli/experiment.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';

const phantom = { sites: 2, cases: 2, valCases: 1, poolCases: 2, testCases: 2 };

describe('medfl experiment', () => {
  it('runs local-only, federated, teacher-student and pooled over two seeds and reports mean ± sd', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-'));
    const lines: string[] = [];
    const plan = PlanSchema.parse({
      model: { architecture: 'tiny3d', patch: [16, 16, 16], width: 4 },
      rounds: 2,
      local: { steps: 2, batchSize: 2, learningRate: 0.005 },
      // modelMargin 0: the arm must pseudo-label in two rounds, where the teacher is the model just received.
      teacherStudent: { promoteEvery: 1, confidence: 0.6, minTeacherDice: 0, modelMargin: 0 },
    });
    const r = await runExperiment({
      out, plan, arms: ['local-only', 'federated', 'teacher-student', 'pooled'], inits: ['scratch'], seeds: [1, 2], phantom, engine: 'cpu', say: (l) => lines.push(l),
    });
    expect(r.runs.map((x) => `${x.seed}/${x.arm}`)).toEqual([
      '1/local-only', '1/federated', '1/teacher-student', '1/pooled',
      '2/local-only', '2/federated', '2/teacher-student', '2/pooled',
    ]);
    for (const x of r.runs) {
      expect(x.mean).toHaveLength(2);
      for (const d of x.mean) expect(d).toBeGreaterThanOrEqual(0);
      // Every site has validation cases here, so every round has a validation Dice beside the test Dice.
      for (const v of x.valMean) expect(Number.isFinite(v)).toBe(true);
    }
    const by = (seed: number, arm: string) => r.runs.find((x) => x.seed === seed && x.arm === arm)!;
    // Same seed: before the first teacher exists, teacher-student is exactly the federation without it.
    expect(by(1, 'teacher-student').dice['site-a'][0]).toBe(by(1, 'federated').dice['site-a'][0]);
    // Another seed is another run.
    expect(by(2, 'federated').dice['site-a']).not.toEqual(by(1, 'federated').dice['site-a']);
    expect(Object.keys(by(1, 'pooled').dice)).toEqual(['pooled']);
    expect(lines.some((l) => l.includes('promoted to teacher generation 1'))).toBe(true);
    // Per generation: the teacher (aggregate of its round) against the last student it taught, from the same curves.
    const ts = by(1, 'teacher-student');
    expect(ts.generations).toEqual([
      { generation: 1, promotedAfterRound: 1, teacherTest: ts.mean[0], teacherVal: ts.valMean[0], studentRound: 2, studentTest: ts.mean[1], studentVal: ts.valMean[1], usedBySites: expect.any(Number) },
      { generation: 2, promotedAfterRound: 2, teacherTest: ts.mean[1], teacherVal: ts.valMean[1], studentRound: 2, studentTest: ts.mean[1], studentVal: ts.valMean[1], usedBySites: 0 },
    ]);
    expect(ts.generations![0].usedBySites).toBeGreaterThan(0);
    expect(by(1, 'federated').generations).toBeUndefined();
    // Per round with a teacher: where the sites used pseudo-labels, from the same metrics a coordinator records. In
    // round 2 the teacher is the very model each site received, so both score alike (a site may still have had
    // nothing to learn from: every pseudo-label off its labelled prior), and the counts agree with the generation's.
    const used = ts.generations![0].usedBySites;
    expect(ts.pseudoLabels).toEqual([{ round: 2, sitesWithTeacher: 2, sitesUsed: used, sitesRetired: 0, teacherVal: expect.any(Number), modelVal: expect.any(Number), bySite: expect.any(Object) }]);
    expect(ts.pseudoLabels![0].modelVal).toBe(ts.pseudoLabels![0].teacherVal);
    expect(Object.keys(ts.pseudoLabels![0].bySite)).toEqual(['site-a', 'site-b']);
    expect(Object.values(ts.pseudoLabels![0].bySite).filter((s) => s.used)).toHaveLength(used);
    expect(by(1, 'federated').pseudoLabels).toBeUndefined();
    expect(lines.some((l) => new RegExp(`\\[seed 1 / scratch / teacher-student\\] round 2/2: .*pseudo-labels at ${used}/2 sites \\(validation: teacher [\\d.]+, received model [\\d.]+\\)`).test(l))).toBe(true);
    expect(lines.some((l) => l.includes(`pseudo-labels used in ${used} of 2 site-rounds that had a teacher`))).toBe(true);
    expect(lines.some((l) => /generation 1 \(round 1\): teacher test Dice [\d.]+ .* its last student, round 2/.test(l))).toBe(true);
    expect(readdirSync(join(out, 'work', 'seed-1', 'scratch', 'teacher-student', 'site-a', 'pseudo'))).toHaveLength(1);
    // The pooled folder: every site's labelled training cases for training, their validation cases for validation.
    expect(readdirSync(join(out, 'data', 'pooled', 'labelsTr'))).toHaveLength(4);
    expect(readdirSync(join(out, 'data', 'pooled', 'labelsTs'))).toHaveLength(2);

    const json = JSON.parse(readFileSync(r.jsonPath, 'utf8'));
    expect(json.summary).toHaveLength(4);
    const fed = json.summary.find((s: { arm: string }) => s.arm === 'federated');
    expect(fed.seeds).toEqual([1, 2]);
    const finals = [by(1, 'federated').mean[1], by(2, 'federated').mean[1]];
    expect(fed.meanDice).toBeCloseTo((finals[0] + finals[1]) / 2, 10);
    expect(fed.sdDice).toBeCloseTo(Math.abs(finals[0] - finals[1]) / Math.SQRT2, 10);
    expect(json.simulated).toMatch(/in-process/);
    expect(r.summaryTable).toContain('±');
    expect(r.roundsTable).toContain('r2');
    expect(r.sitesTable).toContain('site-b');
    const svg = readFileSync(r.svgPath, 'utf8');
    expect((svg.match(/<polyline/g) ?? []).length).toBe(4);
    expect((svg.match(/<polygon/g) ?? []).length).toBe(4); // a ±sd band per arm (two seeds)
  }, 240_000);

  it('runs Med3D with BatchNorm kept at the sites (FedBN), from scratch and from a given pretrained encoder', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-fedbn-'));
    const plan = PlanSchema.parse({ model: { architecture: 'med3d', widthMultiplier: 0.25, patch: [16, 16, 16] }, rounds: 1, local: { steps: 1 }, share: { keepLocal: ['norm'] } });
    // A "pretrained" encoder: another seed's weights, written as a MedFL safetensors file.
    const { architectureFor } = await import('../../shared/model/registry.ts');
    const { encodeSafetensors, decodeSafetensors } = await import('../../shared/tensors/safetensors.ts');
    const pretrained = join(out, 'encoder.safetensors');
    writeFileSync(pretrained, encodeSafetensors(architectureFor(plan.model).init(99)));
    const r = await runExperiment({ out, plan, arms: ['federated'], inits: ['scratch', 'pretrained'], seeds: [1], pretrained, phantom: { ...phantom, poolCases: 1, testCases: 1 }, engine: 'cpu' });
    expect(r.runs.map((x) => `${x.init}/${x.arm}`)).toEqual(['scratch/federated', 'pretrained/federated']);
    // A rerun into the same folder starts afresh (no head or optimiser state left by the first run): same numbers.
    const again = await runExperiment({ out, plan, arms: ['federated'], inits: ['scratch'], seeds: [1], pretrained, phantom: { ...phantom, poolCases: 1, testCases: 1 }, engine: 'cpu' });
    expect(again.runs[0].dice).toEqual(r.runs[0].dice);
    expect(again.runs[0].val).toEqual(r.runs[0].val);
    expect(r.pretrainedNote).toContain(pretrained);
    // Each site keeps its BatchNorm tensors in its own local file.
    const dir = join(out, 'work', 'seed-1', 'pretrained', 'federated', 'site-a');
    const local = readdirSync(dir).filter((f) => /^med3d-[0-9a-f]+\.safetensors$/.test(f));
    expect(local).toHaveLength(1);
    const kept = decodeSafetensors(readFileSync(join(dir, local[0]))).bundle;
    expect(kept.has('encoder.layer1.0.bn1.weight')).toBe(true);
    expect(kept.has('encoder.conv1.weight')).toBe(false);
  }, 240_000);

  it('runs the recommended Med3D plan from scratch and from a federated self-supervised encoder pretrained first on the sites\' scans', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-ssl-'));
    const base = recommendedPlan('med3d', 2);
    expect(base.model).toMatchObject({ head: 'unet', norm: 'group' });
    expect(base.share).toEqual({ parts: ['encoder', 'head'], keepLocal: [] });
    expect(base.data.biasCorrection).toBe('polynomial');
    expect(base.data.augment && base.data.augment.blurProbability).toBe(0.3);
    const plan = PlanSchema.parse({ ...withOverrides(base, { rounds: 1, steps: 1, patch: [16, 16, 16] }), pretraining: { rounds: 1, steps: 2 } });
    const lines: string[] = [];
    const r = await runExperiment({ out, plan, arms: ['federated'], inits: ['scratch', 'federated-ssl'], seeds: [1], phantom: { ...phantom, poolCases: 1, testCases: 1 }, engine: 'cpu', say: (l) => lines.push(l) });
    expect(r.runs.map((x) => `${x.init}/${x.arm}`)).toEqual(['scratch/federated', 'federated-ssl/federated']);
    expect(lines.some((l) => /federated self-supervised pretraining, 1 rounds × 2 steps/.test(l))).toBe(true);
    const json = JSON.parse(readFileSync(r.jsonPath, 'utf8'));
    expect(json.pretraining).toHaveLength(1);
    expect(json.pretraining[0].lossPerRound).toHaveLength(1);
    expect(Number.isFinite(json.pretraining[0].lossPerRound[0])).toBe(true);
    // The federated-ssl arm starts from the pretrained encoder, not from the scratch weights of the same seed.
    const { architectureFor } = await import('../../shared/model/registry.ts');
    const { readPretrainedEncoder } = await import('../../shared/model/pretrained-encoder-file.ts');
    const pre = readPretrainedEncoder(readFileSync(json.pretraining[0].encoderPath));
    expect(pre.provenance?.objective).toBe('restoration');
    expect(pre.bundle.get('encoder.conv1.weight')!.data).not.toEqual(architectureFor({ ...plan.model, seed: 1 }).init(1).get('encoder.conv1.weight')!.data);
  }, 240_000);

  it('pretrains on the training sites plus pretraining-only folders, and refuses folders that would leak or double-count scans', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-presites-'));
    const { generatePhantomFederation } = await import('../../cli/experiment/data.ts');
    const extra = await generatePhantomFederation(join(out, 'extra'), { sites: 1, cases: 1, valCases: 0, poolCases: 2, testCases: 1 }, [16, 16, 16], 7);
    const base = recommendedPlan('med3d', 2);
    const plan = PlanSchema.parse({ ...withOverrides(base, { rounds: 1, steps: 1, patch: [16, 16, 16] }), pretraining: { rounds: 1, steps: 1 } });
    const lines: string[] = [];
    const r = await runExperiment({ out, plan, arms: ['federated'], inits: ['federated-ssl'], seeds: [1], pretrainingSites: extra.sites, phantom: { ...phantom, poolCases: 1, testCases: 1 }, engine: 'cpu', say: (l) => lines.push(l) });
    expect(lines.some((l) => /pretraining, 1 rounds × 1 steps on every scan of 2 training \+ 1 pretraining-only sites/.test(l))).toBe(true);
    const { readPretrainedEncoder } = await import('../../shared/model/pretrained-encoder-file.ts');
    const json = JSON.parse(readFileSync(r.jsonPath, 'utf8'));
    expect(readPretrainedEncoder(readFileSync(json.pretraining[0].encoderPath)).provenance?.sites).toHaveLength(3);
    // Only the training sites train and are scored.
    expect(Object.keys(r.runs[0].dice)).toHaveLength(2);

    const run = (o: { sites: string[]; test: string; pretrainingSites: string[]; inits?: ('scratch' | 'federated-ssl')[] }) =>
      runExperiment({ out: mkdtempSync(join(tmpdir(), 'medfl-exp-presites-bad-')), plan, arms: ['federated'], inits: o.inits ?? ['federated-ssl'], seeds: [1], phantom, engine: 'cpu', ...o });
    const sites = [join(out, 'data', 'site-a'), join(out, 'data', 'site-b')];
    const test = join(out, 'data', 'test');
    await expect(run({ sites, test, pretrainingSites: extra.sites, inits: ['scratch'] })).rejects.toThrow(/add federated-ssl to --inits/);
    await expect(run({ sites, test, pretrainingSites: [test] })).rejects.toThrow(/is the test folder/);
    await expect(run({ sites, test, pretrainingSites: [sites[1]] })).rejects.toThrow(/already one of the training sites/);
    await expect(run({ sites, test, pretrainingSites: [extra.sites[0], extra.sites[0]] })).rejects.toThrow(/listed twice/);
  }, 240_000);

  it('refuses a pretrained init without an encoder file, and invalid overrides with the field', async () => {
    const plan = withOverrides(recommendedPlan('tiny3d', 2), { rounds: 1, steps: 1 });
    await expect(runExperiment({ out: mkdtempSync(join(tmpdir(), 'medfl-exp-nopre-')), plan, arms: ['federated'], inits: ['pretrained'], seeds: [1], phantom, engine: 'cpu' })).rejects.toThrow(/--pretrained/);
    expect(() => withOverrides(plan, { batchSize: 0 })).toThrow(/local\.batchSize/);
  }, 120_000);

  it('summarises over seeds: the final round, the best round, and the round validation picks', () => {
    const run = (seed: number, mean: number[], valMean: number[]): ArmRun => ({ arm: 'federated', init: 'scratch', seed, dice: { a: mean }, val: { a: valMean }, mean, valMean, seconds: 2 });
    const [s] = summarise([run(1, [0.2, 0.5, 0.4], [0.1, 0.3, 0.6]), run(2, [0.3, 0.6, 0.6], [0.2, 0.5, 0.4])]);
    expect(s.meanDice).toBeCloseTo(0.5, 12);
    expect(s.sdDice).toBeCloseTo(Math.sqrt(0.02), 12);
    expect(s.bestDice).toEqual([0.5, 0.6]);
    expect(s.selectedDice).toEqual([0.4, 0.6]); // validation picks round 3 for seed 1, round 2 for seed 2
    expect(s.maxFinalDrop).toBeCloseTo(0.1, 12);
  });

  it('plots dashed lines for scratch and clamps Dice to the axis', () => {
    const res: ArmRun[] = [{ arm: 'federated', init: 'scratch', seed: 1, dice: { a: [0.2, 1.5] }, val: { a: [0, 0] }, mean: [0.2, 1.5], valMean: [0, 0], seconds: 1 }];
    const svg = diceSvg(res);
    expect(svg).toContain('stroke-dasharray');
    expect(svg).toContain('federated (scratch)');
    expect(svg).not.toMatch(/points="[^"]*,-/); // 1.5 is drawn at the top, not above it
  });
});
