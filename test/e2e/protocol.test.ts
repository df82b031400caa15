/**
 * The real coordinator (in this process, real gRPC over TLS on loopback) against clients that misbehave:
 * forged and stale tokens, bad enrolments, and malformed, inconsistent or poisoned uploads. Each refusal
 * must say why, and nothing refused may leave a file or a row behind.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { mkdtempSync, readdirSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { SignJWT } from 'jose';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite, revokeSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask, type UploadAck } from '../../site-agent/transport/client.ts';
import { uploadOnce } from '../../site-agent/transport/upload.ts';
import { ModelCache } from '../../site-agent/transport/model-cache.ts';
import { modelStreamOptions } from '../../coordinator/server/model-stream.ts';
import { uploadOptions } from '../../coordinator/server/federation-service.ts';
import { loadSiteKey, signSiteToken } from '../../shared/security/site-identity.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { CHANNEL_OPTIONS, METHODS, loadProto } from '../../shared/protocol/grpc.ts';
import http2 from 'node:http2';
import { TaskSettingsSchema, type TaskSettings } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle, type NamedTensor, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { waitFor } from '../../cli/processes.ts';
import { TEST_PLAN } from '../helpers/federation.ts';
import { downloadBytes, downloadChunks } from '../helpers/download.ts';

let work: string;
let coordDir: string;
let coord: RunningCoordinator;
let siteA: FederationClient;
let task: WireTask;
let settings: TaskSettings;
const fp = () => new CoordinatorHome(coordDir).caFingerprint();
const address = () => `localhost:${coord.port}`;

function rawClient(siteDir: string) {
  const { Federation } = loadProto();
  const home = new SiteHome(siteDir);
  return new Federation(address(), pinnedChannelCredentials(home.caPem()), CHANNEL_OPTIONS) as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
}

type CallName = 'Heartbeat' | 'DownloadModel' | 'UploadUpdate';

/**
 * One call with the given authorization header (or none), through a plain grpc-js client: unary, server-streaming
 * and client-streaming calls all pass the auth interceptor. Each request is one that succeeds once
 * authenticated: a heartbeat, a download from the model's end (no chunks), an upload with no chunks (answered).
 */
function callWith(siteDir: string, authorization: string | undefined, method: CallName = 'Heartbeat'): Promise<{ code: number; details: string }> {
  const c = rawClient(siteDir);
  const md = new grpc.Metadata();
  if (authorization !== undefined) md.set('authorization', authorization);
  return new Promise((resolve) => {
    const done = (err: grpc.ServiceError | null) => {
      c.close();
      resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' });
    };
    if (method === 'Heartbeat') c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' }, md, done);
    else if (method === 'UploadUpdate') (c.UploadUpdate(md, done) as grpc.ClientWritableStream<unknown>).end();
    else {
      const s = c.DownloadModel({ modelHash: task.modelHash, offset: task.modelSize }, md) as grpc.ClientReadableStream<unknown>;
      s.on('data', () => undefined);
      s.on('error', done);
      s.on('end', () => done(null));
    }
  });
}

function update(mutate?: (t: NamedTensor) => NamedTensor): TensorBundle {
  const arch = architectureFor(settings.model);
  const base = pick(arch.init(5), settings.sharedTensors.map((name) => ({ name })));
  return mutate ? makeBundle([...base.values()].map(mutate)) : base;
}

function send(u: { payload: Buffer; round?: number; base?: string; updateId?: string; numSamples?: number }): Promise<UploadAck> {
  return uploadOnce(siteA, {
    updateId: u.updateId ?? `test-${randomUUID()}`,
    taskId: task.taskId,
    round: u.round ?? task.round,
    baseModelHash: u.base ?? task.modelHash,
    numSamples: u.numSamples ?? 4,
    payload: u.payload,
  });
}

/** Sends hand-made chunks; returns the ack. */
function sendRaw(messages: Record<string, unknown>[]): Promise<UploadAck> {
  const call = siteA.openUpload(30_000);
  for (const m of messages) void call.send(m);
  void call.end();
  return call.ack;
}

function nothingStored() {
  expect(readdirSync(join(coordDir, 'updates', '.partial'))).toEqual([]);
  const r1 = join(coordDir, 'updates', 'round-1');
  expect(existsSync(r1) ? readdirSync(r1) : []).toEqual([]);
  expect(coord.store.updatesForRound(1)).toEqual([]);
}

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'medfl-proto-'));
  coordDir = join(work, 'coordinator');
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, TEST_PLAN({ rounds: 1, minSites: 1, gather: 0 }));
  coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }) });
  for (const s of ['site-a', 'site-b', 'site-x']) {
    const inv = addSite(coordDir, s, { ttlSeconds: 600 });
    await enrollSite({ coordinator: address(), token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, s) });
  }
  siteA = new FederationClient(new SiteHome(join(work, 'site-a')));
  const stream = siteA.subscribeTasks([]);
  stream.on('error', () => undefined);
  task = await new Promise<WireTask>((resolve) => stream.on('data', (t: WireTask) => t.kind === 'TRAIN' && resolve(t)));
  settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
});

afterAll(async () => {
  siteA?.close();
  await coord?.stop();
});

for (const method of ['Heartbeat', 'DownloadModel', 'UploadUpdate'] as const) describe(`tokens on every call: ${method}`, () => {
  const dir = () => join(work, 'site-a');
  const key = () => loadSiteKey(dir()).privateKey;
  const fed = () => coord.federationId;
  const now = () => Math.floor(Date.now() / 1000);

  it('accepts a fresh token signed by the site itself', async () => {
    const token = await signSiteToken({ siteName: 'site-a', federationId: fed(), privateKey: key() });
    expect((await callWith(dir(), `Bearer ${token}`, method)).code).toBe(grpc.status.OK);
  });

  it('refuses a call without a token', async () => {
    const r = await callWith(dir(), undefined, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/token/i);
  });

  it('refuses an expired token', async () => {
    const t = await new SignJWT({}).setProtectedHeader({ alg: 'EdDSA' }).setIssuer('site-a').setSubject('site-a').setAudience(fed()).setIssuedAt(now() - 600).setExpirationTime(now() - 300).setJti(randomUUID()).sign(key());
    const r = await callWith(dir(), `Bearer ${t}`, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/expired/);
  });

  it('refuses a token for another federation', async () => {
    const t = await signSiteToken({ siteName: 'site-a', federationId: 'fed-someone-else', privateKey: key() });
    const r = await callWith(dir(), `Bearer ${t}`, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/audience/);
  });

  it("refuses alg: none", async () => {
    const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const t = `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ iss: 'site-a', sub: 'site-a', aud: fed(), iat: now(), exp: now() + 60, jti: randomUUID() })}.`;
    const r = await callWith(dir(), `Bearer ${t}`, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/alg/i);
  });

  it("refuses a token signed by another site's key (a site can act only as itself)", async () => {
    const otherKey = loadSiteKey(join(work, 'site-b')).privateKey;
    const t = await signSiteToken({ siteName: 'site-a', federationId: fed(), privateKey: otherKey });
    const r = await callWith(dir(), `Bearer ${t}`, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    // The same words as for a site that does not exist (docs/security.md): the caller learns nothing about names.
    expect(r.details).toMatch(/token not accepted for site 'site-a': no enrolled site of that name holds the key that signed it/);
  });

  it('refuses a replayed token', async () => {
    const t = await signSiteToken({ siteName: 'site-a', federationId: fed(), privateKey: key() });
    expect((await callWith(dir(), `Bearer ${t}`, method)).code).toBe(grpc.status.OK);
    const r = await callWith(dir(), `Bearer ${t}`, method);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/replay/i);
  });
});

describe('revocation', () => {
  it('refuses a revoked site at once, without a restart, and closes its task stream', async () => {
    const x = new FederationClient(new SiteHome(join(work, 'site-x')));
    const stream = x.subscribeTasks([]);
    const closed = new Promise<grpc.ServiceError>((resolve) => stream.on('error', resolve));
    await x.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' });
    revokeSite(coordDir, 'site-x');
    const err = await closed;
    expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
    await expect(x.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' })).rejects.toMatchObject({ code: grpc.status.PERMISSION_DENIED, details: expect.stringMatching(/revoked/) });
    // Model transfers are refused the same way.
    await expect(downloadChunks(x, task.modelHash)).rejects.toMatchObject({ code: grpc.status.PERMISSION_DENIED, details: expect.stringMatching(/revoked/) });
    await expect(uploadOnce(x, { updateId: `test-${randomUUID()}`, taskId: task.taskId, round: task.round, baseModelHash: task.modelHash, numSamples: 4, payload: Buffer.alloc(100) })).rejects.toMatchObject({ code: grpc.status.PERMISSION_DENIED });
    x.close();
  });
});

/**
 * A raw HTTP/2 request to the coordinator with hand-made gRPC frames, as site-a: what the coordinator answers to
 * frames no well-behaved client sends. Resolves the grpc-status and grpc-message it gave.
 */
async function rawBulk(path: string, body: Buffer[], opts: { end?: boolean; timeout?: string } = {}): Promise<{ status: number; message: string; elapsedMs: number }> {
  const home = new SiteHome(join(work, 'site-a'));
  const token = await signSiteToken({ siteName: 'site-a', federationId: coord.federationId, privateKey: loadSiteKey(join(work, 'site-a')).privateKey });
  const session = http2.connect(`https://localhost:${coord.port}`, { ca: home.caPem() });
  session.on('error', () => undefined);
  const t0 = Date.now();
  try {
    return await new Promise((resolve, reject) => {
      const headers: http2.OutgoingHttpHeaders = { ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers', authorization: `Bearer ${token}` };
      if (opts.timeout) headers['grpc-timeout'] = opts.timeout;
      const req = session.request(headers);
      let status: { status: number; message: string } | undefined;
      // Settled by the status: a server need not reset a request the client never ended.
      const take = (h: http2.IncomingHttpHeaders) => {
        if (h['grpc-status'] === undefined) return;
        status = { status: Number(h['grpc-status']), message: decodeURIComponent(String(h['grpc-message'] ?? '')) };
        resolve({ ...status, elapsedMs: Date.now() - t0 });
        req.close();
      };
      req.on('response', take);
      req.on('trailers', take);
      req.on('data', () => undefined);
      req.on('error', () => undefined);
      req.on('close', () => (status ? resolve({ ...status, elapsedMs: Date.now() - t0 }) : reject(new Error(`no grpc-status (HTTP/2 code ${req.rstCode})`))));
      for (const b of body) req.write(b);
      if (opts.end !== false) req.end();
    });
  } finally {
    session.close();
  }
}

const frame = (message: Uint8Array, compressed = false): Buffer => {
  const b = Buffer.alloc(5 + message.length);
  b[0] = compressed ? 1 : 0;
  b.writeUInt32BE(message.length, 1);
  b.set(message, 5);
  return b;
};

describe('the coordinator refuses frames no client should send', () => {
  const downloadRequest = () => (loadProto().Federation.service as grpc.ServiceDefinition).DownloadModel!.requestSerialize({ modelHash: task.modelHash, offset: task.modelSize });

  it('a message over the size limit, a compressed message, a second request for a server stream, no request at all', async () => {
    const huge = Buffer.alloc(5);
    huge.writeUInt32BE(64 * 1024 * 1024, 1); // a prefix announcing 64 MiB: refused before any of it is held
    expect(await rawBulk(METHODS.uploadUpdate, [huge])).toMatchObject({ status: grpc.status.RESOURCE_EXHAUSTED, message: expect.stringMatching(/larger than max/) });
    const refused = async (path: string, body: Buffer[]) => expect((await rawBulk(path, body)).status).not.toBe(grpc.status.OK);
    await refused(METHODS.uploadUpdate, [frame(Buffer.from('x'), true)]);
    await refused(METHODS.downloadModel, [frame(downloadRequest()), frame(downloadRequest())]);
    await refused(METHODS.downloadModel, []);
    await refused(METHODS.downloadModel, [frame(downloadRequest()).subarray(0, 7)]);
    await refused(METHODS.downloadModel, [frame(Buffer.from([0xff, 0xff, 0xff]))]);
    nothingStored();
  });

  it('ends an upload that outlives its grpc-timeout, and keeps nothing of it', async () => {
    const r = await rawBulk(METHODS.uploadUpdate, [], { end: false, timeout: '300m' });
    expect(r.status).toBe(grpc.status.DEADLINE_EXCEEDED);
    expect(r.elapsedMs).toBeGreaterThanOrEqual(250);
    nothingStored();
  });
});

describe('model transfers with a plain grpc-js client (sites of the previous version)', () => {
  it('download the whole model and get upload refusals with their reasons', async () => {
    const c = rawClient(join(work, 'site-a'));
    const md = async () => {
      const m = new grpc.Metadata();
      m.set('authorization', `Bearer ${await signSiteToken({ siteName: 'site-a', federationId: coord.federationId, privateKey: loadSiteKey(join(work, 'site-a')).privateKey })}`);
      return m;
    };
    try {
      const dl = c.DownloadModel({ modelHash: task.modelHash, offset: 0 }, await md()) as grpc.ClientReadableStream<{ data: Buffer; offset: number }>;
      const parts: Buffer[] = [];
      await new Promise((resolve, reject) => {
        dl.on('data', (ch: { data: Buffer }) => parts.push(ch.data));
        dl.on('end', resolve);
        dl.on('error', reject);
      });
      expect(sha256Hex(Buffer.concat(parts))).toBe(task.modelHash);

      const payload = encodeSafetensors(update());
      const meta = await md();
      const ack = await new Promise<UploadAck>((resolve, reject) => {
        const up = c.UploadUpdate(meta, (err: grpc.ServiceError | null, a: UploadAck) => (err ? reject(err) : resolve(a))) as grpc.ClientWritableStream<unknown>;
        up.write({ header: { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(Buffer.from('not it')), numSamples: 4 } });
        up.write({ data: payload, offset: 0 });
        up.end();
      });
      expect(ack).toMatchObject({ accepted: false, reason: expect.stringMatching(/hash mismatch/) });
      nothingStored();
    } finally {
      c.close();
    }
  });
});

describe('task streams', () => {
  it('keeps one per site: a newer stream closes the older with a reason', async () => {
    const b = new FederationClient(new SiteHome(join(work, 'site-b')));
    const first = b.subscribeTasks([]);
    first.on('data', () => undefined);
    const firstError = new Promise<grpc.ServiceError>((resolve) => first.on('error', resolve));
    await waitFor(() => coord.engine.connectedSites().includes('site-b'), 5_000, 'site-b connected');
    const second = b.subscribeTasks([]);
    second.on('data', () => undefined);
    second.on('error', () => undefined);
    const err = await firstError;
    expect(err.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(err.details).toMatch(/another agent connected as site 'site-b'/);
    expect(coord.engine.connectedSites()).toContain('site-b');
    second.cancel();
    b.close();
  });
});

describe('enrolment', () => {
  it('refuses a token that was already used', async () => {
    const inv = addSite(coordDir, 'site-y', { ttlSeconds: 600 });
    await enrollSite({ coordinator: address(), token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'site-y') });
    await expect(enrollSite({ coordinator: address(), token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'site-y2') })).rejects.toThrow(/already used/);
  });

  it('refuses an expired token', async () => {
    const inv = addSite(coordDir, 'site-z', { ttlSeconds: -1 });
    await expect(enrollSite({ coordinator: address(), token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'site-z') })).rejects.toThrow(/expired/);
  });

  it('refuses a forged token for an invited site', async () => {
    addSite(coordDir, 'site-w', { ttlSeconds: 600 });
    await expect(enrollSite({ coordinator: address(), token: `site-w.${'A'.repeat(32)}`, caFingerprint: fp(), dir: join(work, 'site-w') })).rejects.toThrow(/not valid/);
  });

  it('refuses a coordinator whose CA does not match the fingerprint', async () => {
    const inv = addSite(coordDir, 'site-v', { ttlSeconds: 600 });
    const wrong = 'AB:'.repeat(31) + 'AB';
    await expect(enrollSite({ coordinator: address(), token: inv.token, caFingerprint: wrong, dir: join(work, 'site-v') })).rejects.toThrow(/CA fingerprint mismatch/);
  });
});

describe('model download', () => {
  it('streams the snapshot in chunks and resumes from an offset', async () => {
    const read = async (offset: number) => {
      const chunks = await downloadChunks(siteA, task.modelHash, offset);
      for (const c of chunks) expect(c.sha256).toBe(task.modelHash);
      return Buffer.concat(chunks.map((c) => c.data));
    };
    const whole = await read(0);
    expect(whole.length).toBe(task.modelSize);
    expect(sha256Hex(whole)).toBe(task.modelHash);
    const half = Math.floor(whole.length / 2);
    expect((await read(half)).equals(whole.subarray(half))).toBe(true);
    await expect(read(whole.length + 1)).rejects.toMatchObject({ code: grpc.status.OUT_OF_RANGE });
    await expect(downloadChunks(siteA, '0'.repeat(64))).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
  });
});

describe('model download cancelled by the site', () => {
  it('stops the stream at the coordinator, which keeps serving later downloads', async () => {
    // Small chunks (the coordinator runs in this process), so the test model takes several messages.
    const saved = { ...modelStreamOptions };
    modelStreamOptions.chunkBytes = 1024;
    try {
      expect(task.modelSize).toBeGreaterThan(4 * 1024);
      let chunks = 0;
      const cancelled = await new Promise<{ code: number }>((resolve) => {
        const s = siteA.downloadModel(task.modelHash, 0);
        s.on('data', () => {
          if (++chunks === 2) s.cancel();
        });
        s.on('error', (e: { code: number }) => resolve(e));
        s.on('end', () => resolve({ code: -1 }));
      });
      expect(cancelled.code).toBe(grpc.status.CANCELLED);
      for (let i = 0; i < 3; i++) {
        const chunks = await downloadChunks(siteA, task.modelHash);
        expect(chunks.length).toBe(Math.ceil(task.modelSize / 1024));
        expect(sha256Hex(Buffer.concat(chunks.map((c) => c.data)))).toBe(task.modelHash);
      }
    } finally {
      Object.assign(modelStreamOptions, saved);
    }
  });
});

describe('site model cache', () => {
  it('resumes a cut-off download from its .part file and skips models it already has', async () => {
    const cache = new ModelCache(mkdtempSync(join(tmpdir(), 'medfl-cache-')));
    const whole = await downloadBytes(siteA, task.modelHash);
    const cut = Math.floor(whole.length / 3);
    writeFileSync(join(cache.dir, `${task.modelHash}.part`), whole.subarray(0, cut));
    expect(await cache.ensure(siteA, task.modelHash, task.modelSize)).toBe(whole.length - cut);
    expect(cache.read(task.modelHash).equals(whole)).toBe(true);
    expect(await cache.ensure(siteA, task.modelHash, task.modelSize)).toBe(0);
    expect(cache.hashes()).toEqual([task.modelHash]);
  });

  it('throws away a download whose bytes do not hash to the model asked for', async () => {
    const cache = new ModelCache(mkdtempSync(join(tmpdir(), 'medfl-cache-')));
    // A corrupt prefix: the resumed tail is right, the whole is not.
    writeFileSync(join(cache.dir, `${task.modelHash}.part`), Buffer.alloc(100, 0xff));
    await expect(cache.ensure(siteA, task.modelHash, task.modelSize)).rejects.toThrow(/hashes to .* expected/);
    expect(existsSync(join(cache.dir, `${task.modelHash}.part`))).toBe(false);
    expect(await cache.ensure(siteA, task.modelHash, task.modelSize)).toBe(task.modelSize);
  });
});

describe('update uploads', () => {
  it('refuses a payload whose hash does not match the header', async () => {
    const payload = encodeSafetensors(update());
    const call = siteA.openUpload(30_000);
    await call.send({ header: { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(Buffer.from('something else')), numSamples: 4 } });
    await call.sendData(0, payload);
    await call.end();
    const a = await call.ack;
    expect(a.accepted).toBe(false);
    expect(a.reason).toMatch(/hash mismatch/);
    nothingStored();
  });

  it('refuses a tensor of the wrong shape', async () => {
    const a = await send({ payload: encodeSafetensors(update((t) => (t.shape.length === 1 ? { ...t, shape: [t.shape[0] + 1], data: new Float32Array(t.shape[0] + 1) } : t))) });
    expect(a.accepted).toBe(false);
    expect(a.reason).toMatch(/shape/);
    nothingStored();
  });

  it('refuses NaN and Inf', async () => {
    let poisoned = false;
    const a = await send({
      payload: encodeSafetensors(update((t) => {
        if (poisoned) return t;
        poisoned = true;
        const data = Float32Array.from(t.data);
        data[0] = Number.NaN;
        return { ...t, data };
      })),
    });
    expect(a.accepted).toBe(false);
    expect(a.reason).toMatch(/non-finite.*NaN/);
    nothingStored();
  });

  it('refuses tensor names the plan does not share (e.g. a head)', async () => {
    const extra = makeBundle([...update().values(), { name: 'head.out.conv.weight', dtype: 'F32', shape: [2], data: new Float32Array(2) }]);
    const a = await send({ payload: encodeSafetensors(extra) });
    expect(a.accepted).toBe(false);
    expect(a.reason).toMatch(/unknown tensor name.*head\.out/);
    nothingStored();
  });

  it('refuses out-of-order and oversized chunks, and a stream without a header', async () => {
    const payload = encodeSafetensors(update());
    const header = { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4 };
    const a1 = await sendRaw([{ header }, { data: payload.subarray(100), offset: 100 }]);
    expect(a1.reason).toMatch(/out-of-order chunk: offset 100, expected 0/);
    const a2 = await sendRaw([{ header: { ...header, totalSize: 500 * 1024 * 1024 } }]);
    expect(a2.reason).toMatch(/exceeds the .*-byte limit/);
    const a3 = await sendRaw([{ data: payload, offset: 0 }]);
    expect(a3.reason).toMatch(/first chunk must carry the update header/);
    const a4 = await sendRaw([{ header: { ...header, sha256: 'xyz' } }]);
    expect(a4.reason).toMatch(/sha256 must be 64 lowercase hex/);
    for (const a of [a1, a2, a3, a4]) expect(a.accepted).toBe(false);
    nothingStored();
  });

  it('refuses an UpdateTrailer that is wrong, early, doubled, unannounced or missing', async () => {
    const payload = encodeSafetensors(update());
    const half = Math.floor(payload.length / 2);
    const header = { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: '', numSamples: 4 };
    const data = [{ data: payload.subarray(0, half), offset: 0 }, { data: payload.subarray(half), offset: half }];
    const trailer = { trailer: { sha256: sha256Hex(payload) } };
    const wrong = await sendRaw([{ header }, ...data, { trailer: { sha256: sha256Hex(Buffer.from('something else')) } }]);
    expect(wrong.reason).toMatch(/hash mismatch: .*trailer says/);
    const missing = await sendRaw([{ header }, ...data]);
    expect(missing.reason).toMatch(/ended without the UpdateTrailer/);
    const early = await sendRaw([{ header }, data[0], trailer, data[1]]);
    expect(early.reason).toMatch(new RegExp(`UpdateTrailer after ${half} of ${payload.length} bytes`));
    const doubled = await sendRaw([{ header }, ...data, trailer, trailer]);
    expect(doubled.reason).toMatch(/only one UpdateTrailer/);
    const dataAfter = await sendRaw([{ header }, ...data, trailer, { data: payload.subarray(0, 10), offset: payload.length }]);
    expect(dataAfter.reason).toMatch(/data chunk after the UpdateTrailer/);
    const unannounced = await sendRaw([{ header: { ...header, sha256: sha256Hex(payload) } }, ...data, trailer]);
    expect(unannounced.reason).toMatch(/header already carries sha256/);
    const malformed = await sendRaw([{ header }, ...data, { trailer: { sha256: 'XYZ' } }]);
    expect(malformed.reason).toMatch(/bad UpdateTrailer: sha256 must be 64 lowercase hex/);
    for (const a of [wrong, missing, early, doubled, dataAfter, unannounced, malformed]) expect(a.accepted).toBe(false);
    nothingStored();
  });

  it('drops an upload from which nothing arrives any more (a silent site), and keeps nothing of it', async () => {
    const saved = uploadOptions.stallMs;
    uploadOptions.stallMs = 300;
    try {
      const payload = encodeSafetensors(update());
      const call = siteA.openUpload(30_000);
      await call.send({ header: { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4 } });
      await call.sendData(0, payload.subarray(0, 1000));
      // ...and then nothing: no more data, no end.
      await expect(call.ack).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/nothing arrived for 0.3 s, so the coordinator dropped this upload; send it again/) });
      nothingStored();
    } finally {
      uploadOptions.stallMs = saved;
    }
  });

  it('does not drop a slow upload that keeps sending', async () => {
    const saved = uploadOptions.stallMs;
    uploadOptions.stallMs = 1_000;
    try {
      const payload = encodeSafetensors(update());
      const call = siteA.openUpload(30_000);
      // A wrong hash, so the upload ends in a refusal with its own reason and round 1 stays open for later tests.
      await call.send({ header: { updateId: `test-${randomUUID()}`, round: task.round, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: payload.length, sha256: sha256Hex(Buffer.from('x')), numSamples: 4 } });
      // Six gaps of 300 ms: the upload lasts longer than the stall limit, but no gap comes near it.
      const step = Math.ceil(payload.length / 6);
      const t0 = Date.now();
      for (let off = 0; off < payload.length; off += step) {
        await new Promise((r) => setTimeout(r, 300));
        await call.sendData(off, payload.subarray(off, Math.min(off + step, payload.length)));
      }
      await call.end();
      expect((await call.ack).reason).toMatch(/hash mismatch/);
      expect(Date.now() - t0).toBeGreaterThan(uploadOptions.stallMs);
      nothingStored();
    } finally {
      uploadOptions.stallMs = saved;
    }
  });

  it('refuses updates for another round or trained from another model', async () => {
    const payload = encodeSafetensors(update());
    expect((await send({ payload, round: task.round + 1 })).reason).toMatch(/not the open round/);
    expect((await send({ payload, base: 'f'.repeat(64) })).reason).toMatch(/trained from model/);
    nothingStored();
  });

  it('an upload on a closed channel fails as an error, not as an unhandled rejection that kills the agent', async () => {
    const c = new FederationClient(new SiteHome(join(work, 'site-b')));
    c.close();
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => unhandled.push(e);
    process.on('unhandledRejection', onUnhandled);
    try {
      await expect(uploadOnce(c, { updateId: `test-${randomUUID()}`, taskId: 't', round: 1, baseModelHash: task.modelHash, numSamples: 1, payload: Buffer.alloc(10) })).rejects.toThrow(/shut down/);
      await new Promise((r) => setTimeout(r, 50));
      expect(unhandled).toEqual([]);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
  });

  it('accepts a good update once, and a retry under the same id is a duplicate that changes nothing', async () => {
    const payload = encodeSafetensors(update());
    const updateId = `test-${randomUUID()}`;
    const first = await send({ payload, updateId });
    expect(first).toMatchObject({ accepted: true, duplicate: false });
    const again = await send({ payload, updateId });
    expect(again).toMatchObject({ accepted: true, duplicate: true });
    expect(coord.store.updatesForRound(1)).toHaveLength(1);
    const other = await send({ payload });
    expect(other.accepted).toBe(false);
    expect(other.reason).toMatch(/already reported|no round is open/);
    // The single selected site reported, so round 1 closed: the global model moved on.
    await waitFor(() => coord.store.getRound(1)?.state === 'closed', 10_000, 'round 1 to close');
    expect(coord.store.getMeta('current_model')).not.toBe(task.modelHash);
  });
});
