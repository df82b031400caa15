import { CLOCK_TOLERANCE_S, type SiteDirectory, type SiteRecord } from '../../coordinator/auth/interceptor.ts';

/** In-memory SiteDirectory for tests that run the interceptor without a coordinator store; replayed-token ids are pruned once their token has expired. */
export class MemorySiteDirectory implements SiteDirectory {
  private readonly sites = new Map<string, SiteRecord>();
  private readonly jtis = new Map<string, number>();
  private nextPruneSec = 0;

  constructor(private readonly nowSec: () => number = () => Math.floor(Date.now() / 1000)) {}

  addSite(name: string, publicKeyRaw: Buffer): void {
    this.sites.set(name, { publicKeyRaw: Buffer.from(publicKeyRaw), revoked: false });
  }

  revoke(name: string): void {
    const s = this.sites.get(name);
    if (s) s.revoked = true;
  }

  reinstate(name: string): void {
    const s = this.sites.get(name);
    if (s) s.revoked = false;
  }

  remove(name: string): void {
    this.sites.delete(name);
  }

  getSite(name: string): SiteRecord | undefined {
    return this.sites.get(name);
  }

  consumeJti(jti: string, expiresAtSec: number): boolean {
    const now = this.nowSec();
    if (now >= this.nextPruneSec) this.prune(now);
    if (this.jtis.has(jti)) return false;
    // Keep past exp + tolerance: until then the interceptor would still accept the token.
    this.jtis.set(jti, expiresAtSec + CLOCK_TOLERANCE_S);
    return true;
  }

  /** Number of remembered token ids. */
  get jtiCount(): number {
    return this.jtis.size;
  }

  prune(nowSec = this.nowSec()): void {
    for (const [id, until] of this.jtis) if (until < nowSec) this.jtis.delete(id);
    this.nextPruneSec = nowSec + 10;
  }
}
