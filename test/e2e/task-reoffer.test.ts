/**
 * Issue 15, item 3: the coordinator re-offers the round's task to a selected site that heartbeats "idle, no task"
 * (it gave the task up, e.g. after its download kept failing), spaced by reofferMs, and only while the round still
 * waits for that site. Real coordinator over TLS; the site is a scripted FederationClient.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { uploadOnce } from '../../site-agent/transport/upload.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { waitFor } from '../../cli/processes.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

// Long enough that an idle heartbeat sent right after the task is inside the spacing even on a loaded machine.
const REOFFER_MS = 3000;
let work: string;
let coord: RunningCoordinator;
const clients: FederationClient[] = [];
const tasks = new Map<string, WireTask[]>();

async function site(name: string): Promise<FederationClient> {
  const inv = addSite(join(work, 'coordinator'), name, { ttlSeconds: 600 });
  await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, name) });
  const c = new FederationClient(new SiteHome(join(work, name)));
  clients.push(c);
  const got: WireTask[] = [];
  tasks.set(name, got);
  const stream = c.subscribeTasks([]);
  stream.on('error', () => undefined);
  stream.on('data', (t: WireTask) => t.kind === 'TRAIN' && got.push(t));
  return c;
}

const beat = (c: FederationClient, state: string, taskId = '') => c.heartbeat({ state, progress: 0, taskId, engine: '' });
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'medfl-reoffer-'));
  const home = await CoordinatorHome.init(join(work, 'coordinator'), { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, TEST_PLAN({ rounds: 2, minSites: 2, gather: 0, deadline: 600 }));
  coord = await startCoordinator({ dir: join(work, 'coordinator'), port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }), reofferMs: REOFFER_MS });
});

afterAll(async () => {
  for (const c of clients) c.close();
  await coord?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('a selected site that reports idle without its task', () => {
  it('gets the task again, spaced by reofferMs, and never while it works on it or after it reported', async () => {
    const a = await site('site-a');
    const b = await site('site-b');
    await waitFor(() => tasks.get('site-a')!.length === 1 && tasks.get('site-b')!.length === 1, 20_000, 'round 1 tasks');
    const first = tasks.get('site-a')![0]!;

    // Just sent: an idle heartbeat right away is not answered with the task again.
    await beat(a, 'idle');
    // Working on it (downloading, training, uploading): never re-offered, however long it takes.
    await pause(REOFFER_MS + 200);
    await beat(a, 'downloading', first.taskId);
    await beat(a, 'training', first.taskId);
    await pause(300);
    expect(tasks.get('site-a')).toHaveLength(1);

    // Idle with no task, once the spacing has passed: the same task again.
    await beat(a, 'idle');
    await waitFor(() => tasks.get('site-a')!.length === 2, 10_000, 'the task re-offered to site-a');
    expect(tasks.get('site-a')![1]!.taskId).toBe(first.taskId);
    // Within the spacing: no third copy.
    await beat(a, 'idle');
    await pause(300);
    expect(tasks.get('site-a')).toHaveLength(2);

    // site-a reports; from then on the round no longer waits for it, and idle heartbeats bring nothing.
    const settings = TaskSettingsSchema.parse(JSON.parse(first.settingsJson));
    const payload = encodeSafetensors(pick(architectureFor(settings.model).init(2), settings.sharedTensors.map((name) => ({ name }))));
    await beat(a, 'idle'); // learns the coordinator's features
    const ack = await uploadOnce(a, { updateId: `reoffer-${randomUUID()}`, taskId: first.taskId, round: first.round, baseModelHash: first.modelHash, numSamples: 2, payload });
    expect(ack.accepted, ack.reason).toBe(true);
    await pause(REOFFER_MS + 200);
    await beat(a, 'idle');
    await pause(300);
    expect(tasks.get('site-a')).toHaveLength(2);

    // site-b, still awaited, is reminded too.
    await beat(b, 'idle');
    await waitFor(() => tasks.get('site-b')!.length === 2, 10_000, 'the task re-offered to site-b');
    expect(tasks.get('site-b')![1]!.round).toBe(first.round);
  }, 90_000);
});
