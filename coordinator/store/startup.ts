/**
 * Starting a coordinator on a full disk (issue 15): the process must come up, say what is wrong, and carry on by
 * itself once space returns, instead of exiting.
 *
 * Two things stand in the way:
 * - Opening the state database. SQLite in WAL mode needs its shared-memory file (`state.db-shm`, 32 KiB) and, on
 *   a first start, room for the schema; on a full disk it fails (SQLITE_IOERR_SHMSIZE, SQLITE_FULL) before any
 *   query. The store therefore keeps a small reserve file beside the database (`state.db-reserve`); a start that
 *   cannot open the database deletes it, which gives SQLite the room to open, and says so. The reserve is written
 *   again once there is space for it. Without a reserve (a first start on a full disk) opening is retried until
 *   space returns; the process waits instead of exiting.
 * - The start-up writes after it (the initial model, a resumed round's bookkeeping). `retryUntilStarted` runs
 *   them again every `retryMs` while they fail on storage, in the background, so the coordinator listens, answers
 *   site calls UNAVAILABLE (retryable) and reports the failing store on /readyz meanwhile.
 */
import { closeSync, existsSync, fsyncSync, openSync, statfsSync, unlinkSync, writeSync } from 'node:fs';
import type { Logger } from '../../shared/util/log.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import { CoordinatorStore } from './store.ts';

/** Room the reserve keeps: the WAL index and a few hundred pages of WAL, enough to open and record a round. */
export const RESERVE_BYTES = 4 * 1024 * 1024;
export const DEFAULT_STORAGE_RETRY_MS = 10_000;

export const reservePath = (dbPath: string): string => `${dbPath}-reserve`;

export interface OpenStoreOptions {
  log: Logger;
  /** How the database is opened (default: the SQLite store); tests pass a store whose disk they fill. */
  open?: (path: string) => CoordinatorStore;
  retryMs?: number;
  /** Resolves when waiting should end (coordinator shutdown): opening then rejects. */
  signal?: AbortSignal;
}

/**
 * Opens the store, waiting (and retrying every `retryMs`) while the disk is too full to open it; releases the
 * reserve file first. Rejects at once on any other error.
 */
export async function openStoreWhenPossible(path: string, o: OpenStoreOptions): Promise<CoordinatorStore> {
  const open = o.open ?? ((p: string) => new CoordinatorStore(p));
  const retryMs = o.retryMs ?? DEFAULT_STORAGE_RETRY_MS;
  let waitingSince: number | undefined;
  for (;;) {
    try {
      const store = open(path);
      if (waitingSince !== undefined) o.log.warn({ waitedMs: Date.now() - waitingSince }, 'the state database opened: space has returned');
      keepReserve(path, store, o.log, retryMs);
      return store;
    } catch (e) {
      if (!isStorageFault(e)) throw e;
      if (diskNearlyFull(path) && releaseReserve(path)) {
        o.log.error({ err: describeStorageFault(e), reserve: reservePath(path), bytes: RESERVE_BYTES }, 'the disk is full: released the reserve file to open the state database — free space on the coordinator disk now');
        continue;
      }
      if (waitingSince === undefined) {
        waitingSince = Date.now();
        o.log.error({ err: describeStorageFault(e), path, retryInMs: retryMs }, 'cannot open the state database (the disk is full or failing): waiting for space, trying again periodically');
      }
      await delay(retryMs, o.signal);
    }
  }
}

/**
 * Runs `start` until it goes through: the first try is awaited (so a real error still fails the start), a storage
 * fault is logged and tried again every `retryMs` in the background. Returns a function that stops retrying.
 */
export async function retryUntilStarted(start: () => Promise<void>, o: { log: Logger; what: string; retryMs?: number }): Promise<() => void> {
  const retryMs = o.retryMs ?? DEFAULT_STORAGE_RETRY_MS;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const attempt = async (first: boolean): Promise<void> => {
    try {
      await start();
      if (!first) o.log.warn(`${o.what}: went through now that storage works again`);
    } catch (e) {
      if (first && !isStorageFault(e)) throw e;
      o.log.error({ err: describeStorageFault(e), storage: isStorageFault(e), retryInMs: retryMs }, `${o.what} failed; the coordinator keeps running and tries again (free space on its disk)`);
      if (!stopped) timer = setTimeout(() => void attempt(false), retryMs);
    }
  };
  await attempt(true);
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
  };
}

/** Less free space than the reserve holds twice over (or unknown): a failure to open is then the disk's. */
function diskNearlyFull(dbPath: string): boolean {
  try {
    const s = statfsSync(dbPath);
    return Number(s.bavail) * Number(s.bsize) < 2 * RESERVE_BYTES;
  } catch {
    return true;
  }
}

/** Deletes the reserve file; false when there was none. */
function releaseReserve(dbPath: string): boolean {
  try {
    unlinkSync(reservePath(dbPath));
    return true;
  } catch {
    return false;
  }
}

/** Writes the reserve when it is missing and the disk has room for it twice over; checks again every minute. */
function keepReserve(dbPath: string, store: CoordinatorStore, log: Logger, retryMs: number): void {
  const ensure = (): void => {
    const path = reservePath(dbPath);
    if (existsSync(path)) return;
    try {
      if (diskNearlyFull(dbPath)) return;
      const fd = openSync(path, 'wx', 0o600);
      try {
        // Real blocks, not a sparse file: deleting it must give space back.
        const zeros = Buffer.alloc(1024 * 1024);
        for (let n = 0; n < RESERVE_BYTES; n += zeros.length) writeSync(fd, zeros);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      releaseReserve(dbPath);
      log.debug({ err: describeStorageFault(e) }, 'could not write the disk-space reserve file; trying later');
    }
  };
  ensure();
  const timer = setInterval(ensure, Math.max(retryMs, 60_000));
  timer.unref();
  store.onClose(() => clearInterval(timer));
}

function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new Error('stopped while waiting for space to open the state database'));
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      reject(new Error('stopped while waiting for space to open the state database'));
    }, { once: true });
  });
}
