import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readNifti } from '../../site-agent/data/nifti.ts';
import { axcodes } from '../../site-agent/data/orientation.ts';
import { SiteData } from '../../site-agent/data/site-data.ts';
import { caseSeed, generateBenchmark, synthesizeCase, type GeneratedBenchmark } from '../../site-agent/data/synthetic-brain/generate.ts';
import { BenchmarkOptionsSchema, type BenchmarkOptionsInput } from '../../site-agent/data/synthetic-brain/options.ts';
import { profileFor, SCANNER_PROFILES } from '../../site-agent/data/synthetic-brain/profiles.ts';
import { loadTestFolder } from '../../site-agent/data/synthetic-brain/test-folder.ts';
import { thresholdBaseline } from '../../site-agent/data/threshold-baseline.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-synth-brain-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// A coarse 4 mm version of the benchmark (same anatomy in fewer voxels) keeps the file under a minute.
const SPACING = 4;
const small: BenchmarkOptionsInput = { seed: 7, sites: 3, labelled: 12, unlabelled: 6, testPerSite: 2, shape: [40, 48, 40], spacingMm: SPACING };
const plan = { patch: [16, 16, 16] as const, spacing: [SPACING, SPACING, SPACING] as const };
let bench: GeneratedBenchmark;

beforeAll(async () => {
  bench = await generateBenchmark(join(tmp, 'bench'), small);
});

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => (statSync(join(dir, f)).isDirectory() ? files(join(dir, f)) : [join(dir, f)]));
}

/** Mean normalised intensity inside the label (z-score units; the brain's mean is 0). */
function lesionZ(image: Float32Array, label: Uint8Array): number {
  let s = 0;
  let n = 0;
  for (let k = 0; k < label.length; k++) {
    if (label[k]) {
      s += image[k];
      n++;
    }
  }
  return s / n;
}

describe('synthetic brain benchmark: layout', () => {
  it('writes one MSD folder per site that SiteData reads as 12 labelled + 6 unlabelled, and a test folder of imagesTs/labelsTs only', async () => {
    expect(bench.siteDirs).toHaveLength(3);
    for (const dir of bench.siteDirs) {
      const data = await SiteData.open(dir, { patch: plan.patch });
      expect(data.train).toHaveLength(12);
      expect(data.unlabelled).toHaveLength(6);
      expect(data.val).toHaveLength(0);
      expect(data.labels).toEqual(['background', 'lesion']);
      expect(data.layout.problems).toEqual([]);
      expect(existsSync(join(dir, 'imagesTs'))).toBe(false);
    }
    expect(readdirSync(bench.testDir).sort()).toEqual(['imagesTs', 'labelsTs']);
    expect(readdirSync(join(bench.testDir, 'imagesTs'))).toHaveLength(6);
    expect(readdirSync(join(bench.testDir, 'labelsTs'))).toHaveLength(6);
    const test = await loadTestFolder(bench.testDir, plan.spacing);
    expect(test).toHaveLength(6);
    for (const c of test) expect(c.shape).toEqual([40, 48, 40]);
  });

  it('refuses to write over an earlier run unless told to, and validates options', async () => {
    await expect(generateBenchmark(join(tmp, 'bench'), small)).rejects.toThrow(/not empty/);
    expect(BenchmarkOptionsSchema.safeParse({ knobs: { lesionFraction: [0.01, 0.001] } }).success).toBe(false);
    expect(BenchmarkOptionsSchema.safeParse({ sites: 0 }).success).toBe(false);
    expect(BenchmarkOptionsSchema.safeParse({ colour: 'blue' }).success).toBe(false);
  });
});

describe('synthetic brain benchmark: what the loader sees', () => {
  it('stores each site in its own axis order and datatype, and the loader brings every case back to the canonical RAS+ grid with the label on the lesion', async () => {
    const o = BenchmarkOptionsSchema.parse(small);
    const codes = new Set<string>();
    for (let i = 0; i < 3; i++) {
      const profile = profileFor(i);
      const dir = bench.siteDirs[i];
      const first = readdirSync(join(dir, 'imagesTr')).sort()[0];
      const stored = await readNifti(join(dir, 'imagesTr', first));
      expect(axcodes(stored.affine)).toBe(profile.axcodes);
      expect(stored.datatype).toBe(profile.datatype);
      codes.add(axcodes(stored.affine));

      // Native grid: exactly the generator's canonical volume (labels bit for bit, the brain mask voxel for voxel).
      const expected = synthesizeCase(caseSeed(o.seed, i, 0, 'site'), profile, o).acquisition;
      const data = await SiteData.open(dir, { patch: plan.patch });
      const c = (await data.load(data.train[0]))!;
      expect(c.shape).toEqual(expected.shape);
      expect(c.spacing.map((s) => +s.toFixed(3))).toEqual(expected.spacingMm.map((s) => +s.toFixed(3)));
      expect(Buffer.from(c.label!).equals(Buffer.from(expected.label))).toBe(true);
      let maskMismatch = 0;
      for (let k = 0; k < c.label!.length; k++) if ((c.channels[0][k] !== 0) !== (expected.image[k] !== 0)) maskMismatch++;
      expect(maskMismatch).toBe(0);

      // With the plan spacing every profile comes back to the phantom grid, and lesions are bright on average.
      const planned = await SiteData.open(dir, plan);
      const zs: number[] = [];
      for (const ref of planned.train) {
        const pc = (await planned.load(ref))!;
        expect(pc.shape).toEqual([40, 48, 40]);
        zs.push(lesionZ(pc.channels[0], pc.label!));
      }
      expect(zs.reduce((s, z) => s + z, 0) / zs.length).toBeGreaterThan(0.5);
    }
    expect(codes.size).toBe(3);
  });

  it('keeps every case (train and test) at 0.1–1 % lesion volume on its written grid', async () => {
    const fractions: number[] = [];
    for (const dir of bench.siteDirs) {
      const data = await SiteData.open(dir, { patch: plan.patch });
      for (const ref of data.train) {
        const c = (await data.load(ref))!;
        fractions.push(c.label!.reduce((s, v) => s + v, 0) / c.label!.length);
      }
    }
    for (const c of await loadTestFolder(bench.testDir)) fractions.push(c.label!.reduce((s, v) => s + v, 0) / c.label!.length);
    expect(fractions).toHaveLength(3 * 12 + 6);
    for (const f of fractions) {
      expect(f).toBeGreaterThanOrEqual(0.001);
      expect(f).toBeLessThanOrEqual(0.01);
    }
    // The reported fractions are the written ones.
    expect(bench.sites[0].cases[0].lesionFraction).toBeCloseTo(fractions[0], 10);
  });

  it('gives the sites really different contrast: mean normalised lesion intensity differs across profiles', async () => {
    const means: number[] = [];
    for (const dir of bench.siteDirs) {
      const data = await SiteData.open(dir, plan);
      const zs: number[] = [];
      for (const ref of data.train) {
        const c = (await data.load(ref))!;
        zs.push(lesionZ(c.channels[0], c.label!));
      }
      means.push(zs.reduce((s, z) => s + z, 0) / zs.length);
    }
    expect(Math.max(...means) - Math.min(...means)).toBeGreaterThan(0.4);
  });

  it('writes the default 80×96×80 grid, resampled or thinned per profile, within the lesion range', () => {
    const o = BenchmarkOptionsSchema.parse({});
    const shapes = SCANNER_PROFILES.map((p, i) => {
      const a = synthesizeCase(caseSeed(o.seed, i, 0, 'site'), p, o).acquisition;
      const f = a.lesionVoxels / a.image.length;
      expect(f).toBeGreaterThanOrEqual(0.001);
      expect(f).toBeLessThanOrEqual(0.01);
      return a.shape;
    });
    expect(shapes).toEqual([[80, 96, 80], [80, 96, 80], [64, 77, 64], [80, 96, 53]]);
  });
});

describe('synthetic brain benchmark: determinism', () => {
  it('writes byte-identical files for the same seed and different ones for another seed', async () => {
    const tiny = (seed: number): BenchmarkOptionsInput => ({ seed, sites: 3, labelled: 1, unlabelled: 1, testPerSite: 1, shape: [32, 40, 32], spacingMm: 5 });
    const a = await generateBenchmark(join(tmp, 'det-a'), tiny(3));
    const b = await generateBenchmark(join(tmp, 'det-b'), tiny(3));
    const c = await generateBenchmark(join(tmp, 'det-c'), tiny(4));
    const list = (r: GeneratedBenchmark) => files(r.root).map((f) => relative(r.root, f)).sort();
    expect(list(a)).toEqual(list(b));
    expect(list(a).filter((f) => f.endsWith('.nii.gz'))).toHaveLength(3 * (2 + 1) + 3 * 2);
    for (const f of list(a)) expect(readFileSync(join(b.root, f)).equals(readFileSync(join(a.root, f))), f).toBe(true);
    for (const f of list(a).filter((g) => g.includes('images'))) {
      expect(readFileSync(join(c.root, f)).equals(readFileSync(join(a.root, f))), f).toBe(false);
    }
  });
});

describe('threshold baseline', () => {
  it('fits a threshold on a site’s labelled cases and scores the test cases: a real but far from perfect Dice', async () => {
    const test = await loadTestFolder(bench.testDir, plan.spacing);
    const r = await thresholdBaseline(bench.siteDirs[0], test, { spacing: plan.spacing });
    expect(r.trainCases).toBe(12);
    expect(r.testDicePerCase).toHaveLength(6);
    expect(r.trainDice).toBeGreaterThan(0);
    expect(r.trainDice).toBeLessThan(1);
    expect(r.testDice).toBeGreaterThan(0);
    expect(r.testDice).toBeLessThan(0.75);
    expect(r.threshold).toBeGreaterThan(0);
  });

  it('is perfect when intensity alone separates the lesion (the rule itself works)', async () => {
    // Test cases whose image is the label itself plus a constant brain: any threshold in (1, 2) is exact.
    const test = (await loadTestFolder(bench.testDir, plan.spacing)).map((c) => ({
      shape: c.shape,
      label: c.label,
      channels: [Float32Array.from(c.channels[0], (v, k) => (v === 0 ? 0 : 1 + 2 * c.label![k]))],
    }));
    const r = await thresholdBaseline(bench.siteDirs[0], test, { spacing: plan.spacing, thresholds: [1.5], minComponentVoxels: [0] });
    expect(r.testDice).toBe(1);
  });
});
