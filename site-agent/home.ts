/**
 * A site's directory. Everything here stays at the hospital:
 *   site.json          site name, coordinator address, federation id, coordinator's public key
 *   site.key (0600)    the site's Ed25519 private key; site.pub its public half
 *   ca.pem             the federation CA, pinned by fingerprint at enrolment
 *   cache/models/      global model versions by hash (downloads resume from .part files)
 *   local/             the site's own tensors (head, and anything the plan keeps local), per architecture
 *   outbox/            updates waiting to be acknowledged, so a crash between training and upload loses nothing
 */
import { existsSync, readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';

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
}
