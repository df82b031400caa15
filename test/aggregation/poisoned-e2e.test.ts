/**
 * End to end with real processes (test/helpers/federation.ts): a coordinator, two honest site agents that
 * train, and a poisoned site. Validation refuses the NaN, wrong-shape and scaled updates with reasons (and
 * they leave no trace); the sign-flipped, amplified update passes validation, and the coordinate-wise median
 * holds where FedAvg would have been pulled away.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, type TestFederation } from '../helpers/federation.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';

const MAX_NORM = 50;
const plan = [
  'name: poisoned',
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 1',
  'minSites: 3',
  'roundDeadlineSeconds: 90',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 3, batchSize: 2, learningRate: 0.005 }',
  `aggregation: { strategy: median, validation: { maxNorm: ${MAX_NORM} } }`,
  '',
].join('\n');

describe('a poisoned site in a federation of processes, median aggregation', () => {
  let fed: TestFederation;
  let acks: { kind: string; accepted: boolean; reason: string }[] = [];

  beforeAll(async () => {
    fed = await makeFederation({ sites: 3, plan });
    await fed.startCoordinator();
    await fed.enrollAll();
    const [a, b, evil] = fed.sites;
    const honest = [fed.startSite(a), fed.startSite(b)];
    const poison: ChildProcess = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'support', 'poisoned-site.ts'), fed.siteDir(evil), fed.coordDir, '2', String(MAX_NORM)], { stdio: ['ignore', 'pipe', 'inherit'] });
    fed.children.push(poison);
    let out = '';
    poison.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    const codes = await Promise.all([...honest, poison].map((c) => exited(c, 150_000)));
    acks = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
    expect(codes, out).toEqual([0, 0, 0]);
  }, 180_000);

  afterAll(() => fed?.killAll());

  it('refuses NaN, wrong shape and an over-norm update, each with a reason the site receives', () => {
    const by = Object.fromEntries(acks.map((a) => [a.kind, a]));
    expect(by.nan).toMatchObject({ accepted: false });
    expect(by.nan.reason).toMatch(/non-finite values: tensor ".*" holds NaN at index 1/);
    expect(by['wrong-shape'].accepted).toBe(false);
    expect(by['wrong-shape'].reason).toMatch(/shape \[[\d,]+,1\], expected \[/);
    expect(by.scaled.accepted).toBe(false);
    expect(by.scaled.reason).toMatch(/above the plan's bound 50 \(aggregation.validation.maxNorm\)/);
    expect(by['sign-flipped']).toMatchObject({ accepted: true });
    // The coordinator logged an update.rejected for each refusal.
    const log = readFileSync(fed.logPath('coordinator'), 'utf8');
    expect(log.match(/"msg":"update rejected"/g)).toHaveLength(3);
  });

  it('kept nothing of the refused updates: three stored updates, three files', () => {
    const store = fed.store();
    expect(store.updatesForRound(1).map((u) => u.site).sort()).toEqual(fed.sites);
    expect(readdirSync(join(fed.coordDir, 'updates', 'round-1'))).toHaveLength(3);
    expect(readdirSync(join(fed.coordDir, 'updates', '.partial'))).toEqual([]);
    store.close();
  });

  it('the median is exact, stays between the honest updates, and FedAvg would have been pulled far away', () => {
    const store = fed.store();
    const round = store.listRounds()[0];
    expect(round.state).toBe('closed');
    const rows = store.updatesForRound(1);
    const ups = new Map<string, TensorBundle>(rows.map((u) => [u.site, decodeSafetensors(readFileSync(u.path)).bundle]));
    const samples = new Map(rows.map((u) => [u.site, u.numSamples]));
    const result = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${round.resultModelHash}.safetensors`))).bundle;
    const [a, b, evil] = fed.sites;
    let dMedian = 0;
    let dFedAvg = 0;
    let honestStep = 0;
    const total = [...samples.values()].reduce((x, y) => x + y, 0);
    for (const [name, t] of result.entries()) {
      const ha = ups.get(a)!.get(name)!.data;
      const hb = ups.get(b)!.get(name)!.data;
      const p = ups.get(evil)!.get(name)!.data;
      for (let i = 0; i < t.data.length; i++) {
        const sorted = [ha[i], hb[i], p[i]].sort((x, y) => x - y);
        expect(t.data[i]).toBeCloseTo(sorted[1], 5);
        expect(t.data[i]).toBeGreaterThanOrEqual(Math.min(ha[i], hb[i]) - 1e-6);
        expect(t.data[i]).toBeLessThanOrEqual(Math.max(ha[i], hb[i]) + 1e-6);
        const honestMean = (ha[i] + hb[i]) / 2;
        const fedavg = (samples.get(a)! * ha[i] + samples.get(b)! * hb[i] + samples.get(evil)! * p[i]) / total;
        dMedian += (t.data[i] - honestMean) ** 2;
        dFedAvg += (fedavg - honestMean) ** 2;
        honestStep += (ha[i] - hb[i]) ** 2;
      }
    }
    expect(Math.sqrt(dFedAvg)).toBeGreaterThan(3 * Math.sqrt(dMedian));
    expect(Math.sqrt(dMedian)).toBeLessThanOrEqual(Math.sqrt(honestStep));
    store.close();
  });
});
