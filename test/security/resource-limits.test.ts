/**
 * Resource limits at the coordinator, against the real server over TLS (issue 14, item 5a/5b):
 * - open uploads per site are capped, the extra one
 *   is refused with RESOURCE_EXHAUSTED, and refused, cut-off and stalled uploads give back their slot, their
 *   partial file and its descriptor;
 * - failed authentication and enrolment calls are limited per caller (address + claimed site name) under a looser
 *   per-address cap (RESOURCE_EXHAUSTED once over the limit), one failing caller does not lock out the other sites
 *   behind its address, and the warn lines are collapsed.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type CoordinatorOptions, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { uploadOptions } from '../../coordinator/server/federation-service.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type UploadCall, type WireTask } from '../../site-agent/transport/client.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { CHANNEL_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { generateSiteKeyPair, saveSiteKey } from '../../shared/security/site-identity.ts';
import { waitFor } from '../../cli/processes.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

const works: string[] = [];
const running: RunningCoordinator[] = [];
const clients: FederationClient[] = [];
afterAll(async () => {
  for (const c of clients) c.close();
  for (const r of running) await r.stop();
  for (const w of works) rmSync(w, { recursive: true, force: true });
});

/** Log lines the coordinator wrote, parsed. */
function captureLog(): { log: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { log: pino({ level: 'warn' }, sink), lines };
}

interface Fixture {
  work: string;
  coordDir: string;
  coord: RunningCoordinator;
  siteDir: string;
  client: FederationClient;
}

async function fixture(options: Partial<CoordinatorOptions>): Promise<Fixture> {
  const work = mkdtempSync(join(tmpdir(), 'medfl-limits-'));
  works.push(work);
  const coordDir = join(work, 'coordinator');
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, TEST_PLAN({ rounds: 1, minSites: 1, gather: 0, deadline: 600 }));
  const coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }), ...options });
  running.push(coord);
  const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
  const siteDir = join(work, 'site-a');
  await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteDir });
  const client = new FederationClient(new SiteHome(siteDir));
  clients.push(client);
  return { work, coordDir, coord, siteDir, client };
}

function firstTask(client: FederationClient): Promise<WireTask> {
  const stream = client.subscribeTasks([]);
  stream.on('error', () => undefined);
  return new Promise((resolve) =>
    stream.on('data', (t: WireTask) => {
      if (t.kind !== 'TRAIN') return;
      stream.cancel();
      resolve(t);
    }),
  );
}

const partialDir = (f: Fixture) => join(f.coordDir, 'updates', '.partial');
const partialFiles = (f: Fixture) => readdirSync(partialDir(f)).length;
/** This process's descriptors open on partial upload files (deleted ones included: a leak all the same). */
function partialFds(f: Fixture): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith(partialDir(f))) n++;
    } catch {
      // closed while we looked
    }
  }
  return n;
}

/** Opens an upload of a well-formed update and sends its header and the first half of the bytes, then stalls. */
async function startUpload(f: Fixture, task: WireTask, id: string): Promise<{ call: UploadCall; settled: Promise<unknown> }> {
  const settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
  const payload = encodeSafetensors(pick(architectureFor(settings.model).init(7), settings.sharedTensors.map((name) => ({ name }))));
  const call = f.client.openUpload(120_000);
  const settled = call.ack.then((a) => a, (e: unknown) => e);
  await call.send({ header: { updateId: `limits-${id}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4 } });
  await call.sendData(0, payload.subarray(0, Math.floor(payload.length / 2))).catch(() => undefined);
  return { call, settled };
}

describe('open uploads per site', () => {
  let f: Fixture;
  let task: WireTask;
  beforeAll(async () => {
    f = await fixture({ limits: { maxOpenUploadsPerSite: 2 } });
    task = await firstTask(f.client);
  });

  it('refuses a third open upload with RESOURCE_EXHAUSTED; a cut-off upload gives back its slot, file and descriptor', async () => {
    const a = await startUpload(f, task, `up-a`);
    const b = await startUpload(f, task, `up-b`);
    await waitFor(() => partialFiles(f) === 2, 10_000, 'two partial files');
    expect(partialFds(f)).toBe(2);

    const c = await startUpload(f, task, `up-c`);
    // Without the limit the third upload is admitted and stays open: fail in seconds, not at the test timeout.
    const refused = (await Promise.race([c.settled, new Promise((r) => setTimeout(() => r(new Error('the third upload is still open')), 15_000))])) as grpc.ServiceError;
    expect(refused.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(refused.details).toMatch(/site 'site-a' already has 2 uploads open, the most allowed at once/);
    expect(partialFiles(f)).toBe(2);

    // Ending an upload early: refused for its missing bytes, and everything it held is released.
    await a.call.end();
    expect(await a.settled).toMatchObject({ accepted: false, reason: expect.stringMatching(/upload ended after \d+ of \d+ bytes/) });
    await waitFor(() => partialFiles(f) === 1 && partialFds(f) === 1, 10_000, 'the cut-off upload to release its partial file and descriptor');

    // Its slot is free again.
    const d = await startUpload(f, task, `up-d`);
    await waitFor(() => partialFiles(f) === 2, 10_000, 'the next upload to be admitted');
    for (const u of [b, d]) await u.call.end();
    await Promise.all([b.settled, d.settled]);
    await waitFor(() => partialFiles(f) === 0 && partialFds(f) === 0, 10_000, 'every partial file and descriptor released');
  });

  it('drops stalled uploads, deleting their partial files and closing their descriptors, and frees their slots', async () => {
    const before = uploadOptions.stallMs;
    uploadOptions.stallMs = 600;
    try {
      const a = await startUpload(f, task, `up-stall-a`);
      const b = await startUpload(f, task, `up-stall-b`);
      for (const u of [a, b]) expect(((await u.settled) as grpc.ServiceError).code).toBe(grpc.status.UNAVAILABLE);
      await waitFor(() => partialFiles(f) === 0 && partialFds(f) === 0, 10_000, 'stalled uploads to release their files');
    } finally {
      uploadOptions.stallMs = before;
    }
    const c = await startUpload(f, task, `up-after-stall`);
    await waitFor(() => partialFiles(f) === 1, 10_000, 'an upload admitted after the stalled ones were dropped');
    await c.call.end();
    await c.settled;
    await waitFor(() => partialFiles(f) === 0 && partialFds(f) === 0, 10_000, 'the last upload to release its file');
  });
});

describe('failed authentication and enrolment calls, per peer address', () => {
  const limits = { burst: 4, refillPerMinute: 1, summaryMs: 3000 };

  it('refuses a peer with RESOURCE_EXHAUSTED after the burst, on every method (unary and model transfers) alike, with collapsed warn lines', async () => {
    const { log, lines } = captureLog();
    const f = await fixture({ log, limits: { authFailures: limits } });
    // A site directory whose key is not the one enrolled: every token it signs fails verification.
    const impostorDir = join(f.work, 'impostor');
    cpSync(f.siteDir, impostorDir, { recursive: true });
    saveSiteKey(impostorDir, generateSiteKeyPair(), { overwrite: true });
    const impostor = new FederationClient(new SiteHome(impostorDir));
    clients.push(impostor);
    const idle = { state: 'idle', progress: 0, taskId: '', engine: '' };

    const codes: grpc.status[] = [];
    for (let i = 0; i < 30; i++) codes.push(await impostor.heartbeat(idle).then(() => grpc.status.OK, (e: grpc.ServiceError) => e.code));
    expect(codes.slice(0, limits.burst)).toEqual(Array(limits.burst).fill(grpc.status.UNAUTHENTICATED));
    expect(codes.slice(limits.burst)).toEqual(Array(30 - limits.burst).fill(grpc.status.RESOURCE_EXHAUSTED));

    // A model download shares the limit: it runs through the interceptor, where this caller's bucket is already empty.
    const download = await new Promise<grpc.ServiceError>((resolve) => {
      const s = impostor.downloadModel('0'.repeat(64), 0);
      s.on('error', resolve);
      s.on('data', () => undefined);
    });
    expect([grpc.status.UNAUTHENTICATED, grpc.status.RESOURCE_EXHAUSTED]).toContain(download.code);
    expect(download.details).not.toMatch(/does not verify|unknown site/);
    const downloadRefused = download.code === grpc.status.RESOURCE_EXHAUSTED ? 1 : 0;

    // One full line, one "refusing" line, then (after the window) one summary with the count: not 30 lines.
    const rejected = () => lines.filter((l) => l.msg === 'site call rejected');
    expect(rejected()).toHaveLength(1);
    expect(rejected()[0]).toMatchObject({ code: 'UNAUTHENTICATED', reason: expect.stringMatching(/signature does not verify/) });
    expect(lines.filter((l) => String(l.msg).startsWith('too many failed calls from this address'))).toHaveLength(1);
    const summaries = () => lines.filter((l) => String(l.msg).startsWith('more failed calls from this address'));
    await waitFor(() => summaries().reduce((n, l) => n + Number(l.failures) + Number(l.refusedUnread), 0) === 30 - 1 + 1, 15_000, 'the summary line');
    expect(summaries()[0]).toMatchObject({ peer: '127.0.0.1', lastReason: expect.stringMatching(/too many failed|signature|token not accepted/) });
    expect(summaries().reduce((n, l) => n + Number(l.failures), 0)).toBe(limits.burst - 1 + 1 - downloadRefused);
    expect(summaries().reduce((n, l) => n + Number(l.refusedUnread), 0)).toBe(30 - limits.burst + downloadRefused);
  });

  it('a caller failing over and over does not lock out the other sites behind the same address, nor the real site it impersonates', async () => {
    const { log, lines } = captureLog();
    const f = await fixture({ log, limits: { authFailures: limits } });
    const idle = { state: 'idle', progress: 0, taskId: '', engine: '' };
    // A second site that has not called yet, behind the same address (127.0.0.1) like every caller here.
    const inv = addSite(f.coordDir, 'site-b', { ttlSeconds: 600 });
    const siteB = join(f.work, 'site-b');
    await enrollSite({ coordinator: `localhost:${f.coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteB });
    const b = new FederationClient(new SiteHome(siteB));
    clients.push(b);
    // The real site-a authenticates once; then an impostor under its name, and a caller under an unknown name, fail.
    await f.client.heartbeat(idle);
    const impostorDir = join(f.work, 'impostor');
    cpSync(f.siteDir, impostorDir, { recursive: true });
    saveSiteKey(impostorDir, generateSiteKeyPair(), { overwrite: true });
    const impostor = new FederationClient(new SiteHome(impostorDir));
    const strangerDir = join(f.work, 'stranger');
    cpSync(siteB, strangerDir, { recursive: true });
    const strangerConfig = join(strangerDir, 'site.json');
    writeFileSync(strangerConfig, JSON.stringify({ ...JSON.parse(readFileSync(strangerConfig, 'utf8')), siteName: 'site-nobody' }));
    const stranger = new FederationClient(new SiteHome(strangerDir));
    clients.push(impostor, stranger);
    const codeOf = (p: Promise<unknown>) => p.then(() => grpc.status.OK, (e: grpc.ServiceError) => e.code);
    const impostorCodes: grpc.status[] = [];
    const strangerCodes: grpc.status[] = [];
    for (let i = 0; i < 12; i++) {
      impostorCodes.push(await codeOf(impostor.heartbeat(idle)));
      strangerCodes.push(await codeOf(stranger.heartbeat(idle)));
    }
    // Both failing callers are held to their own bucket ...
    expect(impostorCodes.slice(limits.burst)).toEqual(Array(12 - limits.burst).fill(grpc.status.RESOURCE_EXHAUSTED));
    expect(strangerCodes.slice(limits.burst)).toEqual(Array(12 - limits.burst).fill(grpc.status.RESOURCE_EXHAUSTED));
    // ... while the real site-a and site-b, from the same address, are heard.
    expect(await codeOf(f.client.heartbeat(idle))).toBe(grpc.status.OK);
    expect(await codeOf(b.heartbeat(idle))).toBe(grpc.status.OK);
    // The log keeps the real reasons the callers were not told.
    const rejected = lines.filter((l) => l.msg === 'site call rejected');
    expect(rejected.map((l) => String(l.reason)).join('\n')).toMatch(/signature does not verify|unknown site 'site-nobody'/);
  });

  it('counts refused enrolments too, and refuses the peer once over the limit', async () => {
    const f = await fixture({ limits: { authFailures: limits } });
    const caPem = new CoordinatorHome(f.coordDir).caPem();
    const { Enrollment } = loadProto();
    const client = new Enrollment(`localhost:${f.coord.port}`, pinnedChannelCredentials(caPem), CHANNEL_OPTIONS) as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
    try {
      const enrol = (siteName: string) =>
        new Promise<grpc.ServiceError | null>((resolve) =>
          client.Enroll({ siteName, token: 'not-the-token-0123456789', publicKey: generateSiteKeyPair().publicKeyRaw, clientCsrPem: '' }, { deadline: Date.now() + 10_000 }, (err: grpc.ServiceError | null) => resolve(err)),
        );
      const errors: (grpc.ServiceError | null)[] = [];
      for (let i = 0; i < 8; i++) errors.push(await enrol(i % 2 ? 'site-a' : 'no-such-site'));
      expect(errors.slice(0, limits.burst).map((e) => e?.code)).toEqual(Array(limits.burst).fill(grpc.status.UNAUTHENTICATED));
      expect(errors.slice(limits.burst).map((e) => e?.code)).toEqual(Array(8 - limits.burst).fill(grpc.status.RESOURCE_EXHAUSTED));
      // A known and an unknown site read the same to an unauthenticated caller (item 5e).
      expect(errors[0]!.details.replace('no-such-site', 'X')).toBe(errors[1]!.details.replace('site-a', 'X'));
    } finally {
      client.close();
    }
  });
});
