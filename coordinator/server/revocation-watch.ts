/**
 * Closes the task streams of sites that stop being enrolled while connected. A revocation is written to the state
 * database by another process (`medfl coordinator site revoke`), so the coordinator has to look; it looks once per
 * tick for every open stream together, one query however many sites are connected. (Each stream used to run its
 * own timer and query: at 1,000 connected sites, 500 SQLite reads a second on the event loop.)
 *
 * Calls are refused at once by the auth interceptor, which reads the site's state on every call; this only ends the
 * streams, which make no calls once open.
 */
import type { Logger } from '../../shared/util/log.ts';
import { describeStorageFault } from '../../shared/util/storage-fault.ts';

export interface RevocationWatchOptions {
  /** The names of the sites enrolled now (revoked and invited ones left out). */
  enrolledSites: () => ReadonlySet<string>;
  /** How often to look (the old per-stream check's 2 s by default). */
  everyMs?: number;
  log: Logger;
}

export class RevocationWatch {
  /** Site → what to call when it is found not enrolled (one per open task stream of that site). */
  private readonly watched = new Map<string, Set<() => void>>();
  private timer: NodeJS.Timeout | undefined;
  private readonly everyMs: number;

  constructor(private readonly o: RevocationWatchOptions) {
    this.everyMs = o.everyMs ?? 2000;
  }

  /** Calls `onRevoked` once, on the first tick that finds `site` not enrolled; the returned function stops watching. */
  watch(site: string, onRevoked: () => void): () => void {
    let callbacks = this.watched.get(site);
    if (!callbacks) this.watched.set(site, (callbacks = new Set()));
    callbacks.add(onRevoked);
    this.timer ??= setInterval(() => this.check(), this.everyMs).unref();
    return () => this.unwatch(site, onRevoked);
  }

  /** Sites watched now (for tests and metrics). */
  get size(): number {
    return this.watched.size;
  }

  private unwatch(site: string, onRevoked: () => void): void {
    const callbacks = this.watched.get(site);
    if (!callbacks?.delete(onRevoked)) return;
    if (callbacks.size === 0) this.watched.delete(site);
    if (this.watched.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  private check(): void {
    let enrolled: ReadonlySet<string>;
    try {
      enrolled = this.o.enrolledSites();
    } catch (e) {
      // A timer must not throw (that would end the process): look again on the next tick.
      this.o.log.warn({ sites: this.watched.size, err: describeStorageFault(e) }, 'could not check whether the connected sites are still enrolled');
      return;
    }
    for (const [site, callbacks] of [...this.watched]) {
      if (enrolled.has(site)) continue;
      this.o.log.warn({ site }, 'site revoked: closing its task stream');
      for (const onRevoked of [...callbacks]) {
        this.unwatch(site, onRevoked);
        onRevoked();
      }
    }
  }
}
