/**
 * The two writes every site call used to make on its own — the token id (jti) it spent and the site's last-seen
 * time — grouped, so that a heartbeat no longer costs two fsync'd SQLite transactions.
 *
 * Token ids: the replay window is held in memory (loaded from `seen_jti` at first use, so ids spent before a
 * restart are still known) and written to the store in group commits: the first id waiting arms a short timer
 * (`commitDelayMs`), and one transaction then writes every id that arrived meanwhile. A call is let through only
 * once the commit holding its id is durable, so an id accepted before a crash or kill -9 is in the database when
 * the coordinator comes back, exactly as when each id had its own transaction; only the fsyncs are shared. A replay
 * is refused from memory at once.
 *
 * Last seen: kept in memory and written with the next commit, or at the latest every `lastSeenFlushMs`. It is
 * bookkeeping for `medfl status`, so losing the last few seconds of it to a crash costs nothing; readers in this
 * process see the pending values (the store overlays them), other processes up to `lastSeenFlushMs` late.
 *
 * A commit that fails (disk full, database locked) refuses the calls waiting on it with the storage error — the
 * interceptor turns that into UNAVAILABLE, which sites retry with fresh tokens — and keeps the last-seen values to
 * try again.
 */
import type Database from 'better-sqlite3';

export interface BookkeepingOptions {
  /** How long the first waiting token id waits for others to share its commit (default 5 ms; calls that arrive while a commit runs wait for the next one, which is what batches them under load). */
  commitDelayMs: number;
  /** Longest time last-seen values stay in memory only (default 2 s). */
  lastSeenFlushMs: number;
}

export const DEFAULT_BOOKKEEPING: BookkeepingOptions = { commitDelayMs: 5, lastSeenFlushMs: 2000 };

/** Ids are kept this long past their token's expiry (beyond the interceptor's 30 s clock tolerance). */
const KEEP_PAST_EXPIRY_S = 60;

export interface PendingSeen {
  at: number;
  /** null: unchanged (as the SQL's COALESCE). */
  activity: string | null;
  engine: string | null;
  softwareVersion: string | null;
}

/** What a call says of its site; null fields leave the stored value as it is. */
export type SiteSeen = Omit<PendingSeen, 'at'>;

interface Waiter {
  resolve: (accepted: true) => void;
  reject: (e: unknown) => void;
}

/** The statements every commit runs, prepared once (preparing cost more than running them for a commit of a few ids). */
interface CommitStatements {
  insertJti: Database.Statement;
  touchSite: Database.Statement;
  siteLeft: Database.Statement;
  pruneJtis: Database.Statement;
}

export class CallBookkeeping {
  /** jti → its token's expiry (s); undefined until first used. */
  private seen: Map<string, number> | undefined;
  private pendingIds: { jti: string; exp: number }[] = [];
  private waiters: Waiter[] = [];
  private readonly lastSeen = new Map<string, PendingSeen>();
  /** Site → when its task stream closed, not yet written. */
  private readonly leftAt = new Map<string, number>();
  private commitTimer: NodeJS.Timeout | undefined;
  private seenTimer: NodeJS.Timeout | undefined;
  private nextPruneSec = 0;
  private commitsDone = 0;
  private statements: CommitStatements | undefined;
  private readonly o: BookkeepingOptions;

  constructor(
    private readonly db: Database.Database,
    options: Partial<BookkeepingOptions> = {},
  ) {
    this.o = { ...DEFAULT_BOOKKEEPING, ...options };
  }

  /** Resolves true once `jti` is durably recorded; false at once when it was seen before (a replay). */
  consumeJti(jti: string, expiresAtSec: number, nowSec: number): Promise<boolean> {
    const seen = this.load(nowSec);
    if (seen.has(jti)) return Promise.resolve(false);
    seen.set(jti, expiresAtSec);
    this.pendingIds.push({ jti, exp: expiresAtSec });
    const durable = new Promise<boolean>((resolve, reject) => this.waiters.push({ resolve, reject }));
    this.commitTimer ??= setTimeout(() => this.commit(), this.o.commitDelayMs);
    return durable;
  }

  touch(name: string, seen: SiteSeen, now: number): void {
    const before = this.lastSeen.get(name);
    this.lastSeen.set(name, {
      at: now,
      activity: seen.activity ?? before?.activity ?? null,
      engine: seen.engine ?? before?.engine ?? null,
      softwareVersion: seen.softwareVersion ?? before?.softwareVersion ?? null,
    });
    if (!this.seenTimer) {
      this.seenTimer = setTimeout(() => this.commit(), this.o.lastSeenFlushMs);
      this.seenTimer.unref();
    }
  }

  /** Notes that `name`'s task stream closed at `at` (written with the next last-seen commit). */
  left(name: string, at: number): void {
    this.leftAt.set(name, at);
    if (!this.seenTimer) {
      this.seenTimer = setTimeout(() => this.commit(), this.o.lastSeenFlushMs);
      this.seenTimer.unref();
    }
  }

  /** When `name`'s task stream closed, where that is not written yet. */
  pendingLeft(name: string): number | undefined {
    return this.leftAt.get(name);
  }

  /** The last-seen values not yet written for `name`. */
  pending(name: string): PendingSeen | undefined {
    return this.lastSeen.get(name);
  }

  /** Transactions written so far (each holds any number of token ids and last-seen values). */
  get commits(): number {
    return this.commitsDone;
  }

  /** Writes everything pending now (store close). Throws if that fails; waiting calls are refused then. */
  flush(): void {
    this.commit(true);
  }

  private load(nowSec: number): Map<string, number> {
    if (this.seen) return this.seen;
    const rows = this.db.prepare('SELECT jti, expires_at AS exp FROM seen_jti WHERE expires_at >= ?').all(nowSec - KEEP_PAST_EXPIRY_S) as { jti: string; exp: number }[];
    this.seen = new Map(rows.map((r) => [r.jti, r.exp]));
    this.nextPruneSec = nowSec + KEEP_PAST_EXPIRY_S;
    return this.seen;
  }

  /** One transaction for every waiting id and last-seen value. From a timer it never throws (that would end the process). */
  private commit(rethrow = false): void {
    if (this.commitTimer) clearTimeout(this.commitTimer);
    if (this.seenTimer) clearTimeout(this.seenTimer);
    this.commitTimer = undefined;
    this.seenTimer = undefined;
    const ids = this.pendingIds;
    const waiters = this.waiters;
    const touched = [...this.lastSeen];
    const left = [...this.leftAt];
    this.pendingIds = [];
    this.waiters = [];
    if (ids.length === 0 && touched.length === 0 && left.length === 0) return;
    const nowSec = Math.floor(Date.now() / 1000);
    const prune = this.seen !== undefined && nowSec >= this.nextPruneSec;
    try {
      const st = this.prepared();
      this.db.transaction(() => {
        for (const { jti, exp } of ids) st.insertJti.run(jti, exp);
        for (const [name, s] of touched) st.touchSite.run(s.at, s.activity, s.engine, s.softwareVersion, name);
        for (const [name, at] of left) st.siteLeft.run(at, name);
        if (prune) st.pruneJtis.run(nowSec - KEEP_PAST_EXPIRY_S);
      }).immediate();
    } catch (e) {
      for (const w of waiters) w.reject(e);
      // Last seen is retried with the next commit; ids of refused calls stay spent in memory (sites sign new ones).
      if (!this.seenTimer && (this.lastSeen.size > 0 || this.leftAt.size > 0)) {
        this.seenTimer = setTimeout(() => this.commit(), this.o.lastSeenFlushMs);
        this.seenTimer.unref();
      }
      if (rethrow) throw e;
      return;
    }
    this.commitsDone++;
    // Values that changed while the transaction ran (it is synchronous, so none can) stay; the rest are written.
    for (const [name, s] of touched) if (this.lastSeen.get(name) === s) this.lastSeen.delete(name);
    for (const [name, at] of left) if (this.leftAt.get(name) === at) this.leftAt.delete(name);
    if (prune && this.seen) {
      for (const [jti, exp] of this.seen) if (exp < nowSec - KEEP_PAST_EXPIRY_S) this.seen.delete(jti);
      this.nextPruneSec = nowSec + KEEP_PAST_EXPIRY_S;
    }
    for (const w of waiters) w.resolve(true);
  }

  private prepared(): CommitStatements {
    this.statements ??= {
      insertJti: this.db.prepare('INSERT OR IGNORE INTO seen_jti (jti, expires_at) VALUES (?, ?)'),
      touchSite: this.db.prepare(
        'UPDATE sites SET last_seen_at = ?, activity = COALESCE(?, activity), engine = COALESCE(?, engine), software_version = COALESCE(?, software_version) WHERE name = ?',
      ),
      siteLeft: this.db.prepare('UPDATE sites SET left_at = ? WHERE name = ?'),
      pruneJtis: this.db.prepare('DELETE FROM seen_jti WHERE expires_at < ?'),
    };
    return this.statements;
  }
}
