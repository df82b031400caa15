/**
 * Faults with real processes: a coordinator killed mid-round (SIGKILL) and restarted, a site killed
 * mid-upload, and the NATS server going away while rounds run.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { waitFor } from '../../cli/processes.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';

let fed: TestFederation | undefined;
let nats: NatsServer | undefined;

afterEach(async () => {
  fed?.killAll();
  fed = undefined;
  await nats?.stop();
  nats = undefined;
});

describe('coordinator killed mid-round', () => {
  it('restarts, keeps every accepted update, and completes the same round', async () => {
    fed = await makeFederation({ sites: 3, plan: TEST_PLAN({ rounds: 2, minSites: 3, steps: 4 }) });
    let coordinator = await fed.startCoordinator();
    await fed.enrollAll();
    const [a, b, c] = fed.sites.map((s) => fed!.startSite(s));
    const store = fed.store();
    await waitFor(() => store.listRounds().length === 1, 60_000, 'round 1 to start');
    // Freeze site-c so round 1 is certain to be half done when the coordinator dies.
    c.kill('SIGSTOP');
    await waitFor(() => store.updatesForRound(1).length === 2, 60_000, 'two updates in round 1');
    const acceptedBefore = store.updatesForRound(1).map((u) => u.updateId).sort();
    coordinator.kill('SIGKILL');
    await exited(coordinator);
    expect(store.getRound(1)!.state).toBe('open');

    coordinator = await fed.startCoordinator();
    c.kill('SIGCONT');
    const codes = await Promise.all([a, b, c].map((p) => exited(p, 120_000)));
    expect(codes).toEqual([0, 0, 0]);

    const r1 = store.getRound(1)!;
    expect(r1.state).toBe('closed');
    const r1Updates = store.updatesForRound(1);
    // The two updates accepted before the crash are still there, and counted: the round closed with all three.
    expect(r1Updates.map((u) => u.updateId)).toEqual(expect.arrayContaining(acceptedBefore));
    expect(r1Updates.map((u) => u.site).sort()).toEqual(fed.sites);
    expect(store.getRound(2)!.state).toBe('closed');
    expect(readFileSync(fed.logPath('coordinator'), 'utf8')).toContain('resumed open round after restart');
    store.close();
  });
});

describe('a site killed mid-upload', () => {
  it('leaves no trace, and the round closes on quorum at its deadline', async () => {
    fed = await makeFederation({ sites: 3, plan: TEST_PLAN({ rounds: 1, minSites: 2, deadline: 10, steps: 2 }) });
    await fed.startCoordinator();
    await fed.enrollAll();
    const partialDir = join(fed.coordDir, 'updates', '.partial');
    // site-c is a stand-in that uploads half an update and is then killed.
    const dying = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '..', 'support', 'partial-uploader.ts'), fed.siteDir('site-c')], { stdio: ['ignore', 'pipe', 'inherit'] });
    fed.children.push(dying);
    const a = fed.startSite('site-a');
    const b = fed.startSite('site-b');
    let said = '';
    dying.stdout!.on('data', (d: Buffer) => { said += d.toString(); });
    await waitFor(() => said.includes('PARTIAL_SENT') && readdirSync(partialDir).length > 0, 60_000, 'a partial upload on the coordinator');
    dying.kill('SIGKILL');
    await waitFor(() => readdirSync(partialDir).length === 0, 10_000, 'the partial upload to be deleted');

    expect(await exited(a, 60_000)).toBe(0);
    expect(await exited(b, 60_000)).toBe(0);
    const store = fed.store();
    const r1 = store.getRound(1)!;
    expect(r1.state).toBe('closed');
    expect(r1.selected).toContain('site-c');
    expect(store.updatesForRound(1).map((u) => u.site).sort()).toEqual(['site-a', 'site-b']);
    const files = readdirSync(join(fed.coordDir, 'updates', 'round-1'));
    expect(files.every((f) => f.startsWith('site-a-') || f.startsWith('site-b-'))).toBe(true);
    expect(readdirSync(partialDir)).toEqual([]);
    // The new model is made of the two complete updates only and is finite.
    const model = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${r1.resultModelHash}.safetensors`))).bundle;
    for (const t of model.values()) expect(t.data.every(Number.isFinite)).toBe(true);
    store.close();
  });
});

describe('NATS going away', () => {
  it('does not stop the rounds', async () => {
    nats = await startNats({ jetstream: true });
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 3, minSites: 2, steps: 2 }) });
    await fed.startCoordinator(['--nats', nats.url]);
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed!.startSite(s));
    const store = fed.store();
    await waitFor(() => store.closedRoundCount() >= 1, 60_000, 'round 1 to close');
    await nats.stop();
    const codes = await Promise.all(agents.map((p) => exited(p, 90_000)));
    expect(codes).toEqual([0, 0]);
    expect(store.closedRoundCount()).toBe(3);
    const log = readFileSync(fed.logPath('coordinator'), 'utf8');
    expect(log).toMatch(/event not delivered to NATS|NATS disconnect/);
    store.close();
    expect(existsSync(join(fed.coordDir, 'state.db'))).toBe(true);
  });
});
