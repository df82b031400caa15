/**
 * Coordinator PKI: certificates the real TLS stacks (node:tls, grpc-js) accept, CA pinning by fingerprint on
 * first contact, and optional mTLS. Servers bind 127.0.0.1 port 0.
 */
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHANNEL_OPTIONS, SERVER_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import {
  certificateFingerprint,
  createCertificateAuthority,
  fetchAndPinCa,
  issueClientCertificate,
  issueServerCertificate,
  normalizeFingerprint,
  pinnedChannelCredentials,
  serverCredentials,
  type CertificateAuthority,
  type IssuedCertificate,
  type ServerCertificate,
} from '../../shared/security/pki.ts';

/* eslint-disable @typescript-eslint/no-explicit-any */
type HeartbeatClient = grpc.Client & {
  heartbeat(req: object, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: any) => void): void;
};

let ca: CertificateAuthority;
let otherCa: CertificateAuthority;
let serverCert: ServerCertificate;
let clientCert: IssuedCertificate;
let strangerClientCert: IssuedCertificate;
const servers: grpc.Server[] = [];
const cleanups: Array<() => void> = [];

/** gRPC server with a Heartbeat that also reports the client certificate's CN (empty without mTLS). */
async function startGrpc(creds: grpc.ServerCredentials): Promise<number> {
  const server = new grpc.Server(SERVER_OPTIONS);
  server.addService(loadProto().Federation.service, {
    heartbeat: (_call: grpc.ServerUnaryCall<any, any>, cb: grpc.sendUnaryData<any>) => cb(null, { serverTimeMs: Date.now() }),
  });
  servers.push(server);
  return new Promise((res, rej) => server.bindAsync('127.0.0.1:0', creds, (e, p) => (e ? rej(e) : res(p))));
}

function heartbeat(port: number, creds: grpc.ChannelCredentials): Promise<grpc.ServiceError | null> {
  const client = new (loadProto().Federation)(`127.0.0.1:${port}`, creds, CHANNEL_OPTIONS) as unknown as HeartbeatClient;
  return new Promise((resolve) =>
    client.heartbeat({}, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err) => {
      client.close();
      resolve(err);
    }),
  );
}

/** Plain TLS server presenting `chainPem`, for pinning tests that need odd certificates. */
async function startTls(cert: { keyPem: string; chainPem: string }): Promise<number> {
  const srv = tls.createServer({ key: cert.keyPem, cert: cert.chainPem, ALPNProtocols: ['h2'] }, (s) => s.end());
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  cleanups.push(() => srv.close());
  return (srv.address() as net.AddressInfo).port;
}

beforeAll(async () => {
  ca = await createCertificateAuthority({ commonName: 'MedFL test CA', validDays: 1 });
  otherCa = await createCertificateAuthority({ commonName: 'Somebody else', validDays: 1 });
  serverCert = await issueServerCertificate(ca, { validDays: 1 });
  clientCert = await issueClientCertificate(ca, { siteName: 'site-alpha', validDays: 1 });
  strangerClientCert = await issueClientCertificate(otherCa, { siteName: 'site-alpha', validDays: 1 });
});

afterAll(() => {
  for (const s of servers) s.forceShutdown();
  for (const c of cleanups) c();
});

describe('certificates', () => {
  it('CA, server and client certificates have the expected shape; keys are PKCS#8', () => {
    const caX = new X509Certificate(ca.certPem);
    expect(caX.ca).toBe(true);
    expect(caX.subject).toBe('CN=MedFL test CA');
    const srvX = new X509Certificate(serverCert.certPem);
    expect(srvX.ca).toBe(false);
    expect(srvX.checkIssued(caX)).toBe(true);
    expect(srvX.verify(caX.publicKey)).toBe(true);
    expect(srvX.checkHost('localhost')).toBe('localhost');
    expect(srvX.checkIP('127.0.0.1')).toBe('127.0.0.1');
    expect(srvX.checkIP('::1')).toBe('::1');
    expect(serverCert.chainPem).toBe(serverCert.certPem + ca.certPem);
    const cliX = new X509Certificate(clientCert.certPem);
    expect(cliX.subject).toBe('CN=site-alpha');
    expect(cliX.verify(caX.publicKey)).toBe(true);
    for (const pem of [ca.keyPem, serverCert.keyPem, clientCert.keyPem]) {
      expect(pem).toMatch(/^-----BEGIN PRIVATE KEY-----\n/);
      expect(createPrivateKey(pem).asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
    }
  });

  it('a common name cannot inject extra name attributes', async () => {
    const evil = await createCertificateAuthority({ commonName: 'x, O=Evil', validDays: 1 });
    // One CN attribute whose value contains the comma (escaped), not CN=x plus O=Evil.
    expect(new X509Certificate(evil.certPem).subject).toBe('CN=x\\, O=Evil');
  });

  it('fingerprints look like openssl -fingerprint -sha256 and normalise any spelling', () => {
    const fp = certificateFingerprint(ca.certPem);
    expect(fp).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    expect(fp).toBe(new X509Certificate(ca.certPem).fingerprint256);
    expect(normalizeFingerprint(fp.replace(/:/g, '').toLowerCase())).toBe(fp);
    expect(normalizeFingerprint(`sha256 Fingerprint=${fp}`)).toBe(fp);
    expect(() => normalizeFingerprint('AB:CD')).toThrow(/not a SHA-256 certificate fingerprint/);
  });
});

describe('TLS with the pinned CA', () => {
  let port: number;
  beforeAll(async () => {
    port = await startGrpc(serverCredentials(serverCert));
  });

  it('a client trusting the CA connects', async () => {
    expect(await heartbeat(port, pinnedChannelCredentials(ca.certPem))).toBeNull();
  });

  it('a client trusting a different CA fails', async () => {
    const err = await heartbeat(port, pinnedChannelCredentials(otherCa.certPem));
    expect(err?.code).toBe(grpc.status.UNAVAILABLE);
    expect(err?.details).toMatch(/certificate|self[- ]signed|verify/i);
  });

  it('fetchAndPinCa returns the CA for the right fingerprint, however it is spelled', async () => {
    const fp = certificateFingerprint(ca.certPem);
    const pem = await fetchAndPinCa('127.0.0.1', port, fp.replace(/:/g, '').toLowerCase());
    expect(certificateFingerprint(pem)).toBe(fp);
    // The fetched PEM is directly usable as the trust root.
    expect(await heartbeat(port, pinnedChannelCredentials(pem))).toBeNull();
  });

  it('fetchAndPinCa refuses a wrong fingerprint with the mismatch message', async () => {
    const given = certificateFingerprint(otherCa.certPem);
    const presented = certificateFingerprint(ca.certPem);
    await expect(fetchAndPinCa('127.0.0.1', port, given)).rejects.toThrow(
      `CA fingerprint mismatch: the coordinator at 127.0.0.1:${port} presents CA ${presented}, you were given ${given}. ` +
        'Check the fingerprint printed by `medfl coordinator site add`, or you may be talking to the wrong server.',
    );
  });

  it('fetchAndPinCa refuses a server certificate not valid for the host dialled', async () => {
    const elsewhere = await issueServerCertificate(ca, { hosts: ['coordinator.example.org'], validDays: 1 });
    const p = await startTls(elsewhere);
    await expect(fetchAndPinCa('127.0.0.1', p, certificateFingerprint(ca.certPem))).rejects.toThrow(
      /not valid for '127\.0\.0\.1'.*coordinator\.example\.org/,
    );
  });

  it('fetchAndPinCa refuses a chain that merely carries the pinned CA next to a leaf it did not sign', async () => {
    // A man in the middle replaying the (public) CA certificate after its own leaf. Node links the chain by
    // issuer, so the unrelated CA is not part of it and pinning fails; verifyLeaf's signature check is the backstop.
    const forged = await issueServerCertificate(otherCa, { validDays: 1 });
    const p = await startTls({ keyPem: forged.keyPem, chainPem: forged.certPem + ca.certPem });
    await expect(fetchAndPinCa('127.0.0.1', p, certificateFingerprint(ca.certPem))).rejects.toThrow(/CA fingerprint mismatch/);
  });

  it('fetchAndPinCa times out and reports refused connections clearly', async () => {
    const silent = net.createServer(() => { /* accept, never speak TLS */ });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const held: net.Socket[] = [];
    silent.on('connection', (s) => held.push(s));
    const silentPort = (silent.address() as net.AddressInfo).port;
    try {
      await expect(fetchAndPinCa('127.0.0.1', silentPort, certificateFingerprint(ca.certPem), { timeoutMs: 300 })).rejects.toThrow(
        /timed out after 300 ms .* 127\.0\.0\.1:\d+/,
      );
    } finally {
      for (const s of held) s.destroy();
      silent.close();
    }
    // The silent server's port is closed now: nothing listens there.
    await expect(fetchAndPinCa('127.0.0.1', silentPort, certificateFingerprint(ca.certPem))).rejects.toThrow(/ECONNREFUSED/);
  });
});

describe('optional mTLS', () => {
  let port: number;
  beforeAll(async () => {
    port = await startGrpc(serverCredentials(serverCert, { clientCaPem: ca.certPem, requireClientCert: true }));
  });

  it('works when the client presents a certificate from the CA', async () => {
    expect(await heartbeat(port, pinnedChannelCredentials(ca.certPem, clientCert))).toBeNull();
  });

  it('fails without a client certificate', async () => {
    const err = await heartbeat(port, pinnedChannelCredentials(ca.certPem));
    expect(err?.code).toBe(grpc.status.UNAVAILABLE);
  });

  it('fails with a client certificate from another CA', async () => {
    const err = await heartbeat(port, pinnedChannelCredentials(ca.certPem, strangerClientCert));
    expect(err?.code).toBe(grpc.status.UNAVAILABLE);
  });

  it('fetchAndPinCa still works against an mTLS server (first look needs no client certificate)', async () => {
    const pem = await fetchAndPinCa('127.0.0.1', port, certificateFingerprint(ca.certPem));
    expect(certificateFingerprint(pem)).toBe(certificateFingerprint(ca.certPem));
  });
});
