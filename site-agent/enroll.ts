/**
 * `medfl site enroll`: pin the coordinator's CA by the fingerprint the admin gave, make the site's own
 * Ed25519 key pair (private key stays here, mode 0600), and register only the public key.
 *
 * It also makes a TLS client key (ECDSA P-256, tls-client.key, 0600) and sends a certificate request for it; the
 * coordinator returns a client certificate (tls-client.pem, CN = site name) that the site presents on every
 * later connection, so the coordinator can run with --mtls without the site re-enrolling. The enrolment call
 * itself needs no client certificate.
 */
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { chmodSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import {
  fetchAndPinCa,
  certificateFingerprint,
  createClientCertificateRequest,
  verifyClientCertificate,
} from '../shared/security/pki.ts';
import { ensureSiteKey } from '../shared/security/site-identity.ts';
import { enrolmentClient, parseAddress } from './transport/connection.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import { SiteHome, type SiteConfig } from './home.ts';
import { SITE_NAME_PATTERN, siteOfToken } from '../shared/protocol/site-names.ts';
import { DEFAULT_POLICY_YAML, POLICY_FILES } from './policy.ts';

/** Federation ids as coordinators make them; checked because the id is kept in site.json and used in names. */
const FEDERATION_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export interface EnrollOptions {
  coordinator: string;
  token: string;
  caFingerprint: string;
  dir: string;
}


export async function enrollSite(o: EnrollOptions): Promise<SiteConfig> {
  const home = new SiteHome(o.dir);
  if (home.isEnrolled()) {
    throw new Error(`${o.dir} is already enrolled as '${home.config().siteName}'; use a new --dir, or remove it to enrol again`);
  }
  const { host, port } = parseAddress(o.coordinator);
  siteOfToken(o.token); // fail on a mangled token before touching the network
  const caPem = await fetchAndPinCa(host, port, o.caFingerprint);
  const key = ensureSiteKey(o.dir);
  const siteName = siteOfToken(o.token);
  const tlsClient = await createClientCertificateRequest(siteName);
  const client = enrolmentClient(host, port, caPem);
  try {
    const res = await new Promise<{ siteName: string; federationId: string; coordinatorPublicKey: Buffer; clientCertPem: string }>((resolve, reject) =>
      client.Enroll(
        { siteName, token: o.token, publicKey: key.publicKeyRaw, clientCsrPem: tlsClient.csrPem },
        { deadline: Date.now() + 15_000 },
        (err: grpc.ServiceError | null, r: never) => (err ? reject(new Error(`enrolment refused: ${err.details || err.message}`)) : resolve(r)),
      ),
    );
    // The coordinator's answer is input like any other: it must name the site we asked for, in the pattern we know.
    if (res.siteName !== siteName || !SITE_NAME_PATTERN.test(res.siteName)) {
      throw new Error(`the coordinator answered for site '${String(res.siteName).slice(0, 80)}', not '${siteName}'; nothing was written — check the coordinator address`);
    }
    if (typeof res.federationId !== 'string' || !FEDERATION_ID_PATTERN.test(res.federationId)) {
      throw new Error('the coordinator sent a malformed federation id; nothing was written — check the coordinator address');
    }
    writeFileAtomic(home.caPath, caPem);
    // An older coordinator, or one without its CA key, returns no certificate: the site then works without mTLS.
    if (res.clientCertPem) {
      checkIssuedCertificate(res.clientCertPem, tlsClient.keyPem, caPem, res.siteName);
      writeFileAtomic(home.tlsClientKeyPath, tlsClient.keyPem, 0o600);
      if (process.platform !== 'win32') chmodSync(home.tlsClientKeyPath, 0o600); // exact, whatever the umask
      writeFileAtomic(home.tlsClientCertPath, res.clientCertPem);
    }
    const config: SiteConfig = {
      siteName: res.siteName,
      coordinator: o.coordinator,
      federationId: res.federationId,
      coordinatorPublicKey: Buffer.from(res.coordinatorPublicKey).toString('base64'),
      caFingerprint: certificateFingerprint(caPem),
      enrolledAt: new Date().toISOString(),
    };
    home.saveConfig(config);
    // Default-deny made visible: the site's own policy, commented, for the site admin to read and change.
    if (!POLICY_FILES.some((f) => existsSync(join(o.dir, f)))) writeFileAtomic(join(o.dir, 'policy.yaml'), DEFAULT_POLICY_YAML);
    return config;
  } finally {
    client.close();
  }
}

/** The certificate the coordinator returned must be for our key, from the pinned CA, for this site. */
function checkIssuedCertificate(certPem: string, keyPem: string, caPem: string, siteName: string): void {
  const problem = (why: string) =>
    new Error(`the coordinator returned an unusable TLS client certificate (${why}); the enrolment was recorded, so ask the coordinator admin for a new token`);
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(certPem);
  } catch (e) {
    throw problem((e as Error).message);
  }
  if (!cert.checkPrivateKey(createPrivateKey(keyPem))) throw problem('it is not for the key this site generated');
  let cn: string;
  try {
    cn = verifyClientCertificate(cert.raw, new X509Certificate(caPem));
  } catch (e) {
    throw problem((e as Error).message);
  }
  if (cn !== siteName) throw problem(`it names site '${cn}', not '${siteName}'`);
}
