/**
 * The auth interceptor against a real grpc-js server over TLS on 127.0.0.1. The Federation handlers here are a
 * harness only (the real coordinator lives elsewhere): they record which site they saw, so each rejection case
 * can also assert that no handler ran.
 */
import * as grpc from '@grpc/grpc-js';
import { SignJWT, base64url } from 'jose';
import { randomUUID } from 'node:crypto';
import { chmodSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AUTH_METADATA_KEY,
  AUTHENTICATED_SITE_KEY,
  CHANNEL_OPTIONS,
  SERVER_OPTIONS,
  loadProto,
} from '../../shared/protocol/grpc.ts';
import {
  createCertificateAuthority,
  issueServerCertificate,
  pinnedChannelCredentials,
  serverCredentials,
  type CertificateAuthority,
} from '../../shared/security/pki.ts';
import {
  generateCoordinatorKey,
  generateSiteKeyPair,
  loadSiteKey,
  saveSiteKey,
  signManifest,
  signSiteToken,
  siteCallCredentials,
  toPrivateKey,
  verifyManifest,
  type Ed25519KeyPair,
} from '../../shared/security/site-identity.ts';
import { createAuthInterceptor } from '../../coordinator/auth/interceptor.ts';
import { MemorySiteDirectory } from '../helpers/memory-site-directory.ts';

const FED = 'fed-test-1';

/* eslint-disable @typescript-eslint/no-explicit-any */
interface FedClient extends grpc.Client {
  heartbeat(req: object, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: any) => void): grpc.ClientUnaryCall;
  subscribeTasks(req: object, md: grpc.Metadata, opts?: grpc.CallOptions): grpc.ClientReadableStream<any>;
  uploadUpdate(md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: any) => void): grpc.ClientWritableStream<any>;
}

/** What handlers saw: method + authenticated site. Rejected calls must add nothing here. */
const seen: Array<{ method: string; site: string }> = [];
const siteOf = (md: grpc.Metadata): string => {
  const v = md.get(AUTHENTICATED_SITE_KEY);
  return v.length === 1 ? String(v[0]) : `<${v.length} values>`;
};

const handlers: grpc.UntypedServiceImplementation = {
  heartbeat: (call: grpc.ServerUnaryCall<any, any>, cb: grpc.sendUnaryData<any>) => {
    seen.push({ method: 'heartbeat', site: siteOf(call.metadata) });
    cb(null, { serverTimeMs: Date.now() });
  },
  subscribeTasks: (call: grpc.ServerWritableStream<any, any>) => {
    const site = siteOf(call.metadata);
    seen.push({ method: 'subscribeTasks', site });
    call.write({ taskId: `task-for-${site}`, kind: 'TRAIN', round: 1 });
    call.end();
  },
  downloadModel: (call: grpc.ServerWritableStream<any, any>) => call.end(),
  uploadUpdate: (call: grpc.ServerReadableStream<any, any>, cb: grpc.sendUnaryData<any>) => {
    const site = siteOf(call.metadata);
    seen.push({ method: 'uploadUpdate', site });
    let updateId = '';
    let bytes = 0;
    call.on('data', (chunk: any) => {
      if (chunk.header) updateId = chunk.header.updateId;
      if (chunk.data) bytes += chunk.data.length;
    });
    call.on('end', () => cb(null, { updateId, accepted: true, reason: `bytes=${bytes} site=${site}` }));
  },
  reportMetrics: (_call: grpc.ServerUnaryCall<any, any>, cb: grpc.sendUnaryData<any>) => cb(null, { accepted: true }),
};

let ca: CertificateAuthority;
let server: grpc.Server;
let client: FedClient;
let address: string;
const directory = new MemorySiteDirectory();
const keys: Record<string, Ed25519KeyPair> = {};

beforeAll(async () => {
  ca = await createCertificateAuthority({ commonName: 'MedFL test CA', validDays: 1 });
  const cert = await issueServerCertificate(ca, { validDays: 1 });
  for (const s of ['alpha', 'beta', 'gamma']) {
    keys[s] = generateSiteKeyPair();
    directory.addSite(s, keys[s]!.publicKeyRaw);
  }
  keys.zeta = generateSiteKeyPair(); // never enrolled
  server = new grpc.Server({ ...SERVER_OPTIONS, interceptors: [createAuthInterceptor({ federationId: FED, directory })] });
  server.addService(loadProto().Federation.service, handlers);
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync('127.0.0.1:0', serverCredentials(cert), (e, p) => (e ? rej(e) : res(p))),
  );
  address = `127.0.0.1:${port}`;
  client = new (loadProto().Federation)(address, pinnedChannelCredentials(ca.certPem), CHANNEL_OPTIONS) as unknown as FedClient;
});

afterAll(() => {
  client?.close();
  server?.forceShutdown();
});

const deadline = (): grpc.CallOptions => ({ deadline: Date.now() + 5000 });

function bearer(token: string | undefined, extra: Record<string, string> = {}): grpc.Metadata {
  const md = new grpc.Metadata();
  if (token !== undefined) md.set(AUTH_METADATA_KEY, `Bearer ${token}`);
  for (const [k, v] of Object.entries(extra)) md.set(k, v);
  return md;
}

const token = (site: string, over: { ttl?: number } = {}) =>
  signSiteToken({ siteName: site, federationId: FED, privateKey: keys[site]!.privateKeyPem, ttlSeconds: over.ttl });

/** Hand-built token, for claims signSiteToken refuses to produce. */
async function customToken(opts: {
  signer: string;
  iss?: string;
  sub?: string;
  aud?: string;
  iat?: number;
  exp?: number;
  jti?: string;
}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  const iss = opts.iss ?? opts.signer;
  const iat = opts.iat ?? now;
  return new SignJWT({})
    .setProtectedHeader({ alg: 'EdDSA' })
    .setIssuer(iss)
    .setSubject(opts.sub ?? iss)
    .setAudience(opts.aud ?? FED)
    .setIssuedAt(iat)
    .setExpirationTime(opts.exp ?? iat + 60)
    .setJti(opts.jti ?? randomUUID())
    .sign(toPrivateKey(keys[opts.signer]!.privateKeyPem));
}

function heartbeat(md: grpc.Metadata): Promise<{ err: grpc.ServiceError | null; res?: any }> {
  return new Promise((resolve) => client.heartbeat({ state: 'idle' }, md, deadline(), (err, res) => resolve({ err, res })));
}

function subscribe(md: grpc.Metadata): Promise<{ err: grpc.ServiceError | null; tasks: any[] }> {
  return new Promise((resolve) => {
    const tasks: any[] = [];
    const s = client.subscribeTasks({ cachedModels: [] }, md, deadline());
    s.on('data', (t) => tasks.push(t));
    s.on('error', (err: grpc.ServiceError) => resolve({ err, tasks }));
    s.on('end', () => resolve({ err: null, tasks }));
  });
}

function upload(md: grpc.Metadata, chunks: Buffer[]): Promise<{ err: grpc.ServiceError | null; res?: any }> {
  return new Promise((resolve) => {
    const w = client.uploadUpdate(md, deadline(), (err, res) => resolve({ err, res }));
    w.on('error', () => { /* reported through the callback */ });
    w.write({ header: { updateId: 'u1', round: 1, totalSize: chunks.reduce((n, c) => n + c.length, 0) } });
    let off = 0;
    for (const c of chunks) {
      w.write({ data: c, offset: off });
      off += c.length;
    }
    w.end();
  });
}

async function expectRejected(md: grpc.Metadata, code: grpc.status, message: RegExp): Promise<void> {
  const before = seen.length;
  const { err } = await heartbeat(md);
  expect(err, 'call should have failed').toBeTruthy();
  expect(grpc.status[err!.code]).toBe(grpc.status[code]);
  expect(err!.details).toMatch(message);
  expect(seen.length, 'handler must not run for a rejected call').toBe(before);
}

describe('auth interceptor: accepted calls', () => {
  it('unary call with a valid token reaches the handler as that site, even with a forged identity header', async () => {
    const { err, res } = await heartbeat(bearer(await token('alpha'), { [AUTHENTICATED_SITE_KEY]: 'beta' }));
    expect(err).toBeNull();
    expect(Math.abs(res.serverTimeMs - Date.now())).toBeLessThan(5000);
    expect(seen.at(-1)).toEqual({ method: 'heartbeat', site: 'alpha' });
  });

  it('server-streaming call works and sees the verified site', async () => {
    const { err, tasks } = await subscribe(bearer(await token('beta'), { [AUTHENTICATED_SITE_KEY]: 'alpha' }));
    expect(err).toBeNull();
    expect(tasks.map((t) => t.taskId)).toEqual(['task-for-beta']);
    expect(seen.at(-1)).toEqual({ method: 'subscribeTasks', site: 'beta' });
  });

  it('client-streaming call: messages sent before verification finishes are all delivered', async () => {
    const chunks = [Buffer.alloc(1000, 1), Buffer.alloc(70_000, 2), Buffer.alloc(5, 3)];
    const { err, res } = await upload(bearer(await token('alpha'), { [AUTHENTICATED_SITE_KEY]: 'gamma' }), chunks);
    expect(err).toBeNull();
    expect(res).toMatchObject({ updateId: 'u1', accepted: true, reason: 'bytes=71005 site=alpha' });
    expect(seen.at(-1)).toEqual({ method: 'uploadUpdate', site: 'alpha' });
  });

  it('siteCallCredentials signs a fresh token per call (no replay across calls)', async () => {
    const creds = grpc.credentials.combineChannelCredentials(
      pinnedChannelCredentials(ca.certPem),
      siteCallCredentials({ siteName: 'gamma', federationId: FED, privateKey: keys.gamma!.privateKeyPem }),
    );
    const c = new (loadProto().Federation)(address, creds, CHANNEL_OPTIONS) as unknown as FedClient;
    try {
      for (let i = 0; i < 3; i++) {
        const err = await new Promise<grpc.ServiceError | null>((r) => c.heartbeat({}, new grpc.Metadata(), deadline(), (e) => r(e)));
        expect(err).toBeNull();
        expect(seen.at(-1)).toEqual({ method: 'heartbeat', site: 'gamma' });
      }
    } finally {
      c.close();
    }
  });
});

describe('auth interceptor: rejected calls', () => {
  const U = grpc.status.UNAUTHENTICATED;

  it('no token', () => expectRejected(bearer(undefined), U, /missing 'authorization: Bearer <token>'/));

  it('not a bearer header', async () => {
    const md = new grpc.Metadata();
    md.set(AUTH_METADATA_KEY, 'Basic dXNlcjpwYXNz');
    await expectRejected(md, U, /not of the form 'Bearer <token>'/);
  });

  it('garbage token', () => expectRejected(bearer('not-a-jwt'), U, /malformed token/));

  it('expired token names the expiry time and the clock', async () => {
    const now = Math.floor(Date.now() / 1000);
    const t = await customToken({ signer: 'alpha', iat: now - 400, exp: now - 120 });
    await expectRejected(bearer(t), U, /token expired at \d{4}-\d\d-\d\dT.*check the site clock/);
  });

  it('token living longer than 5 minutes', async () => {
    const now = Math.floor(Date.now() / 1000);
    const t = await customToken({ signer: 'alpha', iat: now, exp: now + 600 });
    await expectRejected(bearer(t), U, /lifetime 600 s exceeds the 300 s maximum/);
  });

  it('signSiteToken refuses to mint such a token', async () => {
    await expect(token('alpha', { ttl: 301 })).rejects.toThrow(/1\.\.300/);
  });

  it('token issued in the future (site clock ahead)', async () => {
    const now = Math.floor(Date.now() / 1000);
    const t = await customToken({ signer: 'alpha', iat: now + 120, exp: now + 180 });
    await expectRejected(bearer(t), U, /issued in the future.*check the site clock/);
  });

  it('wrong audience', async () => {
    const t = await customToken({ signer: 'alpha', aud: 'other-fed' });
    await expectRejected(bearer(t), U, new RegExp(`audience 'other-fed' is not this federation '${FED}'`));
  });

  it("alg 'none' token (hand-crafted, empty signature)", async () => {
    const now = Math.floor(Date.now() / 1000);
    const enc = (o: object) => base64url.encode(JSON.stringify(o));
    const t = `${enc({ alg: 'none', typ: 'JWT' })}.${enc({ iss: 'alpha', sub: 'alpha', aud: FED, iat: now, exp: now + 60, jti: randomUUID() })}.`;
    await expectRejected(bearer(t), U, /alg 'none' is not allowed.*EdDSA/);
  });

  it('HS256 token keyed with the public key (algorithm confusion)', async () => {
    const t = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setIssuer('alpha').setSubject('alpha').setAudience(FED).setIssuedAt().setExpirationTime('1m').setJti(randomUUID())
      .sign(keys.alpha!.publicKeyRaw);
    await expectRejected(bearer(t), U, /alg 'HS256' is not allowed/);
  });

  it("token signed by another enrolled site's key but claiming this site", async () => {
    const t = await customToken({ signer: 'beta', iss: 'alpha' });
    await expectRejected(bearer(t), U, /token not accepted for site 'alpha': no enrolled site of that name holds the key that signed it/);
  });

  it('sub different from iss', async () => {
    const t = await customToken({ signer: 'alpha', sub: 'beta' });
    await expectRejected(bearer(t), U, /'sub' 'beta' differs from 'iss' 'alpha'/);
  });

  it('unknown site', async () => {
    await expectRejected(bearer(await token('zeta')), U, /token not accepted for site 'zeta': no enrolled site of that name holds the key/);
  });

  it('an unknown site and a known site with a wrong key get the same answer, so a caller cannot learn which names are enrolled', async () => {
    // zeta is not enrolled; alpha is, and zeta's key is not alpha's.
    const unknown = (await heartbeat(bearer(await token('zeta')))).err;
    const wrongKey = (await heartbeat(bearer(await customToken({ signer: 'zeta', iss: 'alpha' })))).err;
    expect(unknown?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(wrongKey?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(unknown!.details.replaceAll("'zeta'", 'NAME')).toBe(wrongKey!.details.replaceAll("'alpha'", 'NAME'));
    expect(`${unknown!.details} ${wrongKey!.details}`).not.toMatch(/unknown|does not verify|enrol it with/);
  });

  it('replayed token (same jti twice)', async () => {
    const t = await token('beta');
    expect((await heartbeat(bearer(t))).err).toBeNull();
    await expectRejected(bearer(t), U, /token replayed \(jti seen before\)/);
  });

  it('revoked site gets PERMISSION_DENIED, effective on the next call without a restart', async () => {
    expect((await heartbeat(bearer(await token('gamma')))).err).toBeNull();
    directory.revoke('gamma');
    try {
      await expectRejected(bearer(await token('gamma')), grpc.status.PERMISSION_DENIED, /site 'gamma' is revoked.*re-enrol/);
    } finally {
      directory.reinstate('gamma');
    }
    expect((await heartbeat(bearer(await token('gamma')))).err).toBeNull();
  });

  it('streaming methods are guarded too, and their handlers never run', async () => {
    const before = seen.length;
    const sub = await subscribe(bearer(undefined));
    expect(sub.err?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(sub.err?.details).toMatch(/missing/);
    expect(sub.tasks).toEqual([]);
    const up = await upload(bearer(await customToken({ signer: 'alpha', aud: 'nope' })), [Buffer.alloc(10)]);
    expect(up.err?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(up.err?.details).toMatch(/audience 'nope'/);
    expect(seen.length).toBe(before);
  });
});

describe('MemorySiteDirectory', () => {
  it('prunes token ids once their token has expired (plus tolerance)', () => {
    let now = 1_000_000;
    const d = new MemorySiteDirectory(() => now);
    expect(d.consumeJti('a/1', now + 60)).toBe(true);
    expect(d.consumeJti('a/1', now + 60)).toBe(false);
    expect(d.consumeJti('a/2', now + 300)).toBe(true);
    now += 60 + 31;
    d.prune();
    expect(d.jtiCount).toBe(1);
    now += 300;
    expect(d.consumeJti('a/3', now + 60)).toBe(true);
    expect(d.jtiCount).toBe(1);
  });
});

describe('site identity', () => {
  it('saves the private key 0600 and refuses to load a group/world-readable one', () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-key-'));
    try {
      const kp = generateSiteKeyPair();
      expect(kp.publicKeyRaw.length).toBe(32);
      expect(kp.privateKeyPem).toMatch(/^-----BEGIN PRIVATE KEY-----/);
      saveSiteKey(dir, kp);
      if (process.platform !== 'win32') expect(statSync(join(dir, 'site.key')).mode & 0o777).toBe(0o600);
      expect(loadSiteKey(dir).publicKeyRaw.equals(kp.publicKeyRaw)).toBe(true);
      expect(() => saveSiteKey(dir, generateSiteKeyPair())).toThrow(/already exists/);
      if (process.platform !== 'win32') {
        chmodSync(join(dir, 'site.key'), 0o644);
        expect(() => loadSiteKey(dir)).toThrow(/chmod 600/);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('manifest signatures verify with the raw coordinator key and fail when anything changes', () => {
    const coord = generateCoordinatorKey();
    const bytes = Buffer.from('task manifest bytes');
    const sig = signManifest(coord.privateKeyPem, bytes);
    expect(sig.length).toBe(64);
    expect(verifyManifest(coord.publicKeyRaw, bytes, sig)).toBe(true);
    expect(verifyManifest(coord.publicKeyRaw, Buffer.from('task manifest bytez'), sig)).toBe(false);
    expect(verifyManifest(generateCoordinatorKey().publicKeyRaw, bytes, sig)).toBe(false);
    expect(verifyManifest(coord.publicKeyRaw.subarray(0, 31), bytes, sig)).toBe(false);
    expect(verifyManifest(coord.publicKeyRaw, bytes, sig.subarray(0, 10))).toBe(false);
  });
});
