/**
 * Federated self-supervised pretraining around the trainer: the plan stage and its tasks, a site's pretraining
 * round (only the shared encoder tensors go back; the restoration decoder stays in its own local file, apart
 * from the fine-tuning head), and the encoder file of the in-process simulation — its provenance round-trips,
 * tampering is caught, and `model.init: pretrained` loads it.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { restorationLocalPath } from '../../site-agent/training/pretraining-round.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import { taskSettingsForPlan, type TaskSettings } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick, sharedParams } from '../../shared/model/sharing.ts';
import { restorationArchitecture } from '../../shared/model/restoration.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { PROVENANCE_KEY, readPretrainedEncoder } from '../../shared/model/pretrained-encoder-file.ts';
import { initStrategyFromSpec } from '../../shared/model/transfer-init.ts';
import { initialWeights } from '../../coordinator/models/initial-model.ts';
import { plannedRounds, stageAfter, stageSettings } from '../../coordinator/rounds/pretraining-stage.ts';
import { promotion } from '../../coordinator/rounds/teacher.ts';
import { simulateFederatedPretraining } from '../../cli/federated-pretraining.ts';
import type { Med3dArchitecture } from '../../shared/model/med3d.ts';

const PLAN = [
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], head: unet, seed: 4 }',
  'rounds: 2',
  'local: { steps: 2, batchSize: 2 }',
  'share: { parts: [encoder], keepLocal: [norm] }',
  'pretraining: { enabled: true, rounds: 2, steps: 3, learningRate: 0.002, transforms: { localShuffle: 0.3 } }',
  '',
].join('\n');

const log = pino({ level: 'silent' });

function settingsOf(plan: Plan, stage: ReturnType<typeof stageAfter>): TaskSettings {
  const arch = architectureFor(plan.model);
  return taskSettingsForPlan(plan, 'f', sharedParams(arch, plan.share).map((p) => p.name), {
    ...stageSettings(plan, stage),
  });
}

describe('the pretraining plan stage', () => {
  it('is off by default; when on, its rounds come first and its tasks carry the objective', () => {
    const off = parsePlan('model: { architecture: med3d }\n');
    expect(off.pretraining).toMatchObject({ enabled: false, rounds: 4, steps: 50, learningRate: 0.003, objective: 'restoration', transforms: { nonLinear: 0.9, localShuffle: 0.5, inPainting: 0.2, outPainting: 0.7 } });
    expect(plannedRounds(off)).toBe(off.rounds);
    expect(stageSettings(off, stageAfter(off, 0))).toEqual({});

    const plan = parsePlan(PLAN);
    expect(plannedRounds(plan)).toBe(4);
    expect([0, 1, 2, 3].map((c) => stageAfter(plan, c))).toEqual([
      { kind: 'pretraining', index: 1 },
      { kind: 'pretraining', index: 2 },
      { kind: 'fine-tuning', index: 1 },
      { kind: 'fine-tuning', index: 2 },
    ]);
    const pre = settingsOf(plan, stageAfter(plan, 1));
    expect(pre.pretraining).toMatchObject({ round: 2, steps: 3, objective: 'restoration', transforms: { localShuffle: 0.3, nonLinear: 0.9 } });
    expect(pre.roundOffset).toBeUndefined();
    const fine = settingsOf(plan, stageAfter(plan, 2));
    expect(fine.pretraining).toBeUndefined();
    expect(fine.roundOffset).toBe(2);
    // Teacher promotions count fine-tuning rounds; the teacher keeps the round's real number (status, rollback).
    const ts: Plan = { ...plan, teacherStudent: { ...plan.teacherStudent, enabled: true, promoteEvery: 2 } };
    const hash = 'a'.repeat(64);
    expect(promotion(ts, 4, hash, undefined, 2)).toEqual({ modelHash: hash, generation: 1, round: 4 });
    expect(promotion(ts, 4, hash, undefined, 1)).toBeUndefined();
    expect(promotion(ts, 6, hash, { modelHash: hash, generation: 1, round: 4 }, 4)).toMatchObject({ generation: 2, round: 6 });
  });

  it('refuses pretraining for tiny3d and for patches the full-resolution decoder cannot tile', () => {
    expect(() => parsePlan('pretraining: { enabled: true }\n')).toThrow(/pretraining needs model.architecture med3d/);
    expect(() => parsePlan('model: { architecture: med3d, patch: [20, 16, 16] }\npretraining: { enabled: true }\n')).toThrow(/multiple of 8/);
    expect(() => parsePlan('model: { architecture: med3d }\npretraining: { enabled: true, objective: contrastive }\n')).toThrow();
  });
});

describe('a site pretraining round', () => {
  const plan = parsePlan(PLAN);
  const arch = architectureFor(plan.model);
  const rest = restorationArchitecture(plan.model);
  const shared = sharedParams(arch, plan.share).map((p) => p.name).sort();
  let work: string;
  let dataDir: string;
  let localDir: string;
  let lt: LocalTraining;

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), 'medfl-pretrain-site-'));
    dataDir = join(work, 'data');
    localDir = join(work, 'site', 'local');
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 2, valCases: 1, size: [16, 16, 16], seed: 5, intensityShift: 0 });
    await writePhantomPool(dataDir, { siteName: 'site-a', cases: 2, size: [16, 16, 16], seed: 5, intensityShift: 0 });
    lt = new LocalTraining({ siteName: 'site-a', dataDir, localDir, log, engine: 'cpu' });
  }, 60_000);

  it('trains on every scan, sends back exactly the shared encoder tensors and keeps the decoder in its own file', async () => {
    const global = encodeSafetensors(pick(arch.init(4), sharedParams(arch, plan.share)));
    const r1 = await lt.run(settingsOf(plan, { kind: 'pretraining', index: 1 }), global, { round: 1 });
    const update = decodeSafetensors(r1.update).bundle;
    expect([...update.keys()].sort()).toEqual(shared);
    expect(shared.every((n) => n.startsWith('encoder.') && !/bn|downsample\.1/.test(n))).toBe(true);
    // 2 training + 1 validation + 2 unlabelled scans, labels unused.
    expect(r1.numSamples).toBe(5);
    expect(r1.metrics).toMatchObject({ pretraining_round: 1, num_pretrain_images: 5 });
    expect(r1.metrics.restoration_loss).toBeGreaterThan(0);
    expect(Object.keys(r1.metrics).some((k) => k.includes('dice'))).toBe(false);
    // The encoder was trained: the update differs from the global model.
    const g = decodeSafetensors(global).bundle;
    expect(update.get('encoder.conv1.weight')!.data).not.toEqual(g.get('encoder.conv1.weight')!.data);

    const files = readdirSync(localDir).filter((f) => f.endsWith('.safetensors'));
    expect(files.length).toBe(1);
    expect(files[0]).toMatch(/^med3d-restoration-/);
    const decoder = decodeSafetensors(readFileSync(join(localDir, files[0]))).bundle;
    expect(decoder.get('head.dec.cls.weight')!.shape).toEqual([1, 1, 1, rest.config.head.kind === 'unet' ? rest.config.head.channels : 0, 1]);
    expect(decoder.has('encoder.bn1.running_var')).toBe(true); // FedBN: kept-local norms stay with it
    expect(decoder.has('encoder.conv1.weight')).toBe(false);
    expect(existsSync(join(localDir, 'optimizer-state', files[0]))).toBe(true);
    expect(lt.hasLocalTensors(settingsOf(plan, { kind: 'fine-tuning', index: 1 }))).toBe(false);

    // Round 2 continues from the site's decoder.
    const before = readFileSync(join(localDir, files[0]));
    const r2 = await lt.run(settingsOf(plan, { kind: 'pretraining', index: 2 }), r1.update, { round: 2 });
    expect([...decodeSafetensors(r2.update).bundle.keys()].sort()).toEqual(shared);
    expect(readFileSync(join(localDir, files[0]))).not.toEqual(before);

    // Fine-tuning after it: the head gets its own file; the decoder file is left alone.
    const decoderBytes = readFileSync(join(localDir, files[0]));
    const f1 = await lt.run(settingsOf(plan, { kind: 'fine-tuning', index: 1 }), r2.update, { round: 3 });
    expect([...decodeSafetensors(f1.update).bundle.keys()].sort()).toEqual(shared);
    expect(f1.metrics.val_dice_mean).toBeGreaterThanOrEqual(0);
    const after = readdirSync(localDir).filter((f) => f.endsWith('.safetensors')).sort();
    expect(after.length).toBe(2);
    expect(readFileSync(join(localDir, files[0]))).toEqual(decoderBytes);
    expect(restorationLocalPath(localDir, rest, 'x')).toMatch(/med3d-restoration-x\.safetensors$/);
  }, 60_000);
});

describe('the encoder file of a simulated federated pretraining', () => {
  it('holds every encoder tensor with its provenance, rejects tampering, and loads through model.init: pretrained', async () => {
    const work = mkdtempSync(join(tmpdir(), 'medfl-pretrain-sim-'));
    const siteDirs: string[] = [];
    for (const [i, name] of ['site-a', 'site-b'].entries()) {
      const d = join(work, 'data', name);
      await writePhantomSite(d, { siteName: name, cases: 2, valCases: 0, size: [16, 16, 16], seed: 20 + i, intensityShift: 10 * i });
      siteDirs.push(d);
    }
    // Default sharing (norms shared): the file's norm layers are pretrained too.
    const plan = parsePlan(PLAN.replace('share: { parts: [encoder], keepLocal: [norm] }', 'share: { parts: [encoder], keepLocal: [] }').replace('enabled: true', 'enabled: false'));
    const lines: string[] = [];
    const res = await simulateFederatedPretraining({ siteDirs, plan, seed: 7, outDir: join(work, 'ssl'), log, engine: 'cpu', say: (l) => lines.push(l) });
    expect(res.lossPerRound.length).toBe(2);
    expect(res.secondsPerRound.length).toBe(2);
    expect(res.lossPerRound.every((l) => Number.isFinite(l) && l > 0)).toBe(true);
    expect(lines.length).toBe(2);

    const bytes = readFileSync(res.encoderPath);
    const { bundle, provenance } = readPretrainedEncoder(bytes);
    expect(provenance).toEqual(res.provenance);
    expect(provenance).toMatchObject({ objective: 'restoration', sites: ['site-a', 'site-b'], rounds: 2, stepsPerRound: 3, learningRate: 0.002, federation: 'medfl-experiment', notPretrained: [] });
    expect(provenance!.transforms.localShuffle).toBe(0.3);
    expect(res.encoderPath).toContain(`encoder-${provenance!.tensorsSha256.slice(0, 12)}`);
    const arch = architectureFor({ ...plan.model, seed: 7 }) as Med3dArchitecture;
    const encoderNames = arch.params().filter((p) => p.part === 'encoder').map((p) => p.name).sort();
    expect([...bundle.keys()].sort()).toEqual(encoderNames);
    // Running statistics were averaged from the sites, not left at the init.
    expect(bundle.get('encoder.bn1.running_var')!.data.some((v) => Math.abs(v - 1) > 1e-3)).toBe(true);
    expect(decodeSafetensors(bytes).metadata).toMatchObject({ architecture: 'med3d', kind: 'pretrained-encoder' });

    // Edited tensors no longer match the recorded hash.
    const { bundle: b2, metadata } = decodeSafetensors(bytes);
    b2.get('encoder.conv1.weight')!.data[0] += 1;
    expect(() => readPretrainedEncoder(encodeSafetensors(b2, metadata))).toThrow(/changed after it was written/);
    expect(() => readPretrainedEncoder(encodeSafetensors(bundle, { ...metadata, [PROVENANCE_KEY]: '{"objective":"x"}' }))).toThrow();

    // transfer-init pretrained: every encoder tensor copied, head fresh.
    const init = initStrategyFromSpec('pretrained').init(arch, { seed: 7, pretrained: bundle });
    expect([...init.report.copied].sort()).toEqual(encoderNames);
    expect(init.weights.get('encoder.layer4.0.conv2.weight')!.data).toEqual(bundle.get('encoder.layer4.0.conv2.weight')!.data);
    // …and as a coordinator's plan would name it.
    const planFile = join(work, 'plan.yaml');
    writeFileSync(planFile, PLAN.replace('seed: 4', `seed: 7, init: pretrained, pretrained: ${JSON.stringify(res.encoderPath)}`));
    const fromPlan = await initialWeights(arch, parsePlan(readFileSync(planFile, 'utf8')), planFile, log);
    expect(fromPlan.get('encoder.conv1.weight')!.data).toEqual(bundle.get('encoder.conv1.weight')!.data);

    // Deterministic in the seed, and a rerun in the same folder starts fresh (no decoder left from the first run).
    const again = await simulateFederatedPretraining({ siteDirs, plan, seed: 7, outDir: join(work, 'ssl'), log, engine: 'cpu' });
    expect(again.provenance.tensorsSha256).toBe(provenance!.tensorsSha256);
    expect(again.lossPerRound).toEqual(res.lossPerRound);
  }, 60_000);
});
