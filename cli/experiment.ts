/**
 * `medfl experiment`: the comparisons a collaboration wants before trusting the platform, on given site folders
 * and a test folder (default: a generated phantom federation). Arms: local-only (each site alone), federated
 * (FedAvg), federated + teacher–student (noisy student on each site's unlabelled pool), pooled (all labelled
 * training data in one place — the upper bound); each from scratch and from a pretrained encoder.
 *
 * The federation is SIMULATED IN ONE PROCESS: the same site code (LocalTraining: data loader, trainers, heads kept
 * per site, pseudo-labelling) and the same aggregation strategy code (coordinator/aggregation, from the plan) as a
 * real federation, but no gRPC, TLS, coordinator store or separate processes. Same seeds and the same step budget
 * in every arm (pooled gets sites × steps per round: the same compute on all the data).
 *
 * Output: a table of test Dice per arm, init, site and round (cli-table3), results.json and an SVG plot of Dice
 * against rounds.
 */
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import Table from 'cli-table3';
import type { TaskSettings } from '../shared/protocol/task.ts';
import { LayerTypeSchema, type Plan } from '../shared/plan/schema.ts';
import type { TensorBundle } from '../shared/tensors/bundle.ts';
import type { LayerType, VolumeCase } from '../shared/model/types.ts';

export const ARMS = ['local-only', 'federated', 'teacher-student', 'pooled'] as const;
export type Arm = (typeof ARMS)[number];
export type InitKind = 'scratch' | 'pretrained';

export interface ExperimentOptions {
  /** Site data folders (MSD layout); absent = generate a phantom federation under `out`. */
  sites?: string[];
  /** Labelled test folder (every labelled case in it is a test case); absent = generated. */
  test?: string;
  out: string;
  rounds: number;
  steps: number;
  batchSize: number;
  learningRate: number;
  arch: 'tiny3d' | 'med3d';
  patch: [number, number, number];
  width: number;
  /** Layer types kept at each site inside the shared encoder (["norm"] = FedBN); default none. */
  keepLocal?: LayerType[];
  /** MedFL safetensors whose encoder initialises the `pretrained` arms; absent = pretrain one in-process. */
  pretrained?: string;
  pretrainSteps: number;
  arms: Arm[];
  inits: InitKind[];
  seed: number;
  promoteEvery: number;
  ratio: number;
  confidence: number;
  labels: 'soft' | 'hard';
  flipTTA: boolean;
  /** Student noise and class balancing (plan teacherStudent.dropout / strongAugment / classBalance). */
  dropout: number;
  strongAugment: boolean;
  classBalance: boolean;
  minTeacherDice: number;
  /** Generated federation: labelled, validation and unlabelled cases per site. */
  phantom: { sites: number; cases: number; valCases: number; poolCases: number; testCases: number };
  engine?: string;
  say?: (line: string) => void;
}

export interface ArmResult {
  arm: Arm;
  init: InitKind;
  /** site → test Dice (mean over foreground classes) per round, index 0 = round 1. */
  dice: Record<string, number[]>;
  /** Mean over sites per round. */
  mean: number[];
  seconds: number;
}

export interface ExperimentResult {
  results: ArmResult[];
  table: string;
  summary: string;
  svgPath: string;
  jsonPath: string;
  pretrainedNote: string;
}

/** Site-specific scanner differences of the generated federation (as in `medfl demo`). */
const PROFILES = [
  { shift: 0, scale: 1 },
  { shift: 40, scale: 1.25 },
  { shift: -25, scale: 0.8 },
  { shift: 15, scale: 1.1 },
  { shift: -10, scale: 0.9 },
];

export async function runExperiment(o: ExperimentOptions): Promise<ExperimentResult> {
  const say = o.say ?? (() => undefined);
  const [{ LocalTraining }, { architectureFor }, { sharedParams, pick }, { strategyFromPlan }, { decodeUpdate }, safet, { defaultPlan }, { TaskSettingsSchema }, { SiteData }, { initStrategyFromSpec }, { promotion }, { sha256Hex }, { pino }] =
    await Promise.all([
      import('../site-agent/training/local-training.ts'),
      import('../shared/model/registry.ts'),
      import('../shared/model/sharing.ts'),
      import('../coordinator/aggregation/index.ts'),
      import('../shared/tensors/update-codec.ts'),
      import('../shared/tensors/safetensors.ts'),
      import('../shared/plan/load.ts'),
      import('../shared/protocol/task.ts'),
      import('../site-agent/data/site-data.ts'),
      import('../shared/model/transfer-init.ts'),
      import('../coordinator/rounds/teacher.ts'),
      import('../shared/util/hash.ts'),
      import('pino'),
    ]);
  const out = resolve(o.out);
  mkdirSync(out, { recursive: true });
  const log = pino({ level: process.env.MEDFL_LOG_LEVEL ?? 'warn', base: { component: 'experiment' } }, pino.destination({ fd: 2, sync: true }));
  const started = performance.now();

  // 1. Data: the given folders, or a generated phantom federation with unlabelled pools.
  let siteDirs = o.sites?.map((d) => resolve(d));
  let testDir = o.test ? resolve(o.test) : undefined;
  if (!siteDirs || !testDir) {
    const gen = await generateFederation(join(out, 'data'), o);
    siteDirs ??= gen.sites;
    testDir ??= gen.test;
    say(`generated a phantom federation in ${join(out, 'data')}: ${o.phantom.sites} sites × (${o.phantom.cases} labelled + ${o.phantom.valCases} validation + ${o.phantom.poolCases} unlabelled) cases, ${o.phantom.testCases} test cases, ${o.patch.join('×')} voxels`);
  }
  for (const d of [...siteDirs, testDir]) if (!existsSync(join(d, 'dataset.json'))) throw new Error(`${d} has no dataset.json; give MSD-layout folders (see docs/data.md) or leave --sites/--test out to generate phantoms`);
  const siteNames = siteDirs.map((_, i) => `site-${String.fromCharCode(97 + i)}`);

  // 2. Test cases (whole volumes, held in memory: the test folder is meant to be small).
  const probe = await SiteData.open(testDir, { patch: o.patch });
  const numClasses = Math.max(2, probe.labels.length);
  const testCases: VolumeCase[] = [];
  for (const ref of [...probe.train, ...probe.val]) {
    const c = await probe.load(ref);
    if (!c?.label) continue;
    if (c.channels.length !== 1) throw new Error(`test case ${ref.id} has ${c.channels.length} channels; the trainers take one`);
    testCases.push({ id: ref.id, shape: [c.shape[0], c.shape[1], c.shape[2]], image: c.channels[0], label: c.label });
  }
  if (testCases.length === 0) throw new Error(`no usable labelled case in the test folder ${testDir}`);

  const planFor = (ts: boolean, steps: number): Plan =>
    defaultPlan({
      model: { architecture: o.arch, patch: o.patch, numClasses, width: o.width, seed: o.seed },
      rounds: o.rounds,
      local: { steps, batchSize: o.batchSize, learningRate: o.learningRate },
      share: { parts: ['encoder'], keepLocal: o.keepLocal ?? [] },
      teacherStudent: {
        enabled: ts,
        promoteEvery: o.promoteEvery,
        ratio: o.ratio,
        confidence: o.confidence,
        labels: o.labels,
        flipTTA: o.flipTTA,
        dropout: o.dropout,
        strongAugment: o.strongAugment,
        classBalance: o.classBalance,
        minTeacherDice: o.minTeacherDice,
      },
    });
  const basePlan = planFor(false, o.steps);
  const arch = architectureFor(basePlan.model);
  const shared = sharedParams(arch, basePlan.share);
  const sharedNames = shared.map((p) => p.name);
  const settingsOf = (plan: Plan, teacher?: { hash: string; bytes: Buffer; generation: number }): TaskSettings =>
    TaskSettingsSchema.parse({
      federation: 'medfl-experiment',
      model: { ...plan.model, pretrained: undefined, source2d: undefined },
      local: plan.local,
      share: plan.share,
      sharedTensors: sharedNames,
      data: plan.data,
      ...(plan.teacherStudent.enabled ? { teacherStudent: plan.teacherStudent } : {}),
      ...(plan.teacherStudent.enabled && teacher ? { teacher: { modelHash: teacher.hash, modelSize: teacher.bytes.length, generation: teacher.generation } } : {}),
    });
  const encode = (b: TensorBundle) => safet.encodeSafetensors(b);
  const copyBundle = (b: TensorBundle): TensorBundle => safet.decodeSafetensors(encode(b)).bundle;

  // 3. Initial encoders: scratch, and pretrained (given, or pretrained here on a separate phantom set).
  const inits = new Map<InitKind, TensorBundle>();
  let pretrainedNote = '';
  if (o.inits.includes('scratch')) inits.set('scratch', pick(arch.init(o.seed), shared));
  if (o.inits.includes('pretrained')) {
    let source: TensorBundle;
    if (o.pretrained) {
      source = safet.decodeSafetensors(readFileSync(resolve(o.pretrained))).bundle;
      pretrainedNote = `pretrained encoder: ${resolve(o.pretrained)}`;
    } else {
      const t0 = performance.now();
      const preDir = join(out, 'data', 'pretrain');
      if (!existsSync(join(preDir, 'dataset.json'))) {
        const { writePhantomSite } = await import('../site-agent/data/phantom.ts');
        await writePhantomSite(preDir, { siteName: 'pretrain', cases: 8, valCases: 0, size: o.patch, seed: 777_000 + o.seed, intensityShift: 5, intensityScale: 1.05 });
      }
      const lt = new LocalTraining({ siteName: 'pretrain', dataDir: preDir, localDir: mkd(join(out, 'work', 'pretrain')), log, engine: o.engine });
      // The whole encoder is pretrained and kept (BatchNorm included), whatever the arms keep local.
      const whole = sharedParams(arch, { parts: ['encoder'], keepLocal: [] });
      const preSettings = { ...settingsOf(planFor(false, o.pretrainSteps)), share: { parts: ['encoder' as const], keepLocal: [] }, sharedTensors: whole.map((p) => p.name) };
      const res = await lt.run(preSettings, encode(pick(arch.init(o.seed + 1), whole)), { round: 1 });
      source = decodeUpdate(res.update).bundle;
      const path = join(out, 'pretrained-encoder.safetensors');
      writeFileSync(path, encode(source));
      pretrainedNote = `pretrained encoder: none given, so one was pretrained here (${o.pretrainSteps} steps on 8 separate phantoms, ${((performance.now() - t0) / 1000).toFixed(0)} s) → ${path}`;
    }
    const init = initStrategyFromSpec('pretrained').init(arch, { seed: o.seed, pretrained: source });
    inits.set('pretrained', pick(init.weights, shared));
    say(pretrainedNote);
  }

  // 4. The arms.
  const results: ArmResult[] = [];
  const pooledDir = o.arms.includes('pooled') ? poolFolders(join(out, 'data', 'pooled'), siteDirs) : '';
  for (const initKind of o.inits) {
    const g0 = inits.get(initKind)!;
    for (const arm of o.arms) {
      const t0 = performance.now();
      const work = join(out, 'work', initKind, arm);
      const dice: Record<string, number[]> = {};
      if (arm === 'pooled') {
        const plan = planFor(false, o.steps * siteDirs.length);
        const lt = new LocalTraining({ siteName: 'pooled', dataDir: pooledDir, localDir: mkd(join(work, 'pooled')), log, engine: o.engine });
        let g = copyBundle(g0);
        dice.pooled = [];
        for (let r = 1; r <= o.rounds; r++) {
          const res = await lt.run(settingsOf(plan), encode(g), { round: r });
          g = decodeUpdate(res.update).bundle;
          dice.pooled.push((await lt.evaluateModel(settingsOf(plan), encode(g), testCases)).meanDice);
        }
      } else {
        const plan = planFor(arm === 'teacher-student', o.steps);
        const sites = siteDirs.map((d, i) => new LocalTraining({ siteName: siteNames[i], dataDir: d, localDir: mkd(join(work, siteNames[i])), log, engine: o.engine }));
        const strategy = strategyFromPlan(plan, { spillDir: join(work, 'spill') });
        let global = copyBundle(g0);
        const own = siteNames.map(() => copyBundle(g0)); // local-only: each site's own encoder
        let teacher: { hash: string; bytes: Buffer; generation: number; round: number } | undefined;
        for (const n of siteNames) dice[n] = [];
        for (let r = 1; r <= o.rounds; r++) {
          const settings = settingsOf(plan, teacher);
          const updates: { bundle: TensorBundle; isDelta: boolean; samples: number; site: string }[] = [];
          for (const [i, lt] of sites.entries()) {
            const base = arm === 'local-only' ? own[i] : global;
            const res = await lt.run(settings, encode(base), { round: r, ...(teacher ? { teacherBytes: teacher.bytes } : {}) });
            const d = decodeUpdate(res.update);
            updates.push({ bundle: d.bundle, isDelta: d.isDelta, samples: res.numSamples, site: siteNames[i] });
          }
          if (arm === 'local-only') {
            for (const [i, u] of updates.entries()) own[i] = u.bundle;
          } else {
            const agg = strategy.begin(global, shared, { expected: updates.length });
            for (const u of updates) {
              const v = agg.check(u.bundle, { site: u.site, numSamples: u.samples, isDelta: u.isDelta });
              if (v.problem) throw new Error(`round ${r}: the aggregation refused ${u.site}'s update: ${v.problem}`);
              agg.add(u.bundle, { site: u.site, numSamples: u.samples, isDelta: u.isDelta }, v);
            }
            global = copyBundle(agg.finish());
            const bytes = encode(global);
            const hash = sha256Hex(bytes);
            const next = promotion(plan, r, hash, teacher ? { modelHash: teacher.hash, generation: teacher.generation, round: teacher.round } : undefined);
            if (next) {
              teacher = { hash, bytes, generation: next.generation, round: r };
              say(`  [${initKind} / ${arm}] round ${r}: aggregate promoted to teacher generation ${next.generation}`);
            }
          }
          for (const [i, lt] of sites.entries()) {
            const model = arm === 'local-only' ? own[i] : global;
            dice[siteNames[i]].push((await lt.evaluateModel(settings, encode(model), testCases)).meanDice);
          }
        }
      }
      const keys = Object.keys(dice);
      const mean = Array.from({ length: o.rounds }, (_, r) => keys.reduce((a, k) => a + dice[k][r], 0) / keys.length);
      const seconds = (performance.now() - t0) / 1000;
      results.push({ arm, init: initKind, dice, mean, seconds });
      say(`  ${initKind.padEnd(10)} ${arm.padEnd(15)} final test Dice ${mean[o.rounds - 1].toFixed(3)} (${seconds.toFixed(0)} s)`);
    }
  }

  const table = resultsTable(results, o.rounds);
  const summary = summaryTable(results, o.rounds);
  const svgPath = join(out, 'experiment.svg');
  writeFileSync(svgPath, diceSvg(results, o.rounds));
  const jsonPath = join(out, 'results.json');
  writeFileSync(
    jsonPath,
    JSON.stringify({ options: { ...o, say: undefined }, testCases: testCases.length, pretrainedNote, simulated: 'in-process (same site and aggregation code, no gRPC)', seconds: (performance.now() - started) / 1000, results }, null, 2) + '\n',
  );
  return { results, table, summary, svgPath, jsonPath, pretrainedNote };
}

function mkd(p: string): string {
  mkdirSync(p, { recursive: true });
  return p;
}

/** The generated federation: sites with different scanner profiles, unlabelled pools, and a test set drawn from every profile. */
async function generateFederation(dir: string, o: ExperimentOptions): Promise<{ sites: string[]; test: string }> {
  const { writePhantomSite } = await import('../site-agent/data/phantom.ts');
  const { writePhantomPool } = await import('../site-agent/training/phantom-pool.ts');
  const sites: string[] = [];
  const p = o.phantom;
  for (let i = 0; i < p.sites; i++) {
    const name = `site-${String.fromCharCode(97 + i)}`;
    const prof = PROFILES[i % PROFILES.length];
    const d = join(dir, name);
    sites.push(d);
    if (existsSync(join(d, 'dataset.json'))) continue;
    await writePhantomSite(d, { siteName: name, cases: p.cases, valCases: p.valCases, size: o.patch, seed: 1000 * (i + 1) + o.seed, intensityShift: prof.shift, intensityScale: prof.scale });
    await writePhantomPool(d, { siteName: name, cases: p.poolCases, size: o.patch, seed: 1000 * (i + 1) + o.seed, intensityShift: prof.shift, intensityScale: prof.scale });
  }
  // Test cases from every site's profile, none of them seen in training: one labelled folder.
  const test = join(dir, 'test');
  if (!existsSync(join(test, 'dataset.json'))) {
    const parts: string[] = [];
    for (let i = 0; i < p.sites; i++) {
      const prof = PROFILES[i % PROFILES.length];
      const part = join(dir, '.test-parts', `t${i}`);
      const per = Math.max(1, Math.round(p.testCases / p.sites));
      await writePhantomSite(part, { siteName: `test${i}`, cases: per, valCases: 0, size: o.patch, seed: 90_000 + 1000 * i + o.seed, intensityShift: prof.shift, intensityScale: prof.scale });
      parts.push(part);
    }
    poolFolders(test, parts);
  }
  return { sites, test };
}

/**
 * One MSD folder holding every labelled training case of `dirs` (imagesTr + labelsTr; validation and unlabelled
 * cases stay out). File names are prefixed by the folder's index so they cannot collide.
 */
export function poolFolders(dest: string, dirs: readonly string[]): string {
  if (existsSync(join(dest, 'dataset.json'))) return dest;
  mkdirSync(join(dest, 'imagesTr'), { recursive: true });
  mkdirSync(join(dest, 'labelsTr'), { recursive: true });
  const first = JSON.parse(readFileSync(join(dirs[0], 'dataset.json'), 'utf8')) as Record<string, unknown>;
  const training: { image: string; label: string }[] = [];
  for (const [i, d] of dirs.entries()) {
    const labels = existsSync(join(d, 'labelsTr')) ? readdirSync(join(d, 'labelsTr')).filter((f) => /\.nii(\.gz)?$/.test(f)) : [];
    for (const lf of labels) {
      const caseName = lf.replace(/\.nii(\.gz)?$/, '');
      const ext = lf.slice(caseName.length);
      const images = readdirSync(join(d, 'imagesTr')).filter((f) => f === lf || (f.startsWith(`${caseName}_`) && /^_\d{4}\.nii(\.gz)?$/.test(f.slice(caseName.length))));
      if (images.length === 0) continue;
      const name = `p${i}x${caseName}`;
      for (const img of images) cpSync(join(d, 'imagesTr', img), join(dest, 'imagesTr', `p${i}x${img}`));
      cpSync(join(d, 'labelsTr', lf), join(dest, 'labelsTr', `${name}${ext}`));
      training.push({ image: `./imagesTr/${name}${ext}`, label: `./labelsTr/${name}${ext}` });
    }
  }
  const json = { ...first, name: 'pooled', numTraining: training.length, numTest: 0, training, test: [] };
  writeFileSync(join(dest, 'dataset.json'), JSON.stringify(json, null, 2) + '\n');
  return dest;
}

const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });

/** Test Dice per arm, init, site and round. */
export function resultsTable(results: readonly ArmResult[], rounds: number): string {
  const t = new Table({ head: ['arm', 'init', 'site', ...Array.from({ length: rounds }, (_, r) => `r${r + 1}`)], ...style() });
  for (const r of results) {
    for (const [site, d] of Object.entries(r.dice)) t.push([r.arm, r.init, site, ...d.map((v) => v.toFixed(3))]);
    if (Object.keys(r.dice).length > 1) t.push([r.arm, r.init, 'mean', ...r.mean.map((v) => v.toFixed(3))]);
  }
  return t.toString();
}

/** Final-round mean test Dice per arm (rows) and init (columns). */
export function summaryTable(results: readonly ArmResult[], rounds: number): string {
  const inits = [...new Set(results.map((r) => r.init))];
  const arms = [...new Set(results.map((r) => r.arm))];
  const t = new Table({ head: ['arm', ...inits.map((i) => `${i}: Dice r${rounds} (best)`)], ...style() });
  for (const a of arms) {
    t.push([a, ...inits.map((i) => {
      const r = results.find((x) => x.arm === a && x.init === i);
      return r ? `${r.mean[rounds - 1].toFixed(3)} (${Math.max(...r.mean).toFixed(3)})` : '—';
    })]);
  }
  return t.toString();
}

const COLOURS: Record<Arm, string> = { 'local-only': '#d62728', federated: '#1f77b4', 'teacher-student': '#2ca02c', pooled: '#7f7f7f' };

/** Mean test Dice against rounds: one polyline per arm and init (dashed = scratch), axes, legend. */
export function diceSvg(results: readonly ArmResult[], rounds: number): string {
  const W = 720, H = 420, L = 60, R = 200, T = 30, B = 50;
  const pw = W - L - R, ph = H - T - B;
  const x = (r: number) => L + (rounds === 1 ? pw / 2 : ((r - 1) / (rounds - 1)) * pw);
  const y = (d: number) => T + (1 - Math.max(0, Math.min(1, d))) * ph;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L + pw / 2}" y="18" text-anchor="middle" font-size="14">Test Dice (mean over sites) against rounds</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const d = i / 5;
    parts.push(`<line x1="${L}" y1="${y(d)}" x2="${L + pw}" y2="${y(d)}" stroke="#e0e0e0"/>`, `<text x="${L - 8}" y="${y(d) + 4}" text-anchor="end">${d.toFixed(1)}</text>`);
  }
  for (let r = 1; r <= rounds; r++) parts.push(`<text x="${x(r)}" y="${T + ph + 18}" text-anchor="middle">${r}</text>`);
  parts.push(
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${T + ph}" stroke="black"/>`,
    `<line x1="${L}" y1="${T + ph}" x2="${L + pw}" y2="${T + ph}" stroke="black"/>`,
    `<text x="${L + pw / 2}" y="${H - 10}" text-anchor="middle">round</text>`,
    `<text x="16" y="${T + ph / 2}" text-anchor="middle" transform="rotate(-90 16 ${T + ph / 2})">Dice</text>`,
  );
  results.forEach((res, i) => {
    const dash = res.init === 'scratch' ? ' stroke-dasharray="6 4"' : '';
    const pts = res.mean.map((d, r) => `${x(r + 1).toFixed(1)},${y(d).toFixed(1)}`).join(' ');
    parts.push(`<polyline fill="none" stroke="${COLOURS[res.arm]}" stroke-width="2"${dash} points="${pts}"/>`);
    const ly = T + 10 + i * 20;
    parts.push(`<line x1="${L + pw + 15}" y1="${ly}" x2="${L + pw + 45}" y2="${ly}" stroke="${COLOURS[res.arm]}" stroke-width="2"${dash}/>`, `<text x="${L + pw + 52}" y="${ly + 4}">${escapeXml(`${res.arm} (${res.init})`)}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

const escapeXml = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);

/** Registers `medfl experiment` (the heavy modules load only when it runs). */
export function registerExperimentCommand(program: Command): void {
  program
    .command('experiment')
    .description(
      'compare local-only, federated (FedAvg), federated + teacher–student and pooled training, from scratch and from a pretrained encoder; ' +
        'simulates the federation in this one process (same site and aggregation code, no gRPC); default: a generated phantom federation',
    )
    .option('--sites <dirs>', 'comma-separated site data folders (MSD layout; unlabelled images form each pool)')
    .option('--test <dir>', 'labelled test folder (every labelled case is a test case)')
    .option('--out <dir>', 'where data, work files, results.json and experiment.svg go', 'medfl-experiment')
    .option('--rounds <n>', 'rounds per arm', '8')
    .option('--steps <n>', 'local steps per site and round (pooled: × sites)', '12')
    .option('--batch-size <n>', 'patches per step', '2')
    .option('--lr <x>', 'learning rate (Adam)', '0.005')
    .option('--arch <arch>', 'tiny3d (fast) or med3d (MedicalNet ResNet-10, ¼ width; slow on a CPU)', 'tiny3d')
    .option('--patch <dhw>', 'patch (and generated phantom) size D,H,W', '16,16,16')
    .option('--width <n>', 'tiny3d base channels', '6')
    .option('--pretrained <file>', 'MedFL .safetensors whose encoder starts the pretrained arms (default: pretrain one here on separate phantoms)')
    .option('--pretrain-steps <n>', 'steps of the in-process pretraining when no --pretrained is given', '40')
    .option('--arms <list>', `arms to run (${ARMS.join(',')})`, ARMS.join(','))
    .option('--inits <list>', 'scratch,pretrained', 'scratch,pretrained')
    .option('--seed <n>', 'seed of every arm', '1')
    .option('--keep-local <types>', 'federated arms: layer types kept at each site inside the shared encoder (norm = FedBN)', '')
    .option('--promote-every <n>', 'teacher–student: rounds between promotions', '3')
    .option('--ratio <x>', 'teacher–student: pseudo-labelled per labelled patch', '1')
    .option('--confidence <x>', 'teacher–student: per-voxel confidence threshold', '0.9')
    .option('--hard-labels', 'teacher–student: argmax pseudo-labels instead of soft')
    .option('--flip-tta', 'teacher–student: teacher averages the 8 flips')
    .option('--dropout <x>', 'teacher–student: student dropout before the output layer', '0.5')
    .option('--no-strong-augment', 'teacher–student: the plan augmentation for the student, not the stronger one')
    .option('--min-teacher-dice <x>', 'teacher–student: sites skip a teacher scoring below this on their validation cases', '0.5')
    .option('--no-class-balance', 'teacher–student: no inverse-frequency weights on pseudo-labelled voxels')
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
      for (const i of inits) if (i !== 'scratch' && i !== 'pretrained') throw new Error(`unknown init '${i}'; choose scratch and/or pretrained`);
      if (a.arch !== 'tiny3d' && a.arch !== 'med3d') throw new Error(`--arch must be tiny3d or med3d, got ${String(a.arch)}`);
      const patch = list(String(a.patch)).map(Number);
      if (patch.length !== 3 || !patch.every((n) => Number.isInteger(n) && n >= 8)) throw new Error(`--patch must be three integers ≥ 8, e.g. 16,16,16; got ${String(a.patch)}`);
      if ((a.sites === undefined) !== (a.test === undefined)) throw new Error('give both --sites and --test, or neither (to generate a phantom federation)');
      const say = (s: string) => process.stdout.write(s + '\n');
      say(`medfl experiment: ${arms.join(', ')} × ${inits.join(', ')}; the federation is simulated in this process (same site and aggregation code, no gRPC)`);
      const phantomSites = num('phantomSites');
      const r = await runExperiment({
        sites: a.sites ? list(String(a.sites)) : undefined,
        test: a.test ? String(a.test) : undefined,
        out: String(a.out),
        rounds: num('rounds'),
        steps: num('steps'),
        batchSize: num('batchSize'),
        learningRate: num('lr'),
        arch: a.arch,
        patch: patch as [number, number, number],
        width: num('width'),
        pretrained: a.pretrained ? String(a.pretrained) : undefined,
        pretrainSteps: num('pretrainSteps'),
        arms,
        inits,
        seed: num('seed'),
        keepLocal: keepLocalTypes(String(a.keepLocal ?? '')),
        promoteEvery: num('promoteEvery'),
        ratio: num('ratio'),
        confidence: num('confidence'),
        labels: a.hardLabels ? 'hard' : 'soft',
        flipTTA: Boolean(a.flipTta),
        dropout: num('dropout'),
        strongAugment: a.strongAugment !== false,
        classBalance: a.classBalance !== false,
        minTeacherDice: num('minTeacherDice'),
        phantom: { sites: phantomSites, cases: num('phantomCases'), valCases: 2, poolCases: num('phantomPool'), testCases: 2 * phantomSites },
        engine: a.engine ? String(a.engine) : undefined,
        say,
      });
      say('');
      say('Test Dice per arm, init, site and round (each site: shared encoder + its own head)');
      say(r.table);
      say('');
      say('Final round, mean over sites');
      say(r.summary);
      say(`plot: ${r.svgPath}`);
      say(`results: ${r.jsonPath}`);
    });
}

function keepLocalTypes(v: string): LayerType[] {
  return list(v).map((t) => {
    const r = LayerTypeSchema.safeParse(t);
    if (!r.success) throw new Error(`--keep-local takes layer types ${LayerTypeSchema.options.join(', ')} (e.g. norm for FedBN); got '${t}'`);
    return r.data;
  });
}
