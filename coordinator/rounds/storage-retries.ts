/**
 * Work that a storage failure (a full disk, a locked database) put off: logged, then run again later, so the
 * coordinator carries on by itself once space returns. One pending retry per kind of work.
 */
import type { Logger } from '../../shared/util/log.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';

export interface StorageFault {
  at: number;
  what: string;
  error: string;
}

export class StorageRetries {
  private readonly pending = new Map<string, NodeJS.Timeout>();
  private lastFault: StorageFault | undefined;
  private stopped = false;

  constructor(
    private readonly log: Logger,
    private readonly retryMs: number,
  ) {}

  /** The failure that work is waiting on, or undefined once the retried work went through. */
  get fault(): StorageFault | undefined {
    return this.lastFault;
  }

  /**
   * Logs the failure `e` of `what` and runs `fn` again later (under `key`: a second failure of the same work while
   * one retry is pending adds none). Never throws: it runs in timers, where a throw would end the process. `fn` may
   * fail again; it is then retried again.
   */
  later(key: string, what: string, e: unknown, fn: () => void | Promise<void>): void {
    const error = describeStorageFault(e);
    this.lastFault = { at: Date.now(), what, error };
    this.log.error({ err: error, storage: isStorageFault(e), retryInMs: this.retryMs }, `${what} failed; trying again later`);
    if (this.stopped || this.pending.has(key)) return;
    const run = async () => {
      this.pending.delete(key);
      if (this.stopped) return;
      try {
        await fn();
        if (this.pending.size === 0) this.lastFault = undefined;
      } catch (e2) {
        this.later(key, what, e2, fn);
      }
    };
    this.pending.set(key, setTimeout(() => void run(), this.retryMs));
  }

  /** Drops every pending retry; none is scheduled after this. */
  stop(): void {
    this.stopped = true;
    for (const t of this.pending.values()) clearTimeout(t);
    this.pending.clear();
  }
}
