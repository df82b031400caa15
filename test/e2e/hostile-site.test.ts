/**
 * Issue 14, item 1, end to end with real processes: a coordinator with the default aggregation settings, two honest
 * site agents that train, and a hostile site (test/e2e/support/hostile-site.ts). The 3e38 update is refused before
 * it counts (it used to turn the global model into +Inf for good); the 1,000,000-sample claim is accepted but
 * capped to half the round's weight; the published model is finite. Then the operator runs
 * `medfl coordinator rollback --to 0` with the coordinator stopped, and the next start announces it in the log
 * and the contribution ledger.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';
import { spawnMedfl, waitFor } from '../../cli/processes.ts';
import { cappedWeights } from '../../coordinator/aggregation/weight-share.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';

let fed: TestFederation;
let acks: { kind: string; accepted: boolean; reason: string }[] = [];

beforeAll(async () => {
  fed = await makeFederation({ sites: 3, plan: TEST_PLAN({ rounds: 1, minSites: 3, deadline: 90, gather: 10, steps: 2 }) });
  const coordinator = await fed.startCoordinator();
  await fed.enrollAll();
  const [a, b, evil] = fed.sites;
  const honest = [fed.startSite(a), fed.startSite(b)];
  const hostile: ChildProcess = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'support', 'hostile-site.ts'), fed.siteDir(evil)], { stdio: ['ignore', 'pipe', 'inherit'] });
  fed.children.push(hostile);
  let out = '';
  hostile.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const codes = await Promise.all([...honest, hostile].map((c) => exited(c, 150_000)));
  acks = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
  expect(codes, out).toEqual([0, 0, 0]);
  coordinator.kill('SIGTERM');
  await exited(coordinator, 20_000);
}, 200_000);

afterAll(() => fed?.killAll());

describe('a hostile site in a federation of processes, default plan', () => {
  it('refuses the 3e38 update with the bound it breaks; accepts the sample claim but caps it to half the weight', () => {
    const by = Object.fromEntries(acks.map((x) => [x.kind, x]));
    expect(by.overflow.accepted).toBe(false);
    expect(by.overflow.reason).toMatch(/proposes weight 3\.000e\+38 .* \(aggregation\.validation\.maxValue\)/);
    expect(by['million-samples'].accepted).toBe(true);
    const store = fed.store();
    const round = store.listRounds()[0];
    expect(round.state).toBe('closed');
    const rows = store.updatesForRound(1);
    const weights = cappedWeights(rows.map((u) => u.numSamples), 0.5);
    const evilAt = rows.findIndex((u) => u.site === 'site-c');
    expect(weights[evilAt] / weights.reduce((x, y) => x + y, 0)).toBeCloseTo(0.5, 9);
    const updates = rows.map((u) => decodeSafetensors(readFileSync(u.path)).bundle);
    const result = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${round.resultModelHash}.safetensors`))).bundle;
    const total = weights.reduce((x, y) => x + y, 0);
    for (const [name, t] of result) {
      expect(t.data.every(Number.isFinite)).toBe(true);
      for (let j = 0; j < t.data.length; j += 31) {
        const want = updates.reduce((s, u, k) => s + weights[k] * u.get(name)!.data[j], 0) / total;
        expect(t.data[j]).toBeCloseTo(want, 5);
      }
    }
    store.close();
  });

  it('`medfl coordinator rollback --to 0` returns to the initial model; the next start records it in the ledger', async () => {
    const store = fed.store();
    const initial = store.listRounds()[0].baseModelHash;
    const published = store.getMeta('current_model');
    store.close();
    const cli = spawnMedfl(['coordinator', 'rollback', '--dir', fed.coordDir, '--to', '0', '--reason', 'hostile site'], fed.logPath('rollback'));
    expect(await exited(cli, 30_000)).toBe(0);
    expect(readFileSync(fed.logPath('rollback'), 'utf8')).toMatch(new RegExp(`rolled back to model ${initial} \\(round 0\\) from ${published!.slice(0, 12)}`));
    const after = fed.store();
    expect(after.getMeta('current_model')).toBe(initial);
    after.close();
    const coordinator = await fed.startCoordinator();
    await waitFor(() => readFileSync(fed.logPath('coordinator'), 'utf8').includes('federation rolled back by the operator'), 20_000, 'the rollback to be announced');
    await waitFor(() => readFileSync(join(fed.coordDir, 'ledger.jsonl'), 'utf8').includes('"strategy":"rollback"'), 20_000, 'the ledger entry');
    const entry = readFileSync(join(fed.coordDir, 'ledger.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).at(-1);
    expect(entry).toMatchObject({ round: 0, site: '', updateHash: initial, rollback: { fromModel: published, toModel: initial, failedRound: null } });
    coordinator.kill('SIGTERM');
    // Unknown versions are refused with a clear error and change nothing.
    const bad = spawnMedfl(['coordinator', 'rollback', '--dir', fed.coordDir, '--to', '7'], fed.logPath('rollback-bad'));
    expect(await exited(bad, 30_000)).not.toBe(0);
    expect(readFileSync(fed.logPath('rollback-bad'), 'utf8')).toMatch(/round 7 produced no model version/);
  }, 60_000);
});
