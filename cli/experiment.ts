/**
 * `medfl experiment`: the comparisons a collaboration wants before trusting the platform — local-only,
 * federated, federated + teacher–student, pooled and a classical threshold floor — from scratch and from a
 * pretrained encoder, over several seeds, on given site folders and a test folder (default: a generated phantom
 * federation for a smoke run; `medfl benchmark generate` makes a hard one). The federated arms run any plan
 * (`--plan`); without one, the settings recommended for the architecture (recommendedPlan).
 *
 * Output: mean ± sd over seeds of the final-round test Dice per arm and init, per round and per site (cli-table3),
 * results.json (a top-level `summary` array, then per-seed detail) and an SVG of Dice against rounds.
 * Runner: experiment/run.ts; tables and plot: experiment/report.ts; data: experiment/data.ts.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { LayerTypeSchema, PlanSchema, type Plan } from '../shared/plan/schema.ts';
import type { LayerType } from '../shared/model/types.ts';
import { ARMS, diceSvg, INITS, roundsTable, sitesTable, summarise, summaryTable, type Arm, type ArmRun, type InitKind, type SummaryRow } from './experiment/report.ts';
import type { ExperimentOptions } from './experiment/run.ts';
import type { PhantomFederation } from './experiment/data.ts';

export { ARMS, diceSvg, summarise, type Arm, type ArmRun, type InitKind, type SummaryRow };
export { poolFolders } from './experiment/data.ts';
export type { ExperimentOptions };

export interface ExperimentResult {
  runs: ArmRun[];
  summary: SummaryRow[];
  /** Final-round mean ± sd per arm and init. */
  summaryTable: string;
  /** Mean ± sd per round. */
  roundsTable: string;
  /** Final round per site. */
  sitesTable: string;
  svgPath: string;
  jsonPath: string;
  pretrainedNote: string;
}

/**
 * The settings MedFL recommends for a federation of small sites with one common task, per architecture: what
 * `medfl experiment` runs without --plan (measured in docs/experiment.md). Med3D: MedicalNet ResNet-10 at ¼ width
 * with GroupNorm (no batch statistics to disagree between scanners or to estimate from batches of two) and the
 * full-resolution U-Net head, both shared — one model for the consortium, which each site must allow in its own
 * policy.yaml (`share.parts: [encoder, head]`), since heads stay home by default — 12 rounds × 96 local steps of
 * batch 2 on 32³ patches, Adam with a cosine schedule over the whole federation. 12 rounds, not 8: every arm was
 * still improving at round 8, and since the native GroupNorm kernels 12 rounds fit the 45-minute budget
 * (docs/experiment.md). MRI bias-field correction on: the scanners' different coil drifts were what kept the
 * federated model below pooled training (docs/benchmark.md); CT channels are never corrected. Scanner-difference
 * augmentation (blur, coarser grid, contrast; no bias field, which the correction removes) on top: +0.013 on both
 * development seeds.
 */
export function recommendedPlan(arch: 'tiny3d' | 'med3d', numClasses: number): Plan {
  if (arch === 'tiny3d') {
    return PlanSchema.parse({
      model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses, width: 6 },
      rounds: 8,
      local: { steps: 12, batchSize: 2, learningRate: 0.005 },
    });
  }
  return PlanSchema.parse({
    model: { architecture: 'med3d', depth: 10, widthMultiplier: 0.25, patch: [32, 32, 32], numClasses, head: 'unet', norm: 'group' },
    rounds: 12,
    local: { steps: 96, batchSize: 2, learningRate: 0.003, schedule: { type: 'cosine', warmupSteps: 50, minFactor: 0.05 } },
    share: { parts: ['encoder', 'head'], keepLocal: [] },
    data: { biasCorrection: 'polynomial', augment: { blurProbability: 0.3, lowResProbability: 0.3, contrastProbability: 0.3 } },
  });
}

/** Runs the experiment and writes results.json and the plot; the caller prints the tables. */
export async function runExperiment(o: ExperimentOptions): Promise<ExperimentResult> {
  const { pino } = await import('pino');
  const { runExperimentArms } = await import('./experiment/run.ts');
  const log = pino({ level: process.env.MEDFL_LOG_LEVEL ?? 'warn', base: { component: 'experiment' } }, pino.destination({ fd: 2, sync: true }));
  const out = resolve(o.out);
  mkdirSync(out, { recursive: true });
  const e = await runExperimentArms(o, log);
  const summary = summarise(e.runs);
  const svgPath = join(out, 'experiment.svg');
  writeFileSync(svgPath, diceSvg(e.runs));
  const jsonPath = join(out, 'results.json');
  writeFileSync(
    jsonPath,
    JSON.stringify(
      {
        summary: summary.map((s) => ({ arm: s.arm, init: s.init, meanDice: s.meanDice, sdDice: s.sdDice, seeds: s.seeds, finalDice: s.finalDice, bestDice: s.bestDice, selectedDice: s.selectedDice, maxFinalDrop: s.maxFinalDrop, secondsPerSeed: s.seconds })),
        meanDice: 'mean over seeds of the mean over sites of the final-round test Dice',
        simulated: 'in-process (same site and aggregation code, no gRPC)',
        plan: o.plan,
        sites: o.sites ?? 'generated phantoms',
        test: o.test ?? 'generated phantoms',
        testCases: e.testCases,
        pretraining: e.pretraining,
        pretrainedNote: e.pretrainedNote,
        seconds: e.seconds,
        runs: e.runs,
      },
      (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v),
      2,
    ) + '\n',
  );
  return { runs: e.runs, summary, summaryTable: summaryTable(summary), roundsTable: roundsTable(e.runs), sitesTable: sitesTable(e.runs), svgPath, jsonPath, pretrainedNote: e.pretrainedNote };
}

const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);

/** Registers `medfl experiment` (the heavy modules load only when it runs). */
export function registerExperimentCommand(program: Command): void {
  program
    .command('experiment')
    .description(
      'compare local-only, federated, federated + teacher–student, pooled and a threshold baseline, over several seeds (mean ± sd); ' +
        'simulates the federation in this one process (same site and aggregation code, no gRPC); default data: a generated phantom federation',
    )
    .option('--sites <dirs>', 'comma-separated site data folders (MSD layout; unlabelled images form each pool)')
    .option('--test <dir>', 'test folder: imagesTs/ + labelsTs/ (or a labelled MSD folder); never used to choose anything')
    .option('--out <dir>', 'where data, work files, results.json and experiment.svg go', 'medfl-experiment')
    .option('--plan <file>', 'plan (YAML/JSON, docs/plan.md) for every arm: model, local training, data, aggregation, teacher–student; default: recommended settings for --arch')
    .option('--arch <arch>', 'without --plan: tiny3d (fast smoke run) or med3d (MedicalNet ResNet-10, ¼ width, FedBN)', 'tiny3d')
    .option('--arms <list>', `arms to run (${ARMS.join(',')})`, 'local-only,federated,teacher-student,pooled')
    .option('--inits <list>', 'scratch, pretrained (needs --pretrained or model.pretrained), federated-ssl (runs the plan\'s pretraining stage on the sites\' scans first)', 'scratch')
    .option('--pretrained <file>', 'MedFL .safetensors whose encoder starts the pretrained arms')
    .option('--pretraining-sites <dirs>', 'with --inits federated-ssl: further site folders whose scans join the self-supervised pretraining only (members without labels); never trained or scored')
    .option('--seeds <list>', 'comma-separated seeds; every arm runs once per seed', '1')
    .option('--rounds <n>', 'override the plan: rounds')
    .option('--steps <n>', 'override the plan: local steps per site and round (pooled: × sites)')
    .option('--batch-size <n>', 'override the plan: patches per step')
    .option('--lr <x>', 'override the plan: learning rate')
    .option('--patch <dhw>', 'override the plan: patch (and generated phantom) size D,H,W')
    .option('--keep-local <types>', 'override the plan: layer types kept at each site inside the shared encoder (norm = FedBN; "none" = share all)')
    .option('--phantom-sites <n>', 'generated federation: sites', '3')
    .option('--phantom-cases <n>', 'generated federation: labelled training cases per site', '4')
    .option('--phantom-pool <n>', 'generated federation: unlabelled cases per site', '8')
    .option('--engine <name>', 'force a compute engine (e.g. cpu)')
    .action(async (a: Record<string, string | boolean | undefined>) => {
      const num = (k: string) => {
        const v = Number(a[k]);
        if (!Number.isFinite(v)) throw new Error(`--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} must be a number, got ${String(a[k])}`);
        return v;
      };
      const arms = list(String(a.arms)) as Arm[];
      for (const arm of arms) if (!ARMS.includes(arm)) throw new Error(`unknown arm '${arm}'; choose from ${ARMS.join(', ')}`);
      const inits = list(String(a.inits)) as InitKind[];
      for (const i of inits) if (!INITS.includes(i)) throw new Error(`unknown init '${i}'; choose from ${INITS.join(', ')}`);
      const seeds = list(String(a.seeds)).map(Number);
      if (seeds.length === 0 || !seeds.every(Number.isInteger)) throw new Error(`--seeds must be comma-separated integers, e.g. 1,2,3; got ${String(a.seeds)}`);
      if ((a.sites === undefined) !== (a.test === undefined)) throw new Error('give both --sites and --test, or neither (to generate a phantom federation)');
      const sites = a.sites ? list(String(a.sites)) : undefined;
      const { loadPlanFile } = await import('../shared/plan/load.ts');
      let plan: Plan;
      if (a.plan) plan = loadPlanFile(String(a.plan));
      else {
        if (a.arch !== 'tiny3d' && a.arch !== 'med3d') throw new Error(`--arch must be tiny3d or med3d, got ${String(a.arch)}`);
        const numClasses = sites ? Math.max(2, Object.keys((await import('./experiment/data.ts')).siteMeta(sites[0]).labels).length) : 2;
        plan = recommendedPlan(a.arch, numClasses);
      }
      if (sites && !plan.data.spacing) {
        // Sites on different grids would train one model on different anatomy sizes: propose the median grid.
        const { medianSpacing } = await import('./experiment/data.ts');
        const m = await medianSpacing(sites);
        if (m.differ) {
          plan = PlanSchema.parse({ ...plan, data: { ...plan.data, spacing: m.spacing } });
          process.stdout.write(`the sites' voxel spacings differ and the plan sets no data.spacing: every case is resampled to the median spacing [${m.spacing.join(', ')}] mm (set data.spacing in a plan to choose)\n`);
        }
      }
      plan = withOverrides(plan, {
        rounds: a.rounds !== undefined ? num('rounds') : undefined,
        steps: a.steps !== undefined ? num('steps') : undefined,
        batchSize: a.batchSize !== undefined ? num('batchSize') : undefined,
        lr: a.lr !== undefined ? num('lr') : undefined,
        patch: a.patch !== undefined ? parsePatch(String(a.patch)) : undefined,
        keepLocal: a.keepLocal !== undefined ? keepLocalTypes(String(a.keepLocal)) : undefined,
      });
      const say = (s: string) => process.stdout.write(s + '\n');
      say(`medfl experiment: ${arms.join(', ')} × ${inits.join(', ')} × seeds ${seeds.join(',')}; ${describePlan(plan)}; the federation is simulated in this process (same site and aggregation code, no gRPC)`);
      const phantomSites = num('phantomSites');
      const phantom: PhantomFederation = { sites: phantomSites, cases: num('phantomCases'), valCases: 2, poolCases: num('phantomPool'), testCases: 2 * phantomSites };
      const r = await runExperiment({
        sites,
        test: a.test ? String(a.test) : undefined,
        out: String(a.out),
        plan,
        arms,
        inits,
        seeds,
        pretrained: a.pretrained ? String(a.pretrained) : undefined,
        ...(a.pretrainingSites ? { pretrainingSites: list(String(a.pretrainingSites)) } : {}),
        phantom,
        engine: a.engine ? String(a.engine) : undefined,
        say,
      });
      say('');
      say('Test Dice, mean over sites, per round (mean ± sd over seeds; each site: shared encoder + its own head)');
      say(r.roundsTable);
      say('');
      say('Final round per site (mean ± sd over seeds)');
      say(r.sitesTable);
      say('');
      say('Summary: final-round test Dice, mean over sites (mean ± sd over seeds), and how long each arm took');
      say(r.summaryTable);
      if (r.pretrainedNote) say(r.pretrainedNote);
      say(`plot: ${r.svgPath}`);
      say(`results: ${r.jsonPath}`);
    });
}

export interface PlanOverrides {
  rounds?: number;
  steps?: number;
  batchSize?: number;
  lr?: number;
  patch?: [number, number, number];
  keepLocal?: LayerType[];
}

/** The plan with command-line overrides, validated again as a whole. */
export function withOverrides(plan: Plan, o: PlanOverrides): Plan {
  const raw = JSON.parse(JSON.stringify(plan)) as Record<string, Record<string, unknown>>;
  if (o.rounds !== undefined) (raw as Record<string, unknown>).rounds = o.rounds;
  if (o.steps !== undefined) {
    raw.local.steps = o.steps;
    delete raw.local.epochs;
  }
  if (o.batchSize !== undefined) raw.local.batchSize = o.batchSize;
  if (o.lr !== undefined) raw.local.learningRate = o.lr;
  if (o.patch !== undefined) raw.model.patch = o.patch;
  if (o.keepLocal !== undefined) raw.share.keepLocal = o.keepLocal;
  const r = PlanSchema.safeParse(raw);
  if (!r.success) throw new Error(`the plan with the command-line overrides is invalid: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

function describePlan(p: Plan): string {
  const m = p.model;
  const model = m.architecture === 'med3d' ? `med3d R${m.depth} ×${m.widthMultiplier} ${m.head}` : `tiny3d width ${m.width}`;
  const keep = p.share.keepLocal.length ? ` keep-local ${p.share.keepLocal.join('+')}` : '';
  return `${model}, patch ${m.patch.join('×')}, ${p.rounds} rounds × ${p.local.steps ?? `${p.local.epochs ?? 1} epoch(s)`} steps, batch ${p.local.batchSize}, lr ${p.local.learningRate}, ${p.aggregation.strategy}${keep}`;
}

function parsePatch(v: string): [number, number, number] {
  const patch = list(v).map(Number);
  if (patch.length !== 3 || !patch.every((n) => Number.isInteger(n) && n >= 8)) throw new Error(`--patch must be three integers ≥ 8, e.g. 32,32,32; got ${v}`);
  return patch as [number, number, number];
}

function keepLocalTypes(v: string): LayerType[] {
  if (v.trim() === 'none') return [];
  return list(v).map((t) => {
    const r = LayerTypeSchema.safeParse(t);
    if (!r.success) throw new Error(`--keep-local takes layer types ${LayerTypeSchema.options.join(', ')} (e.g. norm for FedBN) or none; got '${t}'`);
    return r.data;
  });
}
