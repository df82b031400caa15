/**
 * `medfl benchmark generate`: write the synthetic multi-site brain-lesion benchmark (docs/benchmark.md), and
 * `medfl benchmark baseline`: score the classical intensity-threshold baseline on it. The heavy modules load
 * only when a command runs.
 */
import type { Command } from 'commander';
import Table from 'cli-table3';
import { resolve } from 'node:path';
import { siteLetters } from '../shared/protocol/site-names.ts';

const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });
const say = (s: string) => process.stdout.write(s + '\n');

function numberFlag(name: string, v: unknown): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got ${String(v)}`);
  return n;
}

function listFlag(name: string, v: unknown, length: number): number[] | undefined {
  if (v === undefined) return undefined;
  const parts = String(v).split(',').map((s) => Number(s.trim()));
  if (parts.length !== length || !parts.every(Number.isFinite)) throw new Error(`--${name} takes ${length} comma-separated numbers, got ${String(v)}`);
  return parts;
}

/** Drop undefined fields so zod fills in its defaults. */
function defined<T extends Record<string, unknown>>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

const pct = (f: number) => `${(100 * f).toFixed(2)} %`;

async function runBaseline(siteDirs: readonly string[], testDir: string, spacing: readonly [number, number, number] | undefined, profiles?: readonly string[]): Promise<void> {
  const { thresholdBaseline } = await import('../site-agent/data/threshold-baseline.ts');
  const { loadTestFolder } = await import('../site-agent/data/synthetic-brain/test-folder.ts');
  const test = await loadTestFolder(testDir, spacing);
  const t = new Table({ head: ['site', 'profile', 'threshold (z)', 'min component', 'train Dice', 'test Dice (all)', 'test Dice (own profile)'], ...style() });
  for (const [i, dir] of siteDirs.entries()) {
    const r = await thresholdBaseline(dir, test, spacing ? { spacing } : {});
    // Benchmark test cases are named test<letter>_NNN after the site whose profile scanned them.
    const letter = siteLetters(i);
    const ownIdx = test.flatMap((c, k) => (c.name.startsWith(`test${letter}_`) ? [k] : []));
    const own = ownIdx.length ? ownIdx.reduce((s, k) => s + r.testDicePerCase[k], 0) / ownIdx.length : Number.NaN;
    t.push([dir.split('/').pop() ?? dir, profiles?.[i] ?? '—', r.threshold.toFixed(2), String(r.minComponentVoxels), r.trainDice.toFixed(3), r.testDice.toFixed(3), Number.isNaN(own) ? '—' : own.toFixed(3)]);
  }
  say('Classical baseline: a global threshold on normalised intensity inside the brain mask, fitted per site on its labelled cases');
  say(t.toString());
}

export function registerBenchmarkCommand(program: Command): void {
  const bench = program.command('benchmark').description('the synthetic multi-site brain-lesion benchmark (docs/benchmark.md)');

  bench
    .command('generate')
    .description('write site folders (MSD layout, one scanner profile each) and a shared test folder (imagesTs + labelsTs); deterministic in --seed')
    .requiredOption('--out <dir>', 'output folder (site-a, site-b, …, test, benchmark.json)')
    .option('--seed <n>', 'seed (same seed → byte-identical files)')
    .option('--sites <n>', 'sites, one scanner profile each (4 profiles, then repeated)')
    .option('--labelled <n>', 'labelled cases per site')
    .option('--unlabelled <n>', 'unlabelled (pool) cases per site')
    .option('--test-per-site <n>', 'test subjects per site profile')
    .option('--shape <dhw>', 'phantom grid D,H,W (default 80,96,80)')
    .option('--spacing <mm>', 'phantom voxel size in mm (default 2)')
    .option('--lesion-contrast <lo,hi>', 'knob: lesion brightness over white matter (default 0.35,1.0)')
    .option('--lesion-radius <lo,hi>', 'knob: starting lesion radius in mm (default 3,12)')
    .option('--lesion-count <lo,hi>', 'knob: lesions per case (default 1,6)')
    .option('--lesion-fraction <lo,hi>', 'knob: total lesion volume / volume (default 0.001,0.01)')
    .option('--periventricular <share>', 'knob: share of lesions next to a ventricle (default 0.5)')
    .option('--distractors <x>', 'knob: unlabelled bright look-alikes, 0 none, 1 default, 2 double')
    .option('--noise-scale <x>', 'knob: multiplies each profile noise level (default 1)')
    .option('--bias-scale <x>', 'knob: multiplies each profile bias-field strength (default 1)')
    .option('--blur-scale <x>', 'knob: multiplies each profile blur (default 1)')
    .option('--texture-scale <x>', 'knob: within-tissue texture amplitude (default 1)')
    .option('--overwrite', 'replace site/test folders of an earlier run in --out')
    .option('--baseline', 'then fit and score the intensity-threshold baseline per site')
    .action(async (a: Record<string, string | boolean | undefined>) => {
      const { generateBenchmark } = await import('../site-agent/data/synthetic-brain/generate.ts');
      const { BenchmarkOptionsSchema } = await import('../site-agent/data/synthetic-brain/options.ts');
      const input = defined({
        seed: numberFlag('seed', a.seed),
        sites: numberFlag('sites', a.sites),
        labelled: numberFlag('labelled', a.labelled),
        unlabelled: numberFlag('unlabelled', a.unlabelled),
        testPerSite: numberFlag('test-per-site', a.testPerSite),
        shape: listFlag('shape', a.shape, 3),
        spacingMm: numberFlag('spacing', a.spacing),
        overwrite: a.overwrite === true ? true : undefined,
        knobs: defined({
          lesionContrast: listFlag('lesion-contrast', a.lesionContrast, 2),
          lesionRadiusMm: listFlag('lesion-radius', a.lesionRadius, 2),
          lesionCount: listFlag('lesion-count', a.lesionCount, 2),
          lesionFraction: listFlag('lesion-fraction', a.lesionFraction, 2),
          periventricularShare: numberFlag('periventricular', a.periventricular),
          distractors: numberFlag('distractors', a.distractors),
          noiseScale: numberFlag('noise-scale', a.noiseScale),
          biasScale: numberFlag('bias-scale', a.biasScale),
          blurScale: numberFlag('blur-scale', a.blurScale),
          textureScale: numberFlag('texture-scale', a.textureScale),
        }),
      });
      const parsed = BenchmarkOptionsSchema.safeParse(input);
      if (!parsed.success) throw new Error(`invalid options: ${parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
      const o = parsed.data;
      const total = o.sites * (o.labelled + o.unlabelled) + o.sites * o.testPerSite;
      say(`medfl benchmark: ${o.sites} sites × (${o.labelled} labelled + ${o.unlabelled} unlabelled) + ${o.sites} × ${o.testPerSite} test cases, ${o.shape.join('×')} at ${o.spacingMm} mm, seed ${o.seed}`);
      const started = performance.now();
      let done = 0;
      const r = await generateBenchmark(String(a.out), o, () => {
        done++;
        if (process.stdout.isTTY) process.stdout.write(`\r  ${done}/${total} cases`);
      });
      if (process.stdout.isTTY) process.stdout.write('\r');
      const seconds = (performance.now() - started) / 1000;
      const t = new Table({ head: ['folder', 'profile', 'grid', 'stored as', 'cases (lab/unlab/test)', 'lesion fraction min / mean / max'], ...style() });
      const row = (name: string, p: (typeof r.sites)[number]['profile'], cases: readonly { split: string; lesionFraction: number }[]) => {
        const f = cases.map((c) => c.lesionFraction);
        const mean = f.reduce((s, v) => s + v, 0) / Math.max(1, f.length);
        const count = (s: string) => cases.filter((c) => c.split === s).length;
        t.push([
          name,
          p.name,
          `${p.spacingFactor.map((k) => +(k * o.spacingMm).toFixed(2)).join('×')} mm`,
          `${p.axcodes} ${p.datatype}${p.slope ? ` ×${p.slope}` : ''}`,
          `${count('labelled')}/${count('unlabelled')}/${count('test')}`,
          f.length ? `${pct(Math.min(...f))} / ${pct(mean)} / ${pct(Math.max(...f))}` : '—',
        ]);
      };
      for (const s of r.sites) row(s.name, s.profile, s.cases);
      r.sites.forEach((s, i) => row(`test (${s.name} profile)`, s.profile, r.test.filter((c) => c.name.startsWith(`test${siteLetters(i)}_`))));
      say(t.toString());
      say(`wrote ${total} cases in ${seconds.toFixed(1)} s to ${r.root} (manifest: benchmark.json)`);
      say(`  sites: ${r.siteDirs.join(',')}`);
      say(`  test:  ${r.testDir}`);
      say(`  load with a plan spacing of [${o.spacingMm}, ${o.spacingMm}, ${o.spacingMm}] mm so every profile's grid comes back to the phantom's`);
      if (a.baseline) await runBaseline(r.siteDirs, r.testDir, [o.spacingMm, o.spacingMm, o.spacingMm], r.sites.map((s) => s.profile.name));
    });

  bench
    .command('baseline')
    .description('fit the intensity-threshold baseline on each site folder and score it on a test folder (imagesTs + labelsTs)')
    .requiredOption('--sites <dirs>', 'comma-separated site folders')
    .requiredOption('--test <dir>', 'test folder')
    .option('--spacing <dhw>', 'plan spacing D,H,W in mm (default 2,2,2)', '2,2,2')
    .action(async (a: { sites: string; test: string; spacing: string }) => {
      const spacing = listFlag('spacing', a.spacing, 3) as [number, number, number];
      await runBaseline(a.sites.split(',').map((d) => resolve(d.trim())), resolve(a.test), spacing);
    });
}
