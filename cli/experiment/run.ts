/**
 * `medfl experiment`'s runner: every arm × init × seed of a comparison, on given site folders and a test folder.
 *
 * Arms: local-only (each site alone), federated (the plan's aggregation: FedAvg, FedBN, server optimiser, …),
 * teacher-student (the same federation with the plan's noisy student on), pooled (all labelled training data in
 * one place: the upper bound, sites × steps per round so the compute matches), threshold (a classical intensity
 * threshold inside the brain mask, the floor any learned arm must clear).
 *
 * The federation is SIMULATED IN ONE PROCESS: the same site code (LocalTraining: data loader, trainers, heads
 * kept per site, validation split, pseudo-labelling) and the same aggregation code (coordinator/aggregation, from
 * the plan) as a real federation, but no gRPC, TLS, coordinator store or separate processes.
 *
 * Protocol: the same plan, seeds and step budget in every arm; test Dice (whole volumes at full resolution) is
 * recorded every round but never used to choose anything — the validation Dice of the same model is recorded
 * beside it, and "picked by validation" reports the test Dice at the round validation would pick.
 */
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Plan } from '../../shared/plan/schema.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import type { VolumeCase } from '../../shared/model/types.ts';
import type { Logger } from '../../shared/util/log.ts';
import { generatePhantomFederation, loadTestCases, poolFolders, siteMeta, type PhantomFederation } from './data.ts';
import { describePseudoLabelRound, generationReports, pseudoLabelRound, type Arm, type ArmRun, type InitKind, type PseudoLabelRound } from './report.ts';
import { generatedSiteName } from '../../shared/protocol/site-names.ts';

export interface ExperimentOptions {
  /** Site data folders (MSD layout); absent = generate a phantom federation under `out`. */
  sites?: string[];
  /** Test folder: imagesTs/ + labelsTs/ (or a labelled MSD folder); absent = generated. */
  test?: string;
  out: string;
  /** The federation's plan: model, local training, data, aggregation, teacher–student. Every arm uses its model and budget. */
  plan: Plan;
  arms: Arm[];
  inits: InitKind[];
  seeds: number[];
  /**
   * Further site folders whose scans join the federated-ssl pretraining only (consortium members without labels,
   * unlabelled archives): they never train or score an arm. Their labels, if any, are not used.
   */
  pretrainingSites?: string[];
  /** MedFL safetensors whose encoder starts the `pretrained` arms (default: the plan's model.pretrained). */
  pretrained?: string;
  /** Generated federation when no folders are given. */
  phantom: PhantomFederation;
  engine?: string;
  say?: (line: string) => void;
}

/** The cost and the curve of one seed's federated self-supervised pretraining (the federated-ssl init). */
export interface PretrainingRun {
  seed: number;
  seconds: number;
  lossPerRound: number[];
  encoderPath: string;
}

export interface Experiment {
  runs: ArmRun[];
  pretraining: PretrainingRun[];
  siteNames: string[];
  testCases: number;
  pretrainedNote: string;
  seconds: number;
}

export async function runExperimentArms(o: ExperimentOptions, log: Logger): Promise<Experiment> {
  const say = o.say ?? (() => undefined);
  const [{ LocalTraining }, { architectureFor }, { sharedParams, pick }, { strategyFromPlan }, { decodeUpdate }, safet, { taskSettingsForPlan }, { initStrategyFromSpec }, { promotion }, { sha256Hex }] =
    await Promise.all([
      import('../../site-agent/training/local-training.ts'),
      import('../../shared/model/registry.ts'),
      import('../../shared/model/sharing.ts'),
      import('../../coordinator/aggregation/index.ts'),
      import('../../shared/tensors/update-codec.ts'),
      import('../../shared/tensors/safetensors.ts'),
      import('../../shared/protocol/task.ts'),
      import('../../shared/model/transfer-init.ts'),
      import('../../coordinator/rounds/teacher.ts'),
      import('../../shared/util/hash.ts'),
    ]);
  const started = performance.now();
  const out = resolve(o.out);
  mkdirSync(out, { recursive: true });
  const plan = o.plan;
  const patch = [...plan.model.patch] as [number, number, number];

  const inputChannels = plan.model.inputChannels ?? 1;
  if (inputChannels > 1 && (!o.sites || !o.test)) {
    throw new Error(`model.inputChannels is ${inputChannels} but the generated phantom federation has one channel: give --sites and --test folders with ${inputChannels} channels`);
  }
  if (inputChannels > 1 && o.inits.includes('federated-ssl')) {
    throw new Error(`--inits federated-ssl: restoration pretraining takes one-channel patches, and model.inputChannels is ${inputChannels} (not supported yet)`);
  }

  const pretrainingOnly = (o.pretrainingSites ?? []).map((d) => resolve(d));
  if (pretrainingOnly.length > 0 && !o.inits.includes('federated-ssl')) {
    throw new Error('--pretraining-sites: those folders only join the federated self-supervised pretraining; add federated-ssl to --inits');
  }

  // 1. Data: the given folders, or a generated phantom federation with unlabelled pools.
  let siteDirs = o.sites?.map((d) => resolve(d));
  let testDir = o.test ? resolve(o.test) : undefined;
  if (!siteDirs || !testDir) {
    const gen = await generatePhantomFederation(join(out, 'data'), o.phantom, patch, o.seeds[0]);
    siteDirs ??= gen.sites;
    testDir ??= gen.test;
    const p = o.phantom;
    say(`generated a phantom federation in ${join(out, 'data')}: ${p.sites} sites × (${p.cases} labelled + ${p.valCases} validation + ${p.poolCases} unlabelled) cases, ${p.testCases} test cases, ${patch.join('×')} voxels (easy data for a smoke run: \`medfl benchmark generate\` makes a hard one)`);
  }
  const siteNames = siteDirs.map((_, i) => generatedSiteName(i));
  // A pretraining-only folder that is also a training site or the test folder would leak or double-count scans.
  for (const d of pretrainingOnly) {
    if (siteDirs.includes(d)) throw new Error(`--pretraining-sites: ${d} is already one of the training sites (--sites); its scans are in the pretraining anyway`);
    if (d === testDir) throw new Error(`--pretraining-sites: ${d} is the test folder; test scans must never reach training, pretraining included`);
  }
  if (new Set(pretrainingOnly).size !== pretrainingOnly.length) throw new Error('--pretraining-sites: a folder is listed twice');
  const meta = siteMeta(siteDirs[0]);
  const test = await loadTestCases(testDir, meta, patch, { ...(plan.data.spacing ? { spacing: plan.data.spacing } : {}), normalization: plan.data.normalization, biasCorrection: plan.data.biasCorrection });
  if (test.numClasses > plan.model.numClasses) throw new Error(`the test folder has ${test.numClasses} label classes but the plan's model.numClasses is ${plan.model.numClasses}`);
  const testCases: VolumeCase[] = test.cases;
  const badChannels = testCases.find((c) => (c.channels ?? 1) !== inputChannels);
  if (badChannels) throw new Error(`test case ${badChannels.id} has ${badChannels.channels ?? 1} channel(s) but the plan's model takes ${inputChannels} (model.inputChannels)`);
  const pooledDir = o.arms.includes('pooled') ? poolFolders(join(out, 'data', 'pooled'), siteDirs) : '';

  const runs: ArmRun[] = [];
  const pretraining: PretrainingRun[] = [];
  let pretrainedNote = '';

  // 2. The classical floor: no training, no seeds.
  if (o.arms.includes('threshold')) {
    const t0 = performance.now();
    const { thresholdBaseline } = await import('../../site-agent/data/threshold-baseline.ts');
    const dice: Record<string, number[]> = {};
    const val: Record<string, number[]> = {};
    // The rule thresholds the first channel, at the sites and on the test cases alike.
    const asBaseline = testCases.map((c) => ({ shape: c.shape, channels: [firstChannel(c)], ...(c.label ? { label: c.label } : {}) }));
    for (const [i, d] of siteDirs.entries()) {
      const r = await thresholdBaseline(d, asBaseline, { patch, normalization: plan.data.normalization, biasCorrection: plan.data.biasCorrection, ...(plan.data.spacing ? { spacing: plan.data.spacing } : {}) });
      dice[siteNames[i]] = [r.testDice];
      val[siteNames[i]] = [Number.NaN];
    }
    const mean = [siteNames.reduce((a, n) => a + dice[n][0], 0) / siteNames.length];
    runs.push({ arm: 'threshold', init: 'none', seed: 0, dice, val, mean, valMean: [Number.NaN], seconds: (performance.now() - t0) / 1000 });
    say(`  threshold baseline (intensity threshold inside the brain mask, chosen on each site's training cases): test Dice ${mean[0].toFixed(3)}`);
  }

  const trained = o.arms.filter((a) => a !== 'threshold');
  for (const seed of o.seeds) {
    const seedPlan: Plan = { ...plan, model: { ...plan.model, seed } };
    const arch = architectureFor(seedPlan.model);
    const shared = sharedParams(arch, seedPlan.share);
    const sharedNames = shared.map((p) => p.name);
    const settingsOf = (p: Plan, teacher?: { hash: string; bytes: Buffer; generation: number }): TaskSettings =>
      taskSettingsForPlan(p, 'medfl-experiment', sharedNames, {
        ...(p.teacherStudent.enabled ? { teacherStudent: p.teacherStudent } : {}),
        ...(p.teacherStudent.enabled && teacher ? { teacher: { modelHash: teacher.hash, modelSize: teacher.bytes.length, generation: teacher.generation } } : {}),
      });
    const encode = (b: TensorBundle) => safet.encodeSafetensors(b);
    const copyBundle = (b: TensorBundle): TensorBundle => safet.decodeSafetensors(encode(b)).bundle;

    // Initial shared tensors: scratch, or transferred from a pretrained encoder file.
    const inits = new Map<InitKind, TensorBundle>();
    if (o.inits.includes('scratch')) inits.set('scratch', pick(arch.init(seed), shared));
    if (o.inits.includes('pretrained')) {
      const file = o.pretrained ?? plan.model.pretrained;
      if (!file) throw new Error('--inits pretrained needs an encoder: give --pretrained FILE (MedFL safetensors, e.g. from `medfl model import`) or model.pretrained in the plan');
      const source = safet.decodeSafetensors(readFileSync(resolve(file))).bundle;
      const spec = /^(pretrained|partial:|mean-var)/.test(plan.model.init) ? plan.model.init : 'pretrained';
      inits.set('pretrained', pick(initStrategyFromSpec(spec).init(arch, { seed, pretrained: source }).weights, shared));
      pretrainedNote = `pretrained encoder: ${resolve(file)} (${spec})`;
    }
    if (o.inits.includes('federated-ssl')) {
      // The plan's pretraining stage, simulated like the fine-tuning rounds, on every scan of the sites (never the
      // test folder); its cost is reported apart from the arms'.
      const [{ simulateFederatedPretraining }, { readPretrainedEncoder }] = await Promise.all([import('../federated-pretraining.ts'), import('../../shared/model/pretrained-encoder-file.ts')]);
      const pre = await simulateFederatedPretraining({ siteDirs: [...siteDirs, ...pretrainingOnly], plan: seedPlan, seed, outDir: join(out, 'work', `seed-${seed}`, 'federated-ssl', 'pretraining'), log, engine: o.engine, say });
      const source = readPretrainedEncoder(readFileSync(pre.encoderPath)).bundle;
      inits.set('federated-ssl', pick(initStrategyFromSpec('pretrained').init(arch, { seed, pretrained: source }).weights, shared));
      pretraining.push({ seed, seconds: pre.seconds, lossPerRound: pre.lossPerRound, encoderPath: pre.encoderPath });
      const where = pretrainingOnly.length > 0 ? `every scan of ${siteDirs.length} training + ${pretrainingOnly.length} pretraining-only sites` : 'every site scan';
      say(`  seed ${seed}: federated self-supervised pretraining, ${seedPlan.pretraining.rounds} rounds × ${seedPlan.pretraining.steps} steps on ${where}: restoration loss ${pre.lossPerRound.map((l) => l.toFixed(3)).join(' → ')} (${pre.seconds.toFixed(0)} s, not counted in the arms' time)`);
    }

    for (const initKind of o.inits) {
      const g0 = inits.get(initKind)!;
      for (const arm of trained) {
        const t0 = performance.now();
        const work = join(out, 'work', `seed-${seed}`, initKind, arm);
        // A rerun into the same --out must not start from the heads and optimiser state an earlier run left.
        rmSync(work, { recursive: true, force: true });
        const dice: Record<string, number[]> = {};
        const val: Record<string, number[]> = {};
        // One line per round: an arm takes minutes, and a reader should see it move (and where it stands).
        const pseudoLabels: PseudoLabelRound[] = [];
        const progress = (r: number, test: number, v: number) => {
          const p = pseudoLabels.find((x) => x.round === r);
          say(`    [seed ${seed} / ${initKind} / ${arm}] round ${r}/${plan.rounds}: test Dice ${test.toFixed(3)}, validation ${Number.isFinite(v) ? v.toFixed(3) : '—'}${p ? `; ${describePseudoLabelRound(p)}` : ''} (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
        };
        const promotions: { generation: number; round: number }[] = [];
        const usedGenerations = new Map<number, number>(); // generation → site-rounds that trained with it
        const armPlan: Plan = { ...seedPlan, teacherStudent: { ...seedPlan.teacherStudent, enabled: arm === 'teacher-student' } };
        if (arm === 'pooled') {
          const pooledPlan: Plan = { ...armPlan, local: { ...armPlan.local, ...(armPlan.local.steps !== undefined ? { steps: armPlan.local.steps * siteDirs.length } : {}) } };
          const settings = settingsOf(pooledPlan);
          const lt = new LocalTraining({ siteName: 'pooled', dataDir: pooledDir, localDir: mkd(join(work, 'pooled')), log, engine: o.engine });
          let g = copyBundle(g0);
          dice.pooled = [];
          val.pooled = [];
          for (let r = 1; r <= plan.rounds; r++) {
            const res = await lt.run(settings, encode(g), { round: r });
            g = decodeUpdate(res.update).bundle;
            dice.pooled.push((await lt.evaluateModel(settings, encode(g), testCases)).meanDice);
            val.pooled.push(await lt.validateModel(settings, encode(g)));
            progress(r, dice.pooled[r - 1], val.pooled[r - 1]);
          }
        } else {
          const sites = siteDirs.map((d, i) => new LocalTraining({ siteName: siteNames[i], dataDir: d, localDir: mkd(join(work, siteNames[i])), log, engine: o.engine }));
          const strategy = strategyFromPlan(armPlan, { spillDir: join(work, 'spill') });
          let global = copyBundle(g0);
          const own = siteNames.map(() => copyBundle(g0)); // local-only: each site's own encoder
          let teacher: { hash: string; bytes: Buffer; generation: number; round: number } | undefined;
          for (const n of siteNames) {
            dice[n] = [];
            val[n] = [];
          }
          for (let r = 1; r <= plan.rounds; r++) {
            const settings = settingsOf(armPlan, teacher);
            const updates: { bundle: TensorBundle; isDelta: boolean; samples: number; site: string }[] = [];
            const siteMetrics: Record<string, Record<string, number>> = {};
            for (const [i, lt] of sites.entries()) {
              const base = arm === 'local-only' ? own[i] : global;
              const res = await lt.run(settings, encode(base), { round: r, ...(teacher ? { teacherBytes: teacher.bytes } : {}) });
              const d = decodeUpdate(res.update);
              const g = res.metrics.teacher_generation;
              if (g !== undefined) usedGenerations.set(g, (usedGenerations.get(g) ?? 0) + 1);
              siteMetrics[siteNames[i]] = res.metrics;
              updates.push({ bundle: d.bundle, isDelta: d.isDelta, samples: res.numSamples, site: siteNames[i] });
            }
            const p = pseudoLabelRound(r, siteMetrics);
            if (p) pseudoLabels.push(p);
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
              const next = promotion(armPlan, r, hash, teacher ? { modelHash: teacher.hash, generation: teacher.generation, round: teacher.round } : undefined);
              if (next) {
                teacher = { hash, bytes, generation: next.generation, round: r };
                promotions.push({ generation: next.generation, round: r });
                say(`  [seed ${seed} / ${initKind} / ${arm}] round ${r}: aggregate promoted to teacher generation ${next.generation}`);
              }
            }
            // Where every site would score the very same weights (all tensors shared), the test set is scored once.
            const scored = new Map<string, number>();
            for (const [i, lt] of sites.entries()) {
              const model = encode(arm === 'local-only' ? own[i] : global);
              const key = lt.siteIndependentModelKey(settings, model);
              const known = key === undefined ? undefined : scored.get(key);
              const testDice = known ?? (await lt.evaluateModel(settings, model, testCases)).meanDice;
              if (key !== undefined) scored.set(key, testDice);
              dice[siteNames[i]].push(testDice);
              val[siteNames[i]].push(await lt.validateModel(settings, model));
            }
            const mean = (m: Record<string, number[]>) => siteNames.reduce((a, n) => a + m[n][r - 1], 0) / siteNames.length;
            progress(r, mean(dice), mean(val));
          }
        }
        const keys = Object.keys(dice);
        const meanOf = (m: Record<string, number[]>, r: number) => {
          const v = keys.map((k) => m[k][r]).filter(Number.isFinite);
          return v.length ? v.reduce((a, x) => a + x, 0) / v.length : Number.NaN;
        };
        const mean = Array.from({ length: plan.rounds }, (_, r) => meanOf(dice, r));
        const valMean = Array.from({ length: plan.rounds }, (_, r) => meanOf(val, r));
        const seconds = (performance.now() - t0) / 1000;
        const generations = arm === 'teacher-student' ? generationReports(promotions, mean, valMean, usedGenerations) : undefined;
        runs.push({ arm, init: initKind, seed, dice, val, mean, valMean, seconds, ...(generations ? { generations } : {}), ...(pseudoLabels.length > 0 ? { pseudoLabels } : {}) });
        if (pseudoLabels.length > 0) {
          const used = pseudoLabels.reduce((a, p) => a + p.sitesUsed, 0);
          const offered = pseudoLabels.reduce((a, p) => a + p.sitesWithTeacher, 0);
          say(`    pseudo-labels used in ${used} of ${offered} site-rounds that had a teacher (the rest: the teacher trailed the received model on validation, was gated, or the site had nothing to label)`);
        }
        for (const g of generations ?? []) {
          say(`    generation ${g.generation} (round ${g.promotedAfterRound}): teacher test Dice ${g.teacherTest.toFixed(3)} (val ${g.teacherVal.toFixed(3)}) → its last student, round ${g.studentRound}: ${g.studentTest.toFixed(3)} (val ${g.studentVal.toFixed(3)}); ${g.usedBySites} site-rounds trained with it`);
        }
        say(`  seed ${seed}  ${initKind.padEnd(10)} ${arm.padEnd(15)} final test Dice ${mean[plan.rounds - 1].toFixed(3)} (best round ${Math.max(...mean).toFixed(3)}; ${seconds.toFixed(0)} s)`);
      }
    }
  }
  return { runs, pretraining, siteNames, testCases: testCases.length, pretrainedNote, seconds: (performance.now() - started) / 1000 };
}

function mkd(p: string): string {
  mkdirSync(p, { recursive: true });
  return p;
}

/** Channel 0 of a channels-last case (the image itself when it has one channel). */
function firstChannel(c: VolumeCase): Float32Array {
  const C = c.channels ?? 1;
  if (C === 1) return c.image;
  const out = new Float32Array(c.image.length / C);
  for (let v = 0; v < out.length; v++) out[v] = c.image[v * C];
  return out;
}
