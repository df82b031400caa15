/**
 * `medfl experiment` on a tiny generated federation: every arm × init is run with the same seeds, the arms that
 * share a path agree exactly, the teacher arm pseudo-labels, and the table, results.json and SVG are written.
 */
import { describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { diceSvg, runExperiment, type ArmResult } from '../../cli/experiment.ts';

describe('medfl experiment', () => {
  it('runs local-only, federated, teacher-student and pooled from scratch and pretrained, and writes table, JSON and plot', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-'));
    const lines: string[] = [];
    const r = await runExperiment({
      out,
      rounds: 2,
      steps: 2,
      batchSize: 2,
      learningRate: 0.005,
      arch: 'tiny3d',
      patch: [16, 16, 16],
      width: 4,
      pretrainSteps: 2,
      arms: ['local-only', 'federated', 'teacher-student', 'pooled'],
      inits: ['scratch', 'pretrained'],
      seed: 1,
      promoteEvery: 1,
      ratio: 1,
      confidence: 0.6,
      labels: 'soft',
      flipTTA: false,
      dropout: 0.5,
      strongAugment: true,
      classBalance: true,
      minTeacherDice: 0,
      phantom: { sites: 2, cases: 2, valCases: 1, poolCases: 2, testCases: 2 },
      engine: 'cpu',
      say: (l) => lines.push(l),
    });
    expect(r.results.map((x) => `${x.init}/${x.arm}`)).toEqual([
      'scratch/local-only', 'scratch/federated', 'scratch/teacher-student', 'scratch/pooled',
      'pretrained/local-only', 'pretrained/federated', 'pretrained/teacher-student', 'pretrained/pooled',
    ]);
    for (const x of r.results) {
      expect(x.mean).toHaveLength(2);
      for (const d of x.mean) expect(d).toBeGreaterThanOrEqual(0);
    }
    const by = (init: string, arm: string) => r.results.find((x) => x.init === init && x.arm === arm)!;
    // Same seeds: before the first teacher exists, teacher-student is exactly FedAvg.
    expect(by('scratch', 'teacher-student').dice['site-a'][0]).toBe(by('scratch', 'federated').dice['site-a'][0]);
    expect(Object.keys(by('scratch', 'pooled').dice)).toEqual(['pooled']);
    expect(lines.some((l) => l.includes('pretrained here'))).toBe(true);
    expect(lines.some((l) => l.includes('promoted to teacher generation 1'))).toBe(true);
    expect(readdirSync(join(out, 'work', 'scratch', 'teacher-student', 'site-a', 'pseudo'))).toHaveLength(1);
    // The pooled folder holds every site's labelled training cases and nothing else.
    expect(readdirSync(join(out, 'data', 'pooled', 'labelsTr'))).toHaveLength(4);
    expect(r.table).toContain('teacher-student');
    expect(r.summary).toContain('pretrained: Dice r2');
    expect((readFileSync(r.svgPath, 'utf8').match(/<polyline/g) ?? []).length).toBe(8);
    const json = JSON.parse(readFileSync(r.jsonPath, 'utf8'));
    expect(json.simulated).toMatch(/in-process/);
    expect(existsSync(join(out, 'pretrained-encoder.safetensors'))).toBe(true);
  }, 180_000);

  it('runs Med3D with BatchNorm kept at the sites (FedBN), from scratch and from an encoder pretrained here', async () => {
    const out = mkdtempSync(join(tmpdir(), 'medfl-exp-fedbn-'));
    const r = await runExperiment({
      out, rounds: 1, steps: 1, batchSize: 2, learningRate: 0.005, arch: 'med3d', patch: [16, 16, 16], width: 4, pretrainSteps: 1,
      arms: ['federated'], inits: ['scratch', 'pretrained'], seed: 1, keepLocal: ['norm'],
      promoteEvery: 1, ratio: 1, confidence: 0.6, labels: 'soft', flipTTA: false, dropout: 0.5, strongAugment: true, classBalance: true, minTeacherDice: 0,
      phantom: { sites: 2, cases: 2, valCases: 1, poolCases: 1, testCases: 1 },
      engine: 'cpu',
      say: () => undefined,
    });
    expect(r.results.map((x) => `${x.init}/${x.arm}`)).toEqual(['scratch/federated', 'pretrained/federated']);
    // The pretrained encoder is whole (BatchNorm included) even though the arms keep BatchNorm local.
    const { decodeSafetensors } = await import('../../shared/tensors/safetensors.ts');
    const pre = decodeSafetensors(readFileSync(join(out, 'pretrained-encoder.safetensors'))).bundle;
    expect(pre.has('encoder.bn1.running_var')).toBe(true);
    // Each site keeps its BatchNorm tensors in its own local file.
    const local = readdirSync(join(out, 'work', 'pretrained', 'federated', 'site-a')).filter((f) => f.startsWith('med3d-'));
    expect(local).toHaveLength(1);
    const kept = decodeSafetensors(readFileSync(join(out, 'work', 'pretrained', 'federated', 'site-a', local[0]))).bundle;
    expect(kept.has('encoder.layer1.0.bn1.weight')).toBe(true);
    expect(kept.has('encoder.conv1.weight')).toBe(false);
  }, 180_000);

  it('plots dashed lines for scratch and clamps Dice to the axis', () => {
    const res: ArmResult[] = [{ arm: 'federated', init: 'scratch', dice: { a: [0.2, 1.5] }, mean: [0.2, 1.5], seconds: 1 }];
    const svg = diceSvg(res, 2);
    expect(svg).toContain('stroke-dasharray');
    expect(svg).toContain('federated (scratch)');
    expect(svg).not.toMatch(/points="[^"]*,-/); // 1.5 is drawn at the top, not above it
  });
});
