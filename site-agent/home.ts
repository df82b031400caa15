/**
 * A site's directory. Everything here stays at the hospital:
 *   site.json          site name, coordinator address, federation id, coordinator's public key
 *   site.key (0600)    the site's Ed25519 private key; site.pub its public half
 *   ca.pem             the federation CA, pinned by fingerprint at enrolment
 *   tls-client.key     (0600) the site's TLS client key (ECDSA P-256), made here at enrolment
 *   tls-client.pem     its client certificate from the federation CA (CN = site name), presented on every
 *                      connection; required by a coordinator running --mtls, ignored by one that is not
 *   cache/models/      global model versions by hash (downloads resume from .part files)
 *   local/             the site's own tensors (head, and anything the plan keeps local), per architecture
 *   outbox/            updates waiting to be acknowledged, so a crash between training and upload loses nothing
 */
import { existsSync, readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import { assertOwnerOnly } from '../shared/security/site-identity.ts';
import type { IssuedCertificate } from '../shared/security/pki.ts';

export const TLS_CLIENT_KEY_FILE = 'tls-client.key';
export const TLS_CLIENT_CERT_FILE = 'tls-client.pem';

const SiteConfigSchema = z.object({
  siteName: z.string(),
  coordinator: z.string(),
  federationId: z.string(),
  coordinatorPublicKey: z.string(),
  caFingerprint: z.string(),
  enrolledAt: z.string(),
});
export type SiteConfig = z.infer<typeof SiteConfigSchema>;

export class SiteHome {
  constructor(readonly dir: string) {}

  get configPath(): string { return join(this.dir, 'site.json'); }
  get caPath(): string { return join(this.dir, 'ca.pem'); }
  get tlsClientKeyPath(): string { return join(this.dir, TLS_CLIENT_KEY_FILE); }
  get tlsClientCertPath(): string { return join(this.dir, TLS_CLIENT_CERT_FILE); }
  get modelCacheDir(): string { return join(this.dir, 'cache', 'models'); }
  get localDir(): string { return join(this.dir, 'local'); }
  get outboxDir(): string { return join(this.dir, 'outbox'); }

  isEnrolled(): boolean {
    return existsSync(this.configPath);
  }

  config(): SiteConfig {
    if (!this.isEnrolled()) throw new Error(`${this.dir} is not an enrolled site: run \`medfl site enroll --dir ${this.dir} …\` first`);
    return SiteConfigSchema.parse(JSON.parse(readFileSync(this.configPath, 'utf8')));
  }

  saveConfig(c: SiteConfig): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    writeFileAtomic(this.configPath, JSON.stringify(c, null, 2) + '\n');
  }

  caPem(): string {
    return readFileSync(this.caPath, 'utf8');
  }

  /**
   * The TLS client certificate and key, or undefined if the site has none (enrolled by an older agent, or with a
   * coordinator that had no CA key). Throws when only one of the pair is there, or the key is group/world readable.
   */
  clientCertificate(): IssuedCertificate | undefined {
    const hasKey = existsSync(this.tlsClientKeyPath);
    const hasCert = existsSync(this.tlsClientCertPath);
    if (!hasKey && !hasCert) return undefined;
    if (!hasKey || !hasCert) {
      const missing = hasKey ? this.tlsClientCertPath : this.tlsClientKeyPath;
      throw new Error(`${missing} is missing but its other half is there; restore it from a backup, or re-enrol the site (\`medfl site enroll\`)`);
    }
    assertOwnerOnly(this.tlsClientKeyPath, 'TLS client key');
    return { certPem: readFileSync(this.tlsClientCertPath, 'utf8'), keyPem: readFileSync(this.tlsClientKeyPath, 'utf8') };
  }
}
