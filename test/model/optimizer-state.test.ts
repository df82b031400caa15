/**
 * Optimiser state across rounds: restoring a parameter's state continues its optimiser exactly where it stopped
 * (Adam's moments and bias-correction count, SGD's momentum), trainers return it, and a site keeps its own
 * parameters' part in its local folder — never the shared ones, never in the update.
 */
import { existsSync, mkdtempSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { beforeAll, describe, expect, it } from 'vitest';
import { Optimizer, OptimizerSpecSchema, optimizerStateProblem, type OptimizerState } from '../../shared/model/optim.ts';
import type { ParamInfo } from '../../shared/model/types.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { decodeOptimizerState, encodeOptimizerState } from '../../site-agent/training/optimizer-state-file.ts';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { taskSettingsFor } from '../helpers/task-settings.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { localParams, pick, sharedParams } from '../../shared/model/sharing.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { createTfjsTrainer } from '../../shared/model/tfjs-trainer.ts';
import { createTiny3d } from '../../shared/model/tiny3d.ts';
import { sphereCase } from '../helpers/volumes.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';

const params: ParamInfo[] = [
  { name: 'enc.w', shape: [5], dtype: 'F32', part: 'encoder', layerType: 'conv', stage: 'stem', trainable: true },
  { name: 'head.w', shape: [3], dtype: 'F32', part: 'head', layerType: 'dense', stage: 'head', trainable: true },
];

/** A fixed sequence of gradients, one map per step. */
function gradients(steps: number, seed: number): Map<string, Float32Array>[] {
  const rng = mulberry32(seed);
  return Array.from({ length: steps }, () => new Map(params.map((p) => [p.name, Float32Array.from({ length: p.shape[0] }, () => rng() - 0.5)])));
}

const fresh = () => new Map(params.map((p) => [p.name, Float32Array.from({ length: p.shape[0] }, (_, i) => i * 0.1)]));

describe('Optimizer state', () => {
  for (const kind of ['adam', 'sgd'] as const) {
    it(`${kind}: 3 steps, then 3 more from the saved state, equal 6 steps in one go`, () => {
      const spec = OptimizerSpecSchema.parse({ kind, weightDecay: 0.01 });
      const g = gradients(6, 1);
      const whole = fresh();
      const one = new Optimizer(spec, 0.01, params, whole);
      for (const s of g) one.step(s);
      const split = fresh();
      const a = new Optimizer(spec, 0.01, params, split);
      for (const s of g.slice(0, 3)) a.step(s);
      // Through the file format, as a site keeps it.
      const { state } = decodeOptimizerState(encodeOptimizerState(a.state(), kind));
      expect(state.get('head.w')!.step).toBe(3);
      const b = new Optimizer(spec, 0.01, params, split, undefined, state);
      for (const s of g.slice(3)) b.step(s);
      for (const p of params) expect(Array.from(split.get(p.name)!)).toEqual(Array.from(whole.get(p.name)!));
      expect(b.state().get('enc.w')!.step).toBe(6);
      // Without the state the second half differs (bias correction restarts, moments are zero).
      const restarted = fresh();
      const c = new Optimizer(spec, 0.01, params, restarted);
      for (const s of g.slice(0, 3)) c.step(s);
      const d = new Optimizer(spec, 0.01, params, restarted);
      for (const s of g.slice(3)) d.step(s);
      expect(Array.from(restarted.get('head.w')!)).not.toEqual(Array.from(whole.get('head.w')!));
    });
  }

  it('restores only the parameters named: the others start fresh (step 0 → 1)', () => {
    const spec = OptimizerSpecSchema.parse({});
    const a = new Optimizer(spec, 0.01, params, fresh());
    for (const s of gradients(4, 2)) a.step(s);
    const headOnly: OptimizerState = new Map([['head.w', a.state().get('head.w')!]]);
    const b = new Optimizer(spec, 0.01, params, fresh(), undefined, headOnly);
    b.step(gradients(1, 3)[0]);
    expect(b.state().get('head.w')!.step).toBe(5);
    expect(b.state().get('enc.w')!.step).toBe(1);
  });

  it('a learning-rate factor scales the step; 0 leaves the weights where they are', () => {
    const spec = OptimizerSpecSchema.parse({ kind: 'sgd', momentum: 0 });
    const g = gradients(1, 4)[0];
    const full = fresh();
    new Optimizer(spec, 0.1, params, full).step(g);
    const half = fresh();
    new Optimizer(spec, 0.1, params, half).step(g, 0.5);
    const none = fresh();
    new Optimizer(spec, 0.1, params, none).step(g, 0);
    const w0 = fresh().get('enc.w')!;
    for (let i = 0; i < 5; i++) {
      expect(half.get('enc.w')![i] - w0[i]).toBeCloseTo((full.get('enc.w')![i] - w0[i]) / 2, 6);
      expect(none.get('enc.w')![i]).toBe(w0[i]);
    }
    expect(() => new Optimizer(spec, 0.1, params, fresh()).step(g, Number.NaN)).toThrow(/factor/);
  });

  it('refuses state that does not fit: kind, size, unknown name', () => {
    const adam = new Optimizer(OptimizerSpecSchema.parse({}), 0.01, params, fresh());
    adam.step(gradients(1, 5)[0]);
    expect(optimizerStateProblem(adam.state(), 'adam', params)).toBeUndefined();
    expect(optimizerStateProblem(adam.state(), 'sgd', params)).toMatch(/Adam state/);
    const small: OptimizerState = new Map([['head.w', { step: 1, m: new Float32Array(2), v: new Float32Array(2) }]]);
    expect(optimizerStateProblem(small, 'adam', params)).toMatch(/holds 2 values, the parameter 3/);
    const unknown: OptimizerState = new Map([['nope', { step: 1, m: new Float32Array(1) }]]);
    expect(optimizerStateProblem(unknown, 'sgd', params)).toMatch(/unknown parameter nope/);
    expect(() => new Optimizer(OptimizerSpecSchema.parse({ kind: 'sgd' }), 0.01, params, fresh(), undefined, adam.state())).toThrow(/does not fit/);
  });
});

describe('tfjs trainer with optimiser state and a learning-rate factor', () => {
  it('returns per-parameter state; a restored state continues the step count; factor 0 moves nothing', async () => {
    const engine = await selectEngine({ force: 'cpu' });
    const arch = createTiny3d({ patch: [8, 8, 8], width: 2 });
    const trainer = createTfjsTrainer(arch, engine);
    const cases = Array.from({ length: 2 }, (_, i) => sphereCase(i + 1, 8, 0.5));
    const req = { weights: arch.init(1), cases, steps: 2, batchSize: 2, learningRate: 0.01, seed: 3 };
    const a = await trainer.train(req);
    expect(a.optimizerState!.get('head.out.conv.weight')!.step).toBe(2);
    const b = await trainer.train({ ...req, weights: a.weights, optimizerState: a.optimizerState });
    expect(b.optimizerState!.get('head.out.conv.weight')!.step).toBe(4);
    const still = await trainer.train({ ...req, learningRateFactor: () => 0 });
    for (const [name, t] of req.weights) expect(Array.from(still.weights.get(name)!.data), name).toEqual(Array.from(t.data));
  });
});

describe('Med3D trainer with optimiser state and a learning-rate factor', () => {
  it('returns per-parameter state (norms included); a restored state continues; factor 0 moves no trained weight', async () => {
    const kernels = (await selectConvKernels()).kernels;
    const arch = createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] });
    const trainer = createMed3dTrainer(arch, kernels);
    const cases = Array.from({ length: 2 }, (_, i) => sphereCase(i + 1, 16, 0.5));
    const req = { weights: arch.init(1), cases, steps: 2, batchSize: 2, learningRate: 0.01, seed: 3 };
    const a = await trainer.train(req);
    const norm = arch.params().find((p) => p.layerType === 'norm' && p.trainable)!.name;
    const head = arch.params().find((p) => p.part === 'head' && p.trainable)!.name;
    expect(a.optimizerState!.get(norm)!.step).toBe(2);
    const b = await trainer.train({ ...req, weights: a.weights, optimizerState: new Map([[head, a.optimizerState!.get(head)!]]) });
    expect(b.optimizerState!.get(head)!.step).toBe(4);
    expect(b.optimizerState!.get(norm)!.step).toBe(2);
    const still = await trainer.train({ ...req, learningRateFactor: () => 0 });
    for (const p of arch.params().filter((q) => q.trainable)) expect(Array.from(still.weights.get(p.name)!.data), p.name).toEqual(Array.from(req.weights.get(p.name)!.data));
  });
});

describe('a site keeps its own optimiser state between rounds', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-optstate-'));
  const dataDir = join(work, 'data');
  const localDir = join(work, 'local');
  const steps = 3;
  const plan = defaultPlan({
    model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 },
    local: { steps, batchSize: 2, learningRate: 0.005 },
  });
  const arch = architectureFor(plan.model);
  const shared = sharedParams(arch, plan.share).map((p) => p.name);
  const own = localParams(arch, plan.share).map((p) => p.name);
  const settings: TaskSettings = taskSettingsFor(plan);
  const stateDir = join(localDir, 'optimizer-state');
  const stateFile = () => (existsSync(stateDir) ? readdirSync(stateDir).find((f) => f.endsWith('.safetensors')) : undefined);
  const readState = () => decodeOptimizerState(readFileSync(join(stateDir, stateFile()!)));
  let lt: LocalTraining;

  beforeAll(async () => {
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 3, valCases: 1, size: [16, 16, 16], seed: 5, intensityShift: 0 });
    lt = new LocalTraining({ siteName: 'site-a', dataDir, localDir, log: pino({ level: 'silent' }), engine: 'cpu' });
  });

  it('round 1 writes the state of the local parameters only (0600); round 2 continues it; the update never holds it', async () => {
    expect(own.length).toBeGreaterThan(0);
    const r1 = await lt.run(settings, encodeSafetensors(pick(arch.init(3), sharedParams(arch, plan.share))), { round: 1 });
    expect(stateFile()).toBeDefined();
    // Named like the local tensors' file (same key), which stays the only tensor file at the top level.
    expect(readdirSync(localDir).filter((f) => f.endsWith('.safetensors'))).toEqual([stateFile()]);
    const path = join(stateDir, stateFile()!);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const s1 = readState();
    expect(s1.kind).toBe('adam');
    expect([...s1.state.keys()].sort()).toEqual([...own].sort());
    for (const name of shared) expect(s1.state.has(name)).toBe(false);
    // The raw file names no shared tensor either (tensors or metadata).
    const header = readFileSync(path).subarray(8, 8 + Number(readFileSync(path).readBigUInt64LE(0))).toString('utf8');
    for (const name of shared) expect(header.includes(`"${name}`)).toBe(false);
    for (const s of s1.state.values()) expect(s.step).toBe(steps);
    expect([...decodeSafetensors(r1.update).bundle.keys()].sort()).toEqual([...shared].sort());
    const m1 = new Float32Array(s1.state.get(own[0])!.m);

    await lt.run(settings, r1.update, { round: 2 });
    const s2 = readState();
    expect([...s2.state.keys()].sort()).toEqual([...own].sort());
    // Adam's count continued from round 1 (a fresh optimiser would be back at `steps`), and the moments moved on.
    for (const s of s2.state.values()) expect(s.step).toBe(2 * steps);
    expect(Array.from(s2.state.get(own[0])!.m)).not.toEqual(Array.from(m1));
  }, 120_000);

  it('a state file that does not fit is ignored (fresh moments), then replaced', async () => {
    expect(existsSync(join(stateDir, stateFile()!))).toBe(true);
    writeFileSync(join(stateDir, stateFile()!), encodeOptimizerState(new Map([[own[0], { step: 7, m: new Float32Array(1) }]]), 'sgd'));
    const r = await lt.run(settings, encodeSafetensors(pick(arch.init(3), sharedParams(arch, plan.share))), { round: 3 });
    expect(Number.isFinite(r.metrics.train_loss)).toBe(true);
    for (const s of readState().state.values()) expect(s.step).toBe(steps);
  }, 120_000);
});
