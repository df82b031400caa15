/**
 * Optional mTLS (`medfl coordinator start --mtls`), end to end: a real coordinator in this process (real gRPC over
 * TLS on 127.0.0.1) with requireClientCert. Sites enrol over the same port without a certificate and leave with
 * one (their own ECDSA key, CSR signed by the federation CA, CN = site name); every other call must present it,
 * and it must be the calling site's own. A coordinator without --mtls accepts sites with or without one.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, createHash, createPrivateKey } from 'node:crypto';
import { chmodSync, mkdtempSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite, revokeSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { ensureSiteKey, loadSiteKey, siteCallCredentials } from '../../shared/security/site-identity.ts';
import {
  createCertificateAuthority,
  createClientCertificateRequest,
  fetchAndPinCa,
  issueClientCertificate,
  issueClientCertificateFromCsr,
  pinnedChannelCredentials,
  verifyClientCertificate,
  type IssuedCertificate,
} from '../../shared/security/pki.ts';
import { CHANNEL_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import { TEST_PLAN } from '../helpers/federation.ts';
import { downloadBytes } from '../helpers/download.ts';

type AnyClient = grpc.Client & Record<string, (...a: unknown[]) => unknown>;
interface Outcome { code: number; details: string }

const silent = pino({ level: 'silent' });
let work: string;

async function makeCoordinator(name: string, requireClientCert: boolean): Promise<{ dir: string; coord: RunningCoordinator }> {
  const dir = join(work, name);
  const home = await CoordinatorHome.init(dir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, TEST_PLAN({ rounds: 1, minSites: 1, gather: 0 }));
  const coord = await startCoordinator({ dir, port: 0, host: '127.0.0.1', requireClientCert, log: silent });
  return { dir, coord };
}

async function enrol(coordDir: string, coord: RunningCoordinator, site: string, siteDir = join(work, `${coordDir.split('/').pop()}-${site}`)): Promise<string> {
  const inv = addSite(coordDir, site, { ttlSeconds: 600 });
  await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteDir });
  return siteDir;
}

/** A Federation client with `site`'s token on every call and the given TLS client certificate (or none). */
function clientAs(siteDir: string, port: number, cert: IssuedCertificate | undefined): AnyClient {
  const home = new SiteHome(siteDir);
  const config = home.config();
  const creds = grpc.credentials.combineChannelCredentials(
    pinnedChannelCredentials(home.caPem(), cert),
    siteCallCredentials({ siteName: config.siteName, federationId: config.federationId, privateKey: loadSiteKey(siteDir).privateKey }),
  );
  return new (loadProto().Federation)(`localhost:${port}`, creds, CHANNEL_OPTIONS) as AnyClient;
}

function heartbeat(c: AnyClient): Promise<Outcome> {
  return new Promise((resolve) =>
    c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' }, { deadline: Date.now() + 5000 }, (err: grpc.ServiceError | null) => {
      c.close();
      resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' });
    }),
  );
}

/** Opens SubscribeTasks; resolves with the first task, or the error that ended the stream. */
function firstTask(stream: grpc.ClientReadableStream<WireTask>): Promise<WireTask | grpc.ServiceError> {
  return new Promise((resolve) => {
    stream.on('data', (t: WireTask) => {
      resolve(t);
      stream.cancel();
    });
    stream.on('error', (e: grpc.ServiceError) => resolve(e));
  });
}

function rawEnroll(port: number, caPem: string, req: Record<string, unknown>): Promise<Outcome> {
  const c = new (loadProto().Enrollment)(`localhost:${port}`, pinnedChannelCredentials(caPem), CHANNEL_OPTIONS) as AnyClient;
  return new Promise((resolve) =>
    c.Enroll(req, { deadline: Date.now() + 5000 }, (err: grpc.ServiceError | null) => {
      c.close();
      resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' });
    }),
  );
}

const cert = (siteDir: string): IssuedCertificate => new SiteHome(siteDir).clientCertificate()!;

let m: { dir: string; coord: RunningCoordinator };
let siteA: string;
let siteB: string;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'medfl-mtls-'));
  m = await makeCoordinator('mtls', true);
  siteA = await enrol(m.dir, m.coord, 'site-a');
  siteB = await enrol(m.dir, m.coord, 'site-b');
});

afterAll(async () => {
  await m?.coord.stop();
});

describe('enrolment under --mtls', () => {
  it('needs no client certificate and leaves each site with its own key and a CA-issued certificate (CN = site)', () => {
    const ca = new X509Certificate(new CoordinatorHome(m.dir).caPem());
    for (const [dir, name] of [[siteA, 'site-a'], [siteB, 'site-b']] as const) {
      const home = new SiteHome(dir);
      expect(statSync(home.tlsClientKeyPath).mode & 0o777).toBe(0o600);
      const { certPem, keyPem } = home.clientCertificate()!;
      const x = new X509Certificate(certPem);
      expect(x.subject).toBe(`CN=${name}`);
      expect(x.keyUsage).toEqual(['1.3.6.1.5.5.7.3.2']); // clientAuth only
      expect(x.checkPrivateKey(createPrivateKey(keyPem))).toBe(true);
      expect(createPrivateKey(keyPem).asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
      expect(verifyClientCertificate(x.raw, ca)).toBe(name);
      const days = (Date.parse(x.validTo) - Date.now()) / 86_400_000;
      expect(days).toBeGreaterThan(824);
      expect(days).toBeLessThan(826);
    }
  });

  it('refuses a request without a CSR (FAILED_PRECONDITION) and a tampered CSR (INVALID_ARGUMENT), without using the token', async () => {
    const inv = addSite(m.dir, 'site-c', { ttlSeconds: 600 });
    const dir = join(work, 'mtls-site-c');
    const caPem = await fetchAndPinCa('127.0.0.1', m.coord.port, inv.caFingerprint);
    const publicKey = ensureSiteKey(dir).publicKeyRaw;
    const none = await rawEnroll(m.coord.port, caPem, { siteName: 'site-c', token: inv.token, publicKey });
    expect(none.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(none.details).toMatch(/requires a client certificate \(mTLS\).*token was not used/);

    const { csrPem } = await createClientCertificateRequest('site-c');
    const der = Buffer.from(csrPem.replace(/-----[A-Z ]+-----|\s/g, ''), 'base64');
    der[der.length - 3]! ^= 0x01; // flip a bit of the signature
    const tampered = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`;
    const bad = await rawEnroll(m.coord.port, caPem, { siteName: 'site-c', token: inv.token, publicKey, clientCsrPem: tampered });
    expect(bad.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(bad.details).toMatch(/client_csr_pem:.*(signature|parse)/);

    // The token is still good: a proper enrolment with it succeeds.
    await enrollSite({ coordinator: `localhost:${m.coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'mtls-site-c2') });
    expect(new SiteHome(join(work, 'mtls-site-c2')).clientCertificate()).toBeDefined();
  });

  it('the coordinator sets the subject itself: a CSR asking for another site still gets CN = the enrolling site', async () => {
    const home = new CoordinatorHome(m.dir);
    const { csrPem } = await createClientCertificateRequest('site-b');
    const pem = await issueClientCertificateFromCsr(home.certificateAuthority()!, csrPem, { siteName: 'site-a' });
    expect(new X509Certificate(pem).subject).toBe('CN=site-a');
  });
});

describe('calls under --mtls', () => {
  it('a site presenting its own certificate can heartbeat and subscribe', async () => {
    const client = new FederationClient(new SiteHome(siteA));
    try {
      await expect(client.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' })).resolves.toMatchObject({ serverTimeMs: expect.any(Number) });
      const t = await firstTask(client.subscribeTasks([]));
      expect(t).toMatchObject({ kind: 'TRAIN', round: 1 });
    } finally {
      client.close();
    }
  });

  it('a valid token without a client certificate is refused, naming the cause and the fix', async () => {
    const r = await heartbeat(clientAs(siteA, m.coord.port, undefined));
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/requires a client certificate \(mTLS\).*re-enrol the site or check tls-client\.pem/);
    const c = clientAs(siteA, m.coord.port, undefined);
    const e = await firstTask(c.SubscribeTasks({ cachedModels: [] }) as grpc.ClientReadableStream<WireTask>);
    c.close();
    expect(e).toMatchObject({ code: grpc.status.UNAUTHENTICATED, details: expect.stringMatching(/client certificate/) });
  });

  it("site-a's token with site-b's certificate is refused", async () => {
    const r = await heartbeat(clientAs(siteA, m.coord.port, cert(siteB)));
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r.details).toMatch(/certificate names site 'site-b' but the token is for site 'site-a'/);
  });

  it('a certificate for the right site name from another CA is refused', async () => {
    const otherCa = await createCertificateAuthority({ commonName: 'Somebody else', validDays: 1 });
    const forged = await issueClientCertificate(otherCa, { siteName: 'site-a', validDays: 1 });
    const r = await heartbeat(clientAs(siteA, m.coord.port, forged));
    expect(r.code).not.toBe(grpc.status.OK);
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED); // TLS lets it through (request, not require); the interceptor refuses
    expect(r.details).toMatch(/client certificate/);
  });

  it("the coordinator's own server certificate (same CA, serverAuth) does not pass as a client certificate", async () => {
    const server = new CoordinatorHome(m.dir).serverCertificate();
    const r = await heartbeat(clientAs(siteA, m.coord.port, { certPem: server.certPem, keyPem: server.keyPem }));
    expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
  });

  it('model downloads make the same certificate checks, and the site downloads presenting its certificate', async () => {
    // A download from the model's end: OK once authenticated, with no chunks.
    const download = (c: AnyClient, hash: string, offset: number): Promise<Outcome> =>
      new Promise((resolve) => {
        const s = c.DownloadModel({ modelHash: hash, offset }, { deadline: Date.now() + 5000 }) as grpc.ClientReadableStream<unknown>;
        s.on('data', () => undefined);
        s.on('error', (e: grpc.ServiceError) => resolve({ code: e.code, details: e.details }));
        s.on('end', () => resolve({ code: grpc.status.OK, details: '' }));
      });
    const site = new FederationClient(new SiteHome(siteA));
    try {
      const t = (await firstTask(site.subscribeTasks([]))) as WireTask;
      const cases: [IssuedCertificate | undefined, number, RegExp | undefined][] = [
        [cert(siteA), grpc.status.OK, undefined],
        [undefined, grpc.status.UNAUTHENTICATED, /requires a client certificate/],
        [cert(siteB), grpc.status.UNAUTHENTICATED, /certificate names site 'site-b' but the token is for site 'site-a'/],
      ];
      for (const [c, code, details] of cases) {
        const client = clientAs(siteA, m.coord.port, c);
        const r = await download(client, t.modelHash, t.modelSize);
        client.close();
        expect(r.code).toBe(code);
        if (details) expect(r.details).toMatch(details);
      }
      // The site's own client (its one connection, presenting its certificate) fetches the whole model.
      expect(createHash('sha256').update(await downloadBytes(site, t.modelHash)).digest('hex')).toBe(t.modelHash);
    } finally {
      site.close();
    }
  });

  it('a revoked site is refused by its token, whatever certificate it holds (no CRL needed)', async () => {
    const dir = await enrol(m.dir, m.coord, 'site-r');
    expect((await heartbeat(clientAs(dir, m.coord.port, cert(dir)))).code).toBe(grpc.status.OK);
    revokeSite(m.dir, 'site-r');
    const r = await heartbeat(clientAs(dir, m.coord.port, cert(dir)));
    expect(r.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(r.details).toMatch(/revoked/);
  });

  it('the site refuses to use a TLS client key others can read', () => {
    const dir = join(work, 'mtls-site-c2');
    chmodSync(new SiteHome(dir).tlsClientKeyPath, 0o644);
    expect(() => new FederationClient(new SiteHome(dir))).toThrow(/TLS client key .*chmod 600/);
    chmodSync(new SiteHome(dir).tlsClientKeyPath, 0o600);
  });
});

describe('verifyClientCertificate (the check the interceptor repeats after TLS)', () => {
  it('names the problem: another CA, server usage, outside the validity period', async () => {
    const home = new CoordinatorHome(m.dir);
    const ca = new X509Certificate(home.caPem());
    const own = new X509Certificate(cert(siteA).certPem);
    expect(verifyClientCertificate(own.raw, ca)).toBe('site-a');
    const otherCa = await createCertificateAuthority({ commonName: 'Somebody else', validDays: 1 });
    const foreign = new X509Certificate((await issueClientCertificate(otherCa, { siteName: 'site-a', validDays: 1 })).certPem);
    expect(() => verifyClientCertificate(foreign.raw, ca)).toThrow(/not issued by this federation's CA/);
    expect(() => verifyClientCertificate(new X509Certificate(home.serverCertificate().certPem).raw, ca)).toThrow(/clientAuth/);
    expect(() => verifyClientCertificate(own.raw, ca, Date.now() + 900 * 86_400_000)).toThrow(/not valid now/);
  });
});

describe('without --mtls', () => {
  let plain: { dir: string; coord: RunningCoordinator };
  beforeAll(async () => {
    plain = await makeCoordinator('plain', false);
  });
  afterAll(async () => {
    await plain?.coord.stop();
  });

  it('a site still gets a certificate at enrolment, and works presenting it or not', async () => {
    const dir = await enrol(plain.dir, plain.coord, 'site-a');
    expect(new X509Certificate(cert(dir).certPem).subject).toBe('CN=site-a');
    const client = new FederationClient(new SiteHome(dir));
    try {
      await expect(client.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' })).resolves.toMatchObject({ serverTimeMs: expect.any(Number) });
    } finally {
      client.close();
    }
    expect((await heartbeat(clientAs(dir, plain.coord.port, undefined))).code).toBe(grpc.status.OK);
  });
});
