/**
 * Coordinator PKI: a private CA (ECDSA P-256) that issues the coordinator's TLS server certificate and, for
 * optional mTLS, site client certificates (for a key the site made itself: it sends a PKCS#10 request at enrolment,
 * see createClientCertificateRequest / issueClientCertificateFromCsr). Sites trust the coordinator by pinning the CA's SHA-256 fingerprint
 * (printed by `medfl coordinator site add`): fetchAndPinCa takes the CA from the TLS handshake and keeps it only
 * if its fingerprint matches, so no CA file has to be copied to the hospital.
 *
 * All private keys are PKCS#8 PEM, which Node's tls and grpc.ServerCredentials.createSsl accept.
 */
import type * as X509 from '@peculiar/x509';
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, createHash, webcrypto } from 'node:crypto';
import { isIP } from 'node:net';
import * as tls from 'node:tls';

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

/**
 * @peculiar/x509 (through tsyringe) needs the Reflect metadata API at import time; reflect-metadata provides it.
 * The library is loaded lazily: only the async certificate generators need it (fingerprints and pinning use node:crypto).
 */
let x509Lib: Promise<typeof X509> | undefined;
function loadX509(): Promise<typeof X509> {
  x509Lib ??= import('reflect-metadata').then(() => import('@peculiar/x509')).then((mod) => {
    // Named exports of the CJS build, or its default export, depending on the loader.
    const lib = ('X509CertificateGenerator' in mod ? mod : (mod as unknown as { default: typeof X509 }).default) as typeof X509;
    lib.cryptoProvider.set(globalThis.crypto); // Node 20's built-in WebCrypto
    return lib;
  });
  return x509Lib;
}

const EC_ALG: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };
const SIGNING_ALG: webcrypto.EcdsaParams = { name: 'ECDSA', hash: 'SHA-256' };
/** Backdate notBefore so a site whose clock is a little behind still accepts a fresh certificate. */
const BACKDATE_MS = 5 * 60_000;
export const DEFAULT_SERVER_HOSTS = ['localhost', '127.0.0.1', '::1'];

export interface CertificateAuthority {
  certPem: string;
  /** PKCS#8 PEM; keep it on the coordinator only (mode 0600). */
  keyPem: string;
}

export interface IssuedCertificate {
  certPem: string;
  keyPem: string;
}

export interface ServerCertificate extends IssuedCertificate {
  /** Server certificate followed by the CA certificate: what the TLS server presents. */
  chainPem: string;
}

function toPem(der: ArrayBuffer, label: string): string {
  const b64 = Buffer.from(der).toString('base64').match(/.{1,64}/g)!.join('\n');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

function randomSerial(): string {
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[0] = b[0]! & 0x7f; // positive INTEGER
  if (b[0] === 0) b[0] = 1; // no leading zero byte (DER minimal encoding)
  return Buffer.from(b).toString('hex');
}

function validity(validDays: number): { notBefore: Date; notAfter: Date } {
  if (!(validDays > 0)) throw new Error(`validDays must be positive, got ${validDays}`);
  const now = Date.now();
  return { notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + validDays * 86_400_000) };
}

/** JSON form, so a name with commas or '=' cannot inject extra RDNs. */
const cn = (commonName: string): X509.JsonName => [{ CN: [commonName] }];

async function newKeyPair(): Promise<CryptoKeyPair> {
  return (await globalThis.crypto.subtle.generateKey(EC_ALG, true, ['sign', 'verify'])) as CryptoKeyPair;
}

async function exportKeyPem(key: CryptoKey): Promise<string> {
  return toPem(await globalThis.crypto.subtle.exportKey('pkcs8', key), 'PRIVATE KEY');
}

async function importCa(x509: typeof X509, ca: CertificateAuthority): Promise<{ cert: X509.X509Certificate; key: CryptoKey }> {
  const cert = new x509.X509Certificate(ca.certPem);
  const key = await globalThis.crypto.subtle.importKey(
    'pkcs8',
    x509.PemConverter.decodeFirst(ca.keyPem),
    EC_ALG,
    false,
    ['sign'],
  );
  return { cert, key };
}

export async function createCertificateAuthority(opts: { commonName: string; validDays: number }): Promise<CertificateAuthority> {
  const x509 = await loadX509();
  const keys = await newKeyPair();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: cn(opts.commonName),
    ...validity(opts.validDays),
    signingAlgorithm: SIGNING_ALG,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true), // pathLength 0: issues leaf certificates only
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: toPem(cert.rawData, 'CERTIFICATE'), keyPem: await exportKeyPem(keys.privateKey) };
}

/** Signs a leaf certificate for `publicKey` with the CA key; returns the certificate PEM. */
async function signLeaf(
  ca: CertificateAuthority,
  publicKey: CryptoKey,
  commonName: string,
  validDays: number,
  usage: 'serverAuth' | 'clientAuth',
  extra: (x509: typeof X509) => X509.Extension[],
): Promise<string> {
  const x509 = await loadX509();
  const { cert: caCert, key: caKey } = await importCa(x509, ca);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: cn(commonName),
    issuer: caCert.subject,
    ...validity(validDays),
    signingAlgorithm: SIGNING_ALG,
    publicKey,
    signingKey: caKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage[usage]]),
      await x509.SubjectKeyIdentifierExtension.create(publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(caCert.publicKey),
      ...extra(x509),
    ],
  });
  return toPem(cert.rawData, 'CERTIFICATE');
}

/** A fresh key pair and a leaf certificate for it (key generated here, e.g. by the coordinator for itself). */
async function issueLeaf(
  ca: CertificateAuthority,
  commonName: string,
  validDays: number,
  usage: 'serverAuth' | 'clientAuth',
  extra: (x509: typeof X509) => X509.Extension[],
): Promise<IssuedCertificate> {
  const keys = await newKeyPair();
  const certPem = await signLeaf(ca, keys.publicKey, commonName, validDays, usage, extra);
  return { certPem, keyPem: await exportKeyPem(keys.privateKey) };
}

/** TLS server certificate for the coordinator; SANs cover every DNS name / IP sites will dial. */
export async function issueServerCertificate(
  ca: CertificateAuthority,
  opts: { hosts?: string[]; validDays: number },
): Promise<ServerCertificate> {
  const hosts = opts.hosts && opts.hosts.length > 0 ? opts.hosts : DEFAULT_SERVER_HOSTS;
  const names: X509.JsonGeneralNames = hosts.map((h) => ({ type: isIP(h) ? 'ip' : 'dns', value: h }));
  const leaf = await issueLeaf(ca, hosts[0]!, opts.validDays, 'serverAuth', (x509) => [
    new x509.SubjectAlternativeNameExtension(names),
  ]);
  return { ...leaf, chainPem: leaf.certPem + ca.certPem };
}

/** Client certificate for optional mTLS; CN = site name. The key is made here (tests, tools). */
export async function issueClientCertificate(
  ca: CertificateAuthority,
  opts: { siteName: string; validDays: number },
): Promise<IssuedCertificate> {
  return issueLeaf(ca, opts.siteName, opts.validDays, 'clientAuth', () => []);
}

/** How long a site's TLS client certificate (issued at enrolment) is valid. */
export const CLIENT_CERT_VALID_DAYS = 825;
/** Far above a real P-256 request (~400 characters); bounds parse work on an unauthenticated call. */
export const MAX_CSR_PEM_CHARS = 8192;
const CSR_PEM = /^-----BEGIN CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE REQUEST-----\s*$/;

export interface ClientCertificateRequest {
  /** PKCS#10, PEM ("-----BEGIN CERTIFICATE REQUEST-----"); public. */
  csrPem: string;
  /** PKCS#8 PEM of the TLS client key; stays at the site (mode 0600). */
  keyPem: string;
}

/** A certificate request the coordinator refuses (malformed, wrong key type, or a signature that does not verify). */
export class InvalidCsrError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InvalidCsrError';
  }
}

/**
 * Site side of mTLS enrolment: a fresh ECDSA P-256 key pair for TLS client authentication and a PKCS#10 request
 * for it. The requested subject (CN = site name) is informational: the coordinator sets the subject itself.
 */
export async function createClientCertificateRequest(siteName: string): Promise<ClientCertificateRequest> {
  const x509 = await loadX509();
  const keys = await newKeyPair();
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: cn(siteName), keys, signingAlgorithm: SIGNING_ALG });
  return { csrPem: toPem(csr.rawData, 'CERTIFICATE REQUEST'), keyPem: await exportKeyPem(keys.privateKey) };
}

/**
 * Coordinator side: checks the request's self-signature (proof that the requester holds the private key), that
 * the key is ECDSA P-256, and issues a clientAuth certificate for that key with CN = `siteName`, whatever subject,
 * extensions or attributes the request asked for. Throws InvalidCsrError for a bad request.
 */
export async function issueClientCertificateFromCsr(
  ca: CertificateAuthority,
  csrPem: string,
  opts: { siteName: string; validDays?: number },
): Promise<string> {
  if (csrPem.length > MAX_CSR_PEM_CHARS) throw new InvalidCsrError(`certificate request is longer than ${MAX_CSR_PEM_CHARS} characters`);
  const m = CSR_PEM.exec(csrPem.trim() + '\n');
  if (!m) throw new InvalidCsrError("certificate request is not a PEM 'CERTIFICATE REQUEST' (PKCS#10)");
  const x509 = await loadX509();
  let csr: X509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64'));
  } catch (e) {
    throw new InvalidCsrError(`certificate request does not parse: ${(e as Error).message}`);
  }
  const alg = csr.publicKey.algorithm as webcrypto.EcKeyAlgorithm;
  if (alg.name !== 'ECDSA' || alg.namedCurve !== 'P-256') {
    throw new InvalidCsrError(`certificate request key must be ECDSA P-256, got ${alg.name}${alg.namedCurve ? ` ${alg.namedCurve}` : ''}`);
  }
  let ok = false;
  try {
    ok = await csr.verify();
  } catch {
    ok = false;
  }
  if (!ok) throw new InvalidCsrError('certificate request signature does not verify (the request was altered, or not signed by its own key)');
  const publicKey = await csr.publicKey.export(EC_ALG, ['verify']);
  return signLeaf(ca, publicKey, opts.siteName, opts.validDays ?? CLIENT_CERT_VALID_DAYS, 'clientAuth', () => []);
}

const CLIENT_AUTH_EKU = '1.3.6.1.5.5.7.3.2';

/**
 * Coordinator side of mTLS: checks by hand a client certificate the TLS layer handed over (DER), in addition to
 * whatever TLS already checked: signed by the federation CA, issued by it (names), not a CA itself, valid now
 * (CA too), clientAuth usage, exactly one CN. Returns the CN (the site name). Throws an Error naming the problem.
 */
export function verifyClientCertificate(certDer: Uint8Array, ca: X509Certificate, nowMs = Date.now()): string {
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(Buffer.from(certDer));
  } catch (e) {
    throw new Error(`client certificate does not parse: ${(e as Error).message}`);
  }
  if (!leaf.checkIssued(ca) || !leaf.verify(ca.publicKey)) throw new Error("client certificate was not issued by this federation's CA");
  if (leaf.ca) throw new Error('client certificate is a CA certificate');
  for (const [what, c] of [['client', leaf], ['CA', ca]] as const) {
    const from = Date.parse(c.validFrom);
    const to = Date.parse(c.validTo);
    if (!(from <= nowMs) || !(nowMs <= to)) {
      throw new Error(`the ${what} certificate is not valid now (valid ${c.validFrom} .. ${c.validTo})`);
    }
  }
  // Node 20 names the extended key usage list `keyUsage`; undefined means no EKU extension (any use): refuse.
  if (!(leaf.keyUsage ?? []).includes(CLIENT_AUTH_EKU)) throw new Error('client certificate is not for TLS client authentication (no clientAuth usage)');
  const cns = leaf.subject.split('\n').filter((l) => l.startsWith('CN='));
  if (cns.length !== 1) throw new Error(`client certificate subject '${leaf.subject}' must hold exactly one CN (the site name)`);
  return cns[0]!.slice(3);
}

/** SHA-256 of the certificate DER as colon-separated upper hex, like `openssl x509 -fingerprint -sha256`. */
export function certificateFingerprint(pemOrDer: string | Uint8Array): string {
  const der = new X509Certificate(typeof pemOrDer === 'string' ? pemOrDer : Buffer.from(pemOrDer)).raw; // first cert of a PEM
  return formatFingerprint(createHash('sha256').update(der).digest('hex'));
}

function formatFingerprint(hex: string): string {
  return hex.toUpperCase().match(/../g)!.join(':');
}

/** Accepts a SHA-256 fingerprint with or without colons (or spaces), any case; returns the canonical form. */
export function normalizeFingerprint(fp: string): string {
  const hex = fp.replace(/^sha256\s*(fingerprint)?\s*[:=]?\s*/i, '').replace(/[:\s-]/g, '');
  if (!/^[0-9a-fA-F]{64}$/.test(hex)) {
    throw new Error(`'${fp}' is not a SHA-256 certificate fingerprint (64 hex digits, colons optional)`);
  }
  return formatFingerprint(hex);
}

/** The certificate chain the peer sent, leaf first (from getPeerCertificate(true)). */
function peerChain(socket: tls.TLSSocket): X509Certificate[] {
  const out: X509Certificate[] = [];
  const seen = new Set<string>();
  let c: tls.DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
  while (c && c.raw && !seen.has(c.fingerprint256)) {
    seen.add(c.fingerprint256);
    out.push(new X509Certificate(c.raw));
    c = c.issuerCertificate;
  }
  return out;
}

function verifyLeaf(leaf: X509Certificate, ca: X509Certificate, host: string, where: string): void {
  const now = Date.now();
  if (!ca.ca) throw new Error(`the certificate matching the fingerprint at ${where} is not a CA certificate`);
  if (!leaf.verify(ca.publicKey)) {
    throw new Error(`the coordinator at ${where} presents a server certificate not signed by the pinned CA`);
  }
  for (const [what, c] of [['server', leaf], ['CA', ca]] as const) {
    const from = Date.parse(c.validFrom);
    const to = Date.parse(c.validTo);
    // `!(a <= b)` so an unparsable date fails closed.
    if (!(from <= now) || !(now <= to)) {
      throw new Error(`the ${what} certificate at ${where} is not valid now (valid ${c.validFrom} .. ${c.validTo}) — check this machine's clock`);
    }
  }
  const ok = isIP(host) ? leaf.checkIP(host) : leaf.checkHost(host);
  if (!ok) {
    throw new Error(
      `the coordinator's certificate at ${where} is not valid for '${host}' (names: ${leaf.subjectAltName ?? leaf.subject}) — ` +
        `dial one of those names, or reissue the server certificate with this host`,
    );
  }
}

/**
 * First contact with a coordinator: fetch its CA from the TLS handshake and keep it only if its SHA-256 matches
 * `expectedFingerprint`. Certificate verification is off for this one look only; we then check by hand that the
 * server certificate is signed by that CA and valid for `host`. Returns the CA PEM to trust from now on.
 */
export function fetchAndPinCa(
  host: string,
  port: number,
  expectedFingerprint: string,
  opts: { timeoutMs?: number } = {},
): Promise<string> {
  const expected = normalizeFingerprint(expectedFingerprint);
  const timeoutMs = opts.timeoutMs ?? 10_000;
  host = host.replace(/^\[(.*)\]$/, '$1'); // accept "[::1]"
  const where = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  return new Promise<string>((resolve, reject) => {
    let settled = false;
    const socket = tls.connect({
      host,
      port,
      servername: isIP(host) ? undefined : host, // SNI must not be an IP address
      rejectUnauthorized: false,
      ALPNProtocols: ['h2'], // the gRPC server is HTTP/2 only
    });
    const finish = (err: Error | null, pem?: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(pem!);
    };
    const timer = setTimeout(
      () => finish(new Error(`timed out after ${timeoutMs} ms waiting for a TLS handshake with the coordinator at ${where} — is it running and is the port reachable (firewall)?`)),
      timeoutMs,
    );
    socket.on('error', (e) => // 'on', not 'once': a late second error must not go unhandled
      finish(new Error(`could not complete a TLS handshake with the coordinator at ${where}: ${e.message} — check the address and that the coordinator is running`)),
    );
    socket.once('secureConnect', () => {
      try {
        const chain = peerChain(socket);
        if (chain.length === 0) throw new Error(`the server at ${where} presented no certificate`);
        const ca = chain.find((c) => normalizeFingerprint(c.fingerprint256) === expected);
        if (!ca) {
          // Name the fingerprint of the chain's top (the CA, when the server sends its chain).
          const presented = normalizeFingerprint(chain[chain.length - 1]!.fingerprint256);
          throw new Error(
            `CA fingerprint mismatch: the coordinator at ${where} presents CA ${presented}, you were given ${expected}. ` +
              'Check the fingerprint printed by `medfl coordinator site add`, or you may be talking to the wrong server.',
          );
        }
        verifyLeaf(chain[0]!, ca, host, where);
        finish(null, ca.toString());
      } catch (e) {
        finish(e as Error);
      }
    });
  });
}

/**
 * A certificate provider that never changes: grpc-js's public way (grpc.experimental) to give a server its key pair
 * and the CA its client certificates must chain to.
 */
function staticCertificates(server: ServerCertificate, clientCaPem: string): grpc.experimental.CertificateProvider {
  const ca = { caCertificate: Buffer.from(clientCaPem) };
  const identity = { certificate: Buffer.from(server.chainPem), privateKey: Buffer.from(server.keyPem) };
  // Told after the call that registers them returns, as a provider that reads files would: grpc-js registers its
  // own watcher only after asking for the certificates, and an answer given at once would reach no one.
  return {
    addCaCertificateListener: (listener) => queueMicrotask(() => listener(ca)),
    removeCaCertificateListener: () => undefined,
    addIdentityCertificateListener: (listener) => queueMicrotask(() => listener(identity)),
    removeIdentityCertificateListener: () => undefined,
  };
}

/**
 * gRPC server credentials from a server certificate. For mTLS pass `clientCaPem` and either
 * `requireClientCert` (TLS refuses a handshake without a certificate from that CA) or `requestClientCert`
 * (TLS asks for one but lets calls without it through, so that one method, e.g. Enroll, can be reached by a
 * client that has no certificate yet; every other method must then check the certificate itself).
 */
export function serverCredentials(
  server: ServerCertificate,
  opts: { clientCaPem?: string; requireClientCert?: boolean; requestClientCert?: boolean } = {},
): grpc.ServerCredentials {
  if ((opts.requireClientCert || opts.requestClientCert) && !opts.clientCaPem) throw new Error('requireClientCert/requestClientCert need clientCaPem');
  if (opts.requireClientCert && opts.requestClientCert) throw new Error('pass requireClientCert or requestClientCert, not both');
  if (opts.requestClientCert) {
    // TLS asks every client for a certificate but completes the handshake without one, or with one it cannot
    // verify: createSsl cannot say this (with checkClientCertificate=false it does not ask, with true it rejects a
    // missing certificate), a certificate-provider credential with requireClientCertificate=false does. The server
    // then checks certificates per method itself: grpc-js's `getAuthContext().sslPeerCertificate` is set only when
    // TLS verified the certificate against `clientCaPem` (coordinator/auth/interceptor.ts). One provider serves as
    // both the CA and the identity source, whichever argument grpc-js reads as which.
    const provider = staticCertificates(server, opts.clientCaPem!);
    return grpc.experimental.createCertificateProviderServerCredentials(provider, provider, false);
  }
  return grpc.ServerCredentials.createSsl(
    opts.clientCaPem ? Buffer.from(opts.clientCaPem) : null,
    [{ private_key: Buffer.from(server.keyPem), cert_chain: Buffer.from(server.chainPem) }],
    opts.requireClientCert ?? false,
  );
}

/**
 * gRPC channel credentials trusting only the pinned CA; add a client certificate for mTLS, and `verify` to check the
 * server's certificate another way than against the TLS name (site-agent/transport/connection.ts: by address).
 */
export function pinnedChannelCredentials(caPem: string, client?: IssuedCertificate, verify?: grpc.VerifyOptions): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(
    Buffer.from(caPem),
    client ? Buffer.from(client.keyPem) : null,
    client ? Buffer.from(client.certPem) : null,
    verify,
  );
}
