/**
 * `medfl site enroll`: pin the coordinator's CA by the fingerprint the admin gave, make the site's own
 * Ed25519 key pair (private key stays here, mode 0600), and register only the public key.
 */
import * as grpc from '@grpc/grpc-js';
import { fetchAndPinCa, pinnedChannelCredentials, certificateFingerprint } from '../shared/security/pki.ts';
import { ensureSiteKey } from '../shared/security/site-identity.ts';
import { CHANNEL_OPTIONS, loadProto } from '../shared/protocol/grpc.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import { SiteHome, type SiteConfig } from './home.ts';
import { siteOfToken } from '../shared/protocol/site-names.ts';

export interface EnrollOptions {
  coordinator: string;
  token: string;
  caFingerprint: string;
  dir: string;
}

export function parseAddress(address: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(address.trim());
  if (!m) throw new Error(`coordinator address '${address}' must be HOST:PORT, e.g. coordinator.example.org:7443`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]) };
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
  const { Enrollment } = loadProto();
  const client = new Enrollment(`${host.includes(':') ? `[${host}]` : host}:${port}`, pinnedChannelCredentials(caPem), CHANNEL_OPTIONS);
  try {
    const res = await new Promise<{ siteName: string; federationId: string; coordinatorPublicKey: Buffer }>((resolve, reject) =>
      client.Enroll({ siteName: siteOfToken(o.token), token: o.token, publicKey: key.publicKeyRaw }, { deadline: Date.now() + 15_000 }, (err: grpc.ServiceError | null, r: never) =>
        err ? reject(new Error(`enrolment refused: ${err.details || err.message}`)) : resolve(r),
      ),
    );
    writeFileAtomic(home.caPath, caPem);
    const config: SiteConfig = {
      siteName: res.siteName,
      coordinator: o.coordinator,
      federationId: res.federationId,
      coordinatorPublicKey: Buffer.from(res.coordinatorPublicKey).toString('base64'),
      caFingerprint: certificateFingerprint(caPem),
      enrolledAt: new Date().toISOString(),
    };
    home.saveConfig(config);
    return config;
  } finally {
    client.close();
  }
}
