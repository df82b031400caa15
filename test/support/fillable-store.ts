/**
 * A real CoordinatorStore behind a wrapper that can "fill the disk": while filled, the store methods named (or
 * every method that writes) throw the SqliteError a full disk makes SQLite throw — produced for real, by writing
 * to a database capped with PRAGMA max_page_count. The wrapper is handed to product code where it takes a store
 * (RoundEngine, federationHandlers, the auth directory), just as coordinator.ts hands over the real one.
 */
import Database from 'better-sqlite3';
import type { CoordinatorStore } from '../../coordinator/store/store.ts';

/** Every CoordinatorStore method that writes to the database. */
export const WRITES = [
  'setMeta', 'deleteMeta', 'transaction', 'inviteSite', 'enrolSite', 'revokeSite', 'touchSite', 'consumeJti',
  'addModel', 'openRound', 'extendDeadline', 'closeRound', 'failRound', 'insertUpdate', 'insertUpdates', 'recordMetrics',
] as const;
export type WriteMethod = (typeof WRITES)[number];

/** A genuine SQLITE_FULL ("database or disk is full"): a write to a database that may not grow. */
export function sqliteFullError(): Error {
  const db = new Database(':memory:');
  try {
    db.exec('CREATE TABLE t (x BLOB)');
    db.pragma(`max_page_count = ${db.pragma('page_count', { simple: true }) as number}`);
    db.prepare('INSERT INTO t VALUES (zeroblob(65536))').run();
  } catch (e) {
    return e as Error;
  } finally {
    db.close();
  }
  throw new Error('SQLite accepted a write past max_page_count');
}

export interface FillableStore {
  store: CoordinatorStore;
  /** Makes the named writes (default: all of them) fail with SQLITE_FULL until empty() is called. */
  fill(methods?: readonly WriteMethod[]): void;
  empty(): void;
  /** How many calls were refused since the last fill(). */
  refused: number;
}

export function fillableStore(real: CoordinatorStore): FillableStore {
  const failing = new Set<string>();
  const state: FillableStore = {
    store: undefined as unknown as CoordinatorStore,
    fill(methods = WRITES) {
      failing.clear();
      for (const m of methods) failing.add(m);
      state.refused = 0;
    },
    empty() {
      failing.clear();
    },
    refused: 0,
  };
  state.store = new Proxy(real, {
    get(target, prop) {
      const v: unknown = Reflect.get(target, prop, target);
      if (typeof v !== 'function') return v;
      if (typeof prop === 'string' && failing.has(prop)) {
        return () => {
          state.refused++;
          throw sqliteFullError();
        };
      }
      return (v as (...a: unknown[]) => unknown).bind(target);
    },
  });
  return state;
}
