/**
 * Admission control of bulk transfers against a real coordinator over TLS (coordinator/server/transfer-admission.ts):
 * with two downloads allowed at once, six sites' downloads all complete and no more than two ran at once; a slot
 * held by a download comes back when the download is cancelled or its connection drops, a waiting download that is
 * cancelled leaves the queue, and heartbeats are answered while transfers wait; an upload refused because too many
 * wait is sent again by the site's own retry and counted.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { modelStreamOptions } from '../../coordinator/server/model-stream.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { channelCredentials, channelOptions, coordinatorTarget, parseAddress, type ServiceClient } from '../../site-agent/transport/connection.ts';
import { uploadUpdate } from '../../site-agent/transport/upload.ts';
import { loadProto } from '../../shared/protocol/grpc.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { loadSiteKey, siteCallCredentials } from '../../shared/security/site-identity.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { waitFor } from '../../cli/processes.ts';
import { downloadBytes } from '../helpers/download.ts';
import { link, startShapedRelay, type ShapedRelay } from '../helpers/shaped-relay.ts';
import { transferPlan } from '../helpers/transfer-plan.ts';

const quiet = pino({ level: 'silent' });
const SITES = 6;
const works: string[] = [];
const running: RunningCoordinator[] = [];
const closers: Array<() => void> = [];
const relays: ShapedRelay[] = [];
const savedChunkBytes = modelStreamOptions.chunkBytes;

afterAll(async () => {
  modelStreamOptions.chunkBytes = savedChunkBytes;
  for (const c of closers) c();
  for (const r of relays) await r.close();
  for (const r of running) await r.stop();
  for (const w of works) rmSync(w, { recursive: true, force: true });
});

const plan = (o: { width: number; minSites: number }) => transferPlan({ name: 'transfer-admission', ...o });

/** A coordinator with these transfer limits and `sites` enrolled sites (their directories). */
async function federation(o: { width: number; minSites: number; sites: number; transfers: { maxDownloads?: number; maxUploads?: number; maxWaitingUploads?: number } }) {
  const work = mkdtempSync(join(tmpdir(), 'medfl-admission-'));
  works.push(work);
  const coordDir = join(work, 'coordinator');
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, plan(o));
  // A dropped connection is noticed by the coordinator's keepalive: within seconds here. The answer to a ping can
  // wait behind the megabytes buffered for a slow link, hence the long timeout.
  const coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: quiet, limits: { transfers: o.transfers }, keepalive: { timeMs: 1000, timeoutMs: 15_000 } });
  running.push(coord);
  const siteDirs: string[] = [];
  for (let i = 0; i < o.sites; i++) {
    const name = `site-${String.fromCharCode(97 + i)}`;
    const inv = addSite(coordDir, name, { ttlSeconds: 600 });
    const dir = join(work, name);
    await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir });
    siteDirs.push(dir);
  }
  return { coord, siteDirs, modelHash: coord.store.getMeta('current_model')! };
}

function siteClient(dir: string): FederationClient {
  const c = new FederationClient(new SiteHome(dir));
  closers.push(() => c.close());
  return c;
}

/**
 * A site's Federation client on a connection of its own, through `relay`: a 1 Mbit/s link holds a download there for
 * minutes (the relay stops reading when its queue is full, and the coordinator's writes then wait), so its slot
 * stays taken until the test lets go.
 */
function clientVia(dir: string, relay: ShapedRelay): ServiceClient {
  const home = new SiteHome(dir);
  const config = home.config();
  const { host } = parseAddress(config.coordinator);
  const creds = grpc.credentials.combineChannelCredentials(
    channelCredentials(host, home.caPem(), home.clientCertificate()),
    siteCallCredentials({ siteName: config.siteName, federationId: config.federationId, privateKey: loadSiteKey(dir).privateKey }),
  );
  const c = new (loadProto().Federation)(coordinatorTarget(host, relay.port), creds, channelOptions(host)) as ServiceClient;
  closers.push(() => c.close());
  return c;
}

async function slowRelay(f: { coord: RunningCoordinator }): Promise<ShapedRelay> {
  const r = await startShapedRelay({ host: '127.0.0.1', port: f.coord.port }, link(1, 0));
  relays.push(r);
  return r;
}

/** Opens a download (read or not, the slow link holds it). */
function heldDownload(c: ServiceClient, modelHash: string): grpc.ClientReadableStream<unknown> {
  const s = c.DownloadModel!({ modelHash, offset: 0 }) as grpc.ClientReadableStream<unknown>;
  s.on('error', () => undefined);
  return s;
}

describe('model downloads with two allowed at once', () => {
  let f: Awaited<ReturnType<typeof federation>>;
  let clients: FederationClient[];

  beforeAll(async () => {
    // Width 160: a ~17 MB model, more than the socket buffers between the coordinator and a slow relay hold. Small
    // chunks make each download take many turns of the coordinator's event loop, so six started together would
    // overlap if nothing held them back.
    modelStreamOptions.chunkBytes = 64 * 1024;
    f = await federation({ width: 160, minSites: 100, sites: SITES, transfers: { maxDownloads: 2, maxUploads: 2 } });
    clients = f.siteDirs.map(siteClient);
    // Connected (TLS and HTTP/2 up) before the downloads start together.
    await Promise.all(clients.map((c) => c.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'test' })));
  }, 240_000);

  it('six sites download at once: every download completes with the model, and at most two ran at a time', async () => {
    const models = await Promise.all(clients.map((c) => downloadBytes(c, f.modelHash)));
    for (const m of models) expect(sha256Hex(m)).toBe(f.modelHash);
    const s = f.coord.transfers.downloads.stats();
    expect(s.peakRunning).toBe(2);
    expect(s.queued).toBeGreaterThanOrEqual(1);
    await waitFor(() => f.coord.transfers.downloads.stats().running === 0, 5000, 'every slot to come back');
    expect(f.coord.transfers.downloads.stats().waiting).toBe(0);
  }, 60_000);

  it('gives a slot back when a download is cancelled or its connection drops, forgets a waiting one that is cancelled, and answers heartbeats meanwhile', async () => {
    const gate = f.coord.transfers.downloads;
    // Two downloads held on slow links; the second relay is cut later (a dropped connection).
    const relayA = await slowRelay(f);
    const relayB = await slowRelay(f);
    const a = heldDownload(clientVia(f.siteDirs[0]!, relayA), f.modelHash);
    heldDownload(clientVia(f.siteDirs[1]!, relayB), f.modelHash);
    await waitFor(() => gate.stats().running === 2, 10_000, 'two held downloads');
    // A third waits its turn; a fourth waits and is cancelled.
    const waiting = downloadBytes(clients[2]!, f.modelHash);
    const cancelled = heldDownload(clientVia(f.siteDirs[3]!, await slowRelay(f)), f.modelHash);
    await waitFor(() => gate.stats().waiting === 2, 10_000, 'two waiting downloads');
    // Heartbeats never wait behind transfers.
    const t = performance.now();
    await clients[4]!.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'test' });
    expect(performance.now() - t).toBeLessThan(2000);
    cancelled.cancel();
    await waitFor(() => gate.stats().waiting === 1, 10_000, 'the cancelled download to leave the queue');
    expect(gate.stats().running).toBe(2);
    // Cancelling a running download lets the waiting one through.
    a.cancel();
    expect(sha256Hex(await waiting)).toBe(f.modelHash);
    // The other holder's connection drops: its slot comes back too.
    relayB.cut();
    await waitFor(() => gate.stats().running === 0 && gate.stats().waiting === 0, 30_000, 'every slot to come back');
    expect(gate.stats().peakRunning).toBe(2);
  }, 90_000);
});

/** Two sites with their round-1 tasks on a coordinator with these upload limits, and a way to hold the upload slot. */
async function uploadFederation(transfers: { maxUploads: number; maxWaitingUploads: number }) {
  modelStreamOptions.chunkBytes = savedChunkBytes;
  const f = await federation({ width: 4, minSites: 2, sites: 2, transfers });
  const [a, b] = f.siteDirs.map(siteClient) as [FederationClient, FederationClient];
  const tasks = await Promise.all(
    [a, b].map(
      (c) =>
        new Promise<WireTask>((resolve) => {
          const s = c.subscribeTasks([]);
          s.on('error', () => undefined);
          s.on('data', (t: WireTask) => t.kind === 'TRAIN' && resolve(t));
          closers.push(() => s.cancel());
        }),
    ),
  );
  const payloadFor = (task: WireTask, seed: number) => {
    const settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
    return encodeSafetensors(pick(architectureFor(settings.model).init(seed), settings.sharedTensors.map((name) => ({ name }))));
  };
  /** Opens an upload and sends its header and half its bytes; `finish` sends the rest. */
  const startUpload = async (client: FederationClient, task: WireTask, updateId: string, seed: number) => {
    const payload = payloadFor(task, seed);
    const call = client.openUpload(60_000);
    call.ack.catch(() => undefined); // looked at by the tests that care
    await call.send({ header: { updateId, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4 } });
    await call.sendData(0, payload.subarray(0, payload.length >> 1));
    const finish = async () => {
      await call.sendData(payload.length >> 1, payload.subarray(payload.length >> 1));
      await call.end();
      return call.ack;
    };
    return { call, finish };
  };
  return { f, a, b, tasks, payloadFor, startUpload };
}

describe('uploads past the limit', () => {
  it('are refused RESOURCE_EXHAUSTED past the waiting room, sent again by the site, and counted', async () => {
    // One upload at a time and none waiting: a second upload while the first is open is refused.
    const { f, a, b, tasks, payloadFor, startUpload } = await uploadFederation({ maxUploads: 1, maxWaitingUploads: 0 });
    // Site a holds the only upload slot: its header and half its bytes are in, the rest waits.
    const held = await startUpload(a, tasks[0]!, 'held-upload-a', 7);
    await waitFor(() => f.coord.transfers.uploads.stats().running === 1, 10_000, 'the held upload to run');
    // Site b's upload is refused for now; its retry goes on until the slot is free.
    const warnings: string[] = [];
    const log = { warn: (o: { code?: string }) => warnings.push(String(o.code)) } as unknown as typeof quiet;
    const sent = uploadUpdate(() => b, { updateId: 'retried-upload-b', taskId: tasks[1]!.taskId, round: tasks[1]!.round, baseModelHash: tasks[1]!.modelHash, numSamples: 4, payload: payloadFor(tasks[1]!, 8) }, undefined, { until: Date.now() + 60_000, maxBackoffMs: 300, log });
    await waitFor(() => warnings.length > 0, 10_000, "site b's first refusal");
    expect(warnings[0]).toBe('RESOURCE_EXHAUSTED');
    expect(f.coord.transfers.uploads.stats().refused).toBeGreaterThanOrEqual(1);
    expect((await held.finish()).accepted).toBe(true);
    expect((await sent).accepted).toBe(true);
    expect(f.coord.store.getUpdate('held-upload-a')?.site).toBe('site-a');
    expect(f.coord.store.getUpdate('retried-upload-b')?.site).toBe('site-b');
    await waitFor(() => f.coord.transfers.uploads.stats().running === 0, 5000, 'the upload slot to come back');
  }, 120_000);

  it("wait their turn, and one cut off while waiting leaves the queue and gives its site's own slot back", async () => {
    const { f, a, b, tasks, startUpload } = await uploadFederation({ maxUploads: 1, maxWaitingUploads: 4 });
    const gate = f.coord.transfers.uploads;
    const held = await startUpload(a, tasks[0]!, 'held-upload-a', 7);
    await waitFor(() => gate.stats().running === 1, 10_000, 'the held upload to run');
    // Site b's upload, over a connection that is then cut, waits and leaves the queue with its connection.
    const relay = await startShapedRelay({ host: '127.0.0.1', port: f.coord.port }, link(0, 0));
    relays.push(relay);
    const home = new SiteHome(f.siteDirs[1]!);
    const direct = home.config();
    home.saveConfig({ ...direct, coordinator: `localhost:${relay.port}` });
    const viaRelay = siteClient(f.siteDirs[1]!);
    home.saveConfig(direct);
    await viaRelay.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'test' });
    await startUpload(viaRelay, tasks[1]!, 'cut-upload-b', 8);
    await waitFor(() => gate.stats().waiting === 1, 10_000, "site b's upload to wait");
    relay.cut();
    await waitFor(() => gate.stats().waiting === 0, 10_000, 'the cut upload to leave the queue');
    // Site b again, directly, with two uploads open at once (its own limit): neither is refused, so the cut one
    // holds none of site b's two slots. The first waits for site a's; the second waits behind it.
    const first = await startUpload(b, tasks[1]!, 'first-upload-b', 8);
    const second = await startUpload(b, tasks[1]!, 'second-upload-b', 8);
    await waitFor(() => gate.stats().waiting === 2, 10_000, "site b's two uploads to wait");
    expect(gate.stats().refused).toBe(0);
    expect((await held.finish()).accepted).toBe(true);
    expect((await first.finish()).accepted).toBe(true);
    // The round has both its updates: the second is refused by the round, not by the gate.
    const late = await second.finish();
    expect(late.accepted).toBe(false);
    expect(gate.stats()).toMatchObject({ running: 0, waiting: 0, refused: 0, peakRunning: 1 });
  }, 120_000);
});
