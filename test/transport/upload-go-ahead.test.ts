/**
 * The upload go-ahead (feature upload-go-ahead) against a real coordinator over TLS: a site that saw the feature
 * sends no update bytes until the coordinator admits its upload, measured on the wire (a relay between the site and
 * the coordinator counts what crosses it); a refusal past the waiting room reaches it before it sent anything and its
 * retry is counted; an older site (which never waits) still uploads to this coordinator, pushing its bytes while it
 * waits as before; and a new site against a coordinator without the feature falls back to sending at once, also when
 * that coordinator replaced, since the site's last heartbeat, one that offered it.
 */
import { afterAll, describe, expect, it } from 'vitest';
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
import { uploadUpdate, type OutgoingUpdate } from '../../site-agent/transport/upload.ts';
import { FEATURES, type Feature } from '../../shared/protocol/features.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { waitFor } from '../../cli/processes.ts';
import { link, startShapedRelay, type ShapedRelay } from '../helpers/shaped-relay.ts';
import { transferPlan } from '../helpers/transfer-plan.ts';

const quiet = pino({ level: 'silent' });
const works: string[] = [];
const running: RunningCoordinator[] = [];
const closers: Array<() => void> = [];
const relays: ShapedRelay[] = [];

afterAll(async () => {
  for (const c of closers) c();
  for (const r of relays) await r.close();
  for (const r of running) await r.stop();
  for (const w of works) rmSync(w, { recursive: true, force: true });
});

/** What may cross the wire for a call that sends no update bytes: its HTTP/2 headers (with the token) in TLS records. */
const CALL_OVERHEAD_BYTES = 16 * 1024;

// Width 40: an update of about a megabyte, far above what a call's headers take.
const plan = transferPlan({ name: 'upload-go-ahead', width: 40, minSites: 2 });

/**
 * A coordinator that runs one upload at once with `maxWaitingUploads` waiting, offering `features`; two enrolled sites
 * with their round-1 tasks; site a's client, site b's client through a relay that counts the bytes it carries.
 */
async function federation(o: { maxWaitingUploads: number; features?: readonly Feature[] }) {
  const work = mkdtempSync(join(tmpdir(), 'medfl-go-ahead-'));
  works.push(work);
  const coordDir = join(work, 'coordinator');
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, plan);
  const coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: quiet, features: o.features, limits: { transfers: { maxUploads: 1, maxWaitingUploads: o.maxWaitingUploads } } });
  running.push(coord);
  const dirs: string[] = [];
  for (const name of ['site-a', 'site-b']) {
    const inv = addSite(coordDir, name, { ttlSeconds: 600 });
    const dir = join(work, name);
    await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir });
    dirs.push(dir);
  }
  const a = client(dirs[0]!);
  const relay = await startShapedRelay({ host: '127.0.0.1', port: coord.port }, link(0, 0));
  relays.push(relay);
  // Site b's client dials the relay: its config names the relay while the client is made.
  const homeB = new SiteHome(dirs[1]!);
  const direct = homeB.config();
  homeB.saveConfig({ ...direct, coordinator: `localhost:${relay.port}` });
  const b = client(dirs[1]!);
  homeB.saveConfig(direct);
  const tasks = await Promise.all([a, b].map(trainTask));
  return { coord, coordDir, a, b, relay, tasks, gate: coord.transfers.uploads };
}

function client(dir: string): FederationClient {
  const c = new FederationClient(new SiteHome(dir));
  closers.push(() => c.close());
  return c;
}

function trainTask(c: FederationClient): Promise<WireTask> {
  return new Promise<WireTask>((resolve) => {
    const s = c.subscribeTasks([]);
    s.on('error', () => undefined);
    s.on('data', (t: WireTask) => t.kind === 'TRAIN' && resolve(t));
    closers.push(() => s.cancel());
  });
}

function update(task: WireTask, updateId: string, seed: number): OutgoingUpdate {
  const settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
  const payload = encodeSafetensors(pick(architectureFor(settings.model).init(seed), settings.sharedTensors.map((name) => ({ name }))));
  return { updateId, taskId: task.taskId, round: task.round, baseModelHash: task.modelHash, numSamples: 4, payload };
}

/** Site a takes the only upload slot and holds it: header and half its bytes sent; `finish` sends the rest. */
async function holdSlot(a: FederationClient, task: WireTask) {
  const u = update(task, 'held-upload-a', 7);
  const call = a.openUpload(60_000);
  call.ack.catch(() => undefined);
  await call.send({ header: { updateId: u.updateId, round: u.round, taskId: u.taskId, baseModelHash: u.baseModelHash, totalSize: u.payload.length, sha256: sha256Hex(u.payload), numSamples: 4 } });
  await call.sendData(0, u.payload.subarray(0, u.payload.length >> 1));
  return async () => {
    await call.sendData(u.payload.length >> 1, u.payload.subarray(u.payload.length >> 1));
    await call.end();
    return call.ack;
  };
}

const idle = { state: 'idle', progress: 0, taskId: '', engine: 'test' };

/** Lets whatever the site has written reach the relay's counter. */
const settle = () => new Promise((r) => setTimeout(r, 500));

describe('the upload go-ahead', () => {
  it('a new site against a new coordinator sends no update bytes while its upload waits, then uploads once admitted', async () => {
    const { coord, a, b, relay, tasks, gate } = await federation({ maxWaitingUploads: 4 });
    expect((await b.heartbeat(idle)).features).toContain(FEATURES.uploadGoAhead);
    const finishHeld = await holdSlot(a, tasks[0]!);
    await waitFor(() => gate.stats().running === 1, 10_000, "site a's upload to hold the slot");
    const u = update(tasks[1]!, 'waiting-upload-b', 8);
    expect(u.payload.length).toBeGreaterThan(256 * 1024);
    await settle();
    const before = relay.bytes.up;
    const sent = uploadUpdate(() => b, u, undefined, { until: Date.now() + 60_000, maxBackoffMs: 300 });
    await waitFor(() => gate.stats().waiting === 1, 10_000, "site b's upload to wait");
    await settle();
    expect(relay.bytes.up - before).toBeLessThan(CALL_OVERHEAD_BYTES);
    expect((await finishHeld()).accepted).toBe(true);
    expect((await sent).accepted).toBe(true);
    expect(relay.bytes.up - before).toBeGreaterThanOrEqual(u.payload.length);
    expect(coord.store.getUpdate('waiting-upload-b')?.site).toBe('site-b');
    expect(gate.stats()).toMatchObject({ running: 0, waiting: 0, refused: 0, queued: 1 });
  }, 120_000);

  it('a new site refused past the waiting room has sent nothing, and its retry is admitted and counted', async () => {
    const { coord, a, b, relay, tasks, gate } = await federation({ maxWaitingUploads: 0 });
    await b.heartbeat(idle);
    const finishHeld = await holdSlot(a, tasks[0]!);
    await waitFor(() => gate.stats().running === 1, 10_000, "site a's upload to hold the slot");
    const u = update(tasks[1]!, 'refused-upload-b', 8);
    await settle();
    const before = relay.bytes.up;
    const warnings: string[] = [];
    const log = { warn: (o: { code?: string }) => warnings.push(String(o.code)) } as unknown as typeof quiet;
    const sent = uploadUpdate(() => b, u, undefined, { until: Date.now() + 60_000, maxBackoffMs: 300, log });
    await waitFor(() => warnings.length > 0, 10_000, "site b's first refusal");
    expect(warnings[0]).toBe('RESOURCE_EXHAUSTED');
    await settle();
    expect(relay.bytes.up - before).toBeLessThan(CALL_OVERHEAD_BYTES);
    expect((await finishHeld()).accepted).toBe(true);
    expect((await sent).accepted).toBe(true);
    expect(coord.store.getUpdate('refused-upload-b')?.site).toBe('site-b');
  }, 120_000);

  it('an older site, which never waits for it, still uploads to a coordinator that offers it (its bytes wait unread as before)', async () => {
    const { coord, a, b, relay, tasks, gate } = await federation({ maxWaitingUploads: 4 });
    // No heartbeat: the client knows no coordinator feature, which is how a site older than the feature sends.
    const finishHeld = await holdSlot(a, tasks[0]!);
    await waitFor(() => gate.stats().running === 1, 10_000, "site a's upload to hold the slot");
    const u = update(tasks[1]!, 'older-site-upload-b', 8);
    await settle();
    const before = relay.bytes.up;
    const sent = uploadUpdate(() => b, u, undefined, { until: Date.now() + 60_000, maxBackoffMs: 300 });
    await waitFor(() => gate.stats().waiting === 1, 10_000, "site b's upload to wait");
    await waitFor(() => relay.bytes.up - before >= u.payload.length, 10_000, "site b's update to cross the wire while it waits");
    expect(gate.stats().waiting).toBe(1);
    expect((await finishHeld()).accepted).toBe(true);
    expect((await sent).accepted).toBe(true);
    expect(coord.store.getUpdate('older-site-upload-b')?.site).toBe('site-b');
  }, 120_000);

  it('a new site against a coordinator without it sends at once, as before, and is counted', async () => {
    const { coord, a, b, relay, tasks, gate } = await federation({ maxWaitingUploads: 4, features: [FEATURES.uploadSha256Trailer] });
    expect((await b.heartbeat(idle)).features).not.toContain(FEATURES.uploadGoAhead);
    const finishHeld = await holdSlot(a, tasks[0]!);
    await waitFor(() => gate.stats().running === 1, 10_000, "site a's upload to hold the slot");
    const u = update(tasks[1]!, 'fallback-upload-b', 8);
    await settle();
    const before = relay.bytes.up;
    const sent = uploadUpdate(() => b, u, undefined, { until: Date.now() + 60_000, maxBackoffMs: 300 });
    await waitFor(() => gate.stats().waiting === 1, 10_000, "site b's upload to wait");
    await waitFor(() => relay.bytes.up - before >= u.payload.length, 10_000, "site b's update to cross the wire while it waits");
    expect((await finishHeld()).accepted).toBe(true);
    expect((await sent).accepted).toBe(true);
    expect(coord.store.getUpdate('fallback-upload-b')?.site).toBe('site-b');
  }, 120_000);

  it('a new site whose coordinator was replaced by one without it since its last heartbeat does not wait for a go-ahead that never comes', async () => {
    const { coord, coordDir, b, tasks } = await federation({ maxWaitingUploads: 4 });
    expect((await b.heartbeat(idle)).features).toContain(FEATURES.uploadGoAhead);
    const port = coord.port;
    await coord.stop();
    running.splice(running.indexOf(coord), 1);
    // Same folder and port, the feature gone: it never sends the go-ahead, and would drop a silent upload only after 5 minutes.
    const older = await startCoordinator({ dir: coordDir, port, host: '127.0.0.1', log: quiet, features: [FEATURES.uploadSha256Trailer], limits: { transfers: { maxUploads: 1, maxWaitingUploads: 4 } } });
    running.push(older);
    // No heartbeat since: the site was told of the feature, but on a connection that is gone.
    expect(b.supports(FEATURES.uploadGoAhead)).toBe(true);
    const t = performance.now();
    const ack = await uploadUpdate(() => b, update(tasks[1]!, 'after-restart-upload-b', 8), undefined, { until: Date.now() + 60_000, maxBackoffMs: 300 });
    expect(ack.accepted).toBe(true);
    expect(performance.now() - t).toBeLessThan(30_000);
    expect(older.store.getUpdate('after-restart-upload-b')?.site).toBe('site-b');
  }, 120_000);
});
