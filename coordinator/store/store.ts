/**
 * Durable coordinator state in SQLite (WAL, synchronous=FULL): sites, enrolment invitations, rounds,
 * accepted updates, model versions, metrics, seen token ids (those and last-seen times group-committed:
 * call-bookkeeping.ts). Several processes share it — the running
 * coordinator and admin commands such as `medfl coordinator site add` — which is how sites are added
 * or revoked without a restart.
 */
import Database from 'better-sqlite3';
import { CallBookkeeping, type BookkeepingOptions } from './call-bookkeeping.ts';

export type SiteState = 'invited' | 'enrolled' | 'revoked';

export interface SiteRow {
  name: string;
  state: SiteState;
  publicKey: Buffer | null;
  invitedAt: number;
  inviteExpiresAt: number;
  enrolledAt: number | null;
  revokedAt: number | null;
  lastSeenAt: number | null;
  activity: string | null;
  engine: string | null;
  /** The MedFL release the site last named in a heartbeat; null: never named (not connected yet, or a site older than the field). */
  softwareVersion: string | null;
  /**
   * When its task stream last closed (its agent stopped or lost the coordinator); null: never. Later than lastSeenAt:
   * the site has not called since, so it is not online whatever its heartbeat interval.
   */
  leftAt: number | null;
}

export interface RoundRow {
  round: number;
  state: 'open' | 'closed' | 'failed';
  baseModelHash: string;
  selected: string[];
  openedAt: number;
  deadlineAt: number;
  closedAt: number | null;
  resultModelHash: string | null;
  note: string | null;
}

export interface UpdateRow {
  updateId: string;
  round: number;
  site: string;
  numSamples: number;
  sha256: string;
  path: string;
  sizeBytes: number;
  acceptedAt: number;
}

export interface ModelRow {
  hash: string;
  path: string;
  round: number;
  sizeBytes: number;
  createdAt: number;
}

export interface MetricRow {
  round: number;
  site: string;
  key: string;
  value: number;
}

/**
 * One message still to leave the store (coordinator/events/outbox.ts): an event for the bus or an entry for the
 * contribution ledger, committed with the state change it records and delivered at least once under `id`.
 */
export interface OutboxRow {
  id: string;
  kind: 'event' | 'ledger';
  /** The event, as JSON. */
  body: string;
}

export interface StoredOutboxRow extends OutboxRow {
  pos: number;
  createdAt: number;
  publishedAt: number | null;
}

export type EnrolOutcome =
  | { ok: true }
  | { ok: false; code: 'unknown-site' | 'bad-token' | 'expired' | 'used' | 'revoked'; message: string };

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
  name TEXT PRIMARY KEY, state TEXT NOT NULL, public_key BLOB,
  token_hash TEXT, invited_at INTEGER NOT NULL, invite_expires_at INTEGER NOT NULL, token_used_at INTEGER,
  enrolled_at INTEGER, revoked_at INTEGER, last_seen_at INTEGER, activity TEXT, engine TEXT, software_version TEXT, left_at INTEGER);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, state TEXT NOT NULL, base_model_hash TEXT NOT NULL, selected TEXT NOT NULL,
  opened_at INTEGER NOT NULL, deadline_at INTEGER NOT NULL, closed_at INTEGER, result_model_hash TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS updates (
  update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, site TEXT NOT NULL, num_samples INTEGER NOT NULL,
  sha256 TEXT NOT NULL, path TEXT NOT NULL, size_bytes INTEGER NOT NULL, accepted_at INTEGER NOT NULL,
  UNIQUE (round, site));
-- A site's own earlier updates (the sample-count check reads its last five on every accepted update): without it
-- SQLite walked the (round, site) index back through every earlier round, ~0.6 s a round at 100 rounds × 1,000 sites.
CREATE INDEX IF NOT EXISTS updates_by_site ON updates (site, round);
CREATE TABLE IF NOT EXISTS models (
  hash TEXT PRIMARY KEY, path TEXT NOT NULL, round INTEGER NOT NULL, size_bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
  round INTEGER NOT NULL, site TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (round, site, key));
CREATE TABLE IF NOT EXISTS seen_jti (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
  pos INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, body TEXT NOT NULL,
  created_at INTEGER NOT NULL, published_at INTEGER);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (kind, pos) WHERE published_at IS NULL;
`;

export class CoordinatorStore {
  private readonly db: Database.Database;
  /** Token ids and last-seen times of site calls, group-committed (call-bookkeeping.ts). */
  private readonly calls: CallBookkeeping;

  constructor(path: string, options: { bookkeeping?: Partial<BookkeepingOptions> } = {}) {
    this.db = new Database(path);
    this.db.pragma('journal_mode = WAL');
    // FULL: an acknowledged update must survive power loss, not only a process crash.
    this.db.pragma('synchronous = FULL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(SCHEMA);
    addMissingColumns(this.db);
    this.calls = new CallBookkeeping(this.db, options.bookkeeping);
  }

  private readonly closers: (() => void)[] = [];

  /**
   * Statements run on every site call or every update (the interceptor's site lookup, each download's model lookup,
   * the upload's and the round's lookups), prepared once: preparing costs more than running them (~1 % of the
   * coordinator's samples in a 300-site bench:sites profile went to preparing these again and again).
   */
  private readonly statements = new Map<string, Database.Statement>();
  private prepared(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) this.statements.set(sql, (s = this.db.prepare(sql)));
    return s;
  }

  /** Writes what site calls left pending, then closes. A failing final write does not keep the database open. */
  close(): void {
    try {
      this.calls.flush();
    } finally {
      this.db.close();
      for (const f of this.closers.splice(0)) f();
    }
  }

  /** Runs `f` when the store is closed (e.g. to stop a timer that maintains files beside it). */
  onClose(f: () => void): void {
    this.closers.push(f);
  }

  /** Transactions that recorded site calls (token ids, last seen), for the load harness and metrics. */
  get callCommits(): number {
    return this.calls.commits;
  }

  getMeta(key: string): string | undefined {
    const row = this.prepared('SELECT value FROM meta WHERE key = ?').get(key) as { value: string } | undefined;
    return row?.value;
  }

  setMeta(key: string, value: string): void {
    this.db.prepare('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value').run(key, value);
  }

  deleteMeta(key: string): void {
    this.db.prepare('DELETE FROM meta WHERE key = ?').run(key);
  }

  /** Runs `fn` in one SQLite transaction (all or nothing, and no other process writes in between). */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  // ---- sites ----

  /** Creates or renews an invitation. An enrolled, unrevoked site cannot be re-invited by accident. */
  inviteSite(name: string, tokenHash: string, expiresAt: number, now = Date.now()): void {
    const existing = this.getSite(name);
    if (existing?.state === 'enrolled') {
      throw new Error(`site '${name}' is already enrolled; revoke it first (medfl coordinator site revoke ${name}) to re-enrol it with a new key`);
    }
    this.db
      .prepare(
        `INSERT INTO sites (name, state, token_hash, invited_at, invite_expires_at) VALUES (?, 'invited', ?, ?, ?)
         ON CONFLICT(name) DO UPDATE SET state = 'invited', token_hash = excluded.token_hash, invited_at = excluded.invited_at,
           invite_expires_at = excluded.invite_expires_at, token_used_at = NULL, public_key = NULL, revoked_at = NULL, enrolled_at = NULL`,
      )
      .run(name, tokenHash, now, expiresAt);
  }

  /** Checks and consumes a one-time token in one transaction, so two racing enrolments cannot both win. */
  enrolSite(name: string, tokenHash: string, publicKey: Buffer, now = Date.now()): EnrolOutcome {
    return this.db.transaction((): EnrolOutcome => {
      const row = this.prepared('SELECT * FROM sites WHERE name = ?').get(name) as Record<string, unknown> | undefined;
      // The caller is not authenticated until the token matches: an unknown site and a wrong token read the same,
      // so enrolment cannot be used to learn which site names exist (or their state).
      const refused = `the enrolment token is not valid for site '${name}' (or no such site was invited); check you copied the token whole, or ask the coordinator admin for a new one`;
      if (!row) return { ok: false, code: 'unknown-site', message: refused };
      if (row.token_hash !== tokenHash) return { ok: false, code: 'bad-token', message: refused };
      if (row.state === 'revoked') return { ok: false, code: 'revoked', message: `site '${name}' is revoked; ask the coordinator admin for a new invitation` };
      if (row.token_used_at !== null) return { ok: false, code: 'used', message: `the enrolment token for '${name}' was already used; tokens are one-time — ask for a new one (\`medfl coordinator site revoke ${name}\` then \`site add ${name}\`)` };
      if ((row.invite_expires_at as number) < now) {
        return { ok: false, code: 'expired', message: `the enrolment token for '${name}' expired at ${new Date(row.invite_expires_at as number).toISOString()}; ask for a new one with \`medfl coordinator site add ${name}\`` };
      }
      this.db.prepare("UPDATE sites SET state = 'enrolled', public_key = ?, token_used_at = ?, enrolled_at = ? WHERE name = ?").run(publicKey, now, now, name);
      return { ok: true };
    })();
  }

  revokeSite(name: string, now = Date.now()): boolean {
    return this.db.prepare("UPDATE sites SET state = 'revoked', revoked_at = ? WHERE name = ?").run(now, name).changes > 0;
  }

  getSite(name: string): SiteRow | undefined {
    const row = this.prepared('SELECT * FROM sites WHERE name = ?').get(name) as Record<string, unknown> | undefined;
    return row ? this.withPending(toSite(row)) : undefined;
  }

  /**
   * A site's key and state, for the token check of every site call: two columns from one prepared statement, read
   * anew each call so that a revocation by another process (`medfl coordinator site revoke`) counts at once.
   */
  siteCredentials(name: string): { publicKey: Buffer | null; state: SiteState } | undefined {
    const row = this.prepared('SELECT public_key, state FROM sites WHERE name = ?').get(name) as { public_key: Buffer | null; state: SiteState } | undefined;
    return row && { publicKey: row.public_key, state: row.state };
  }

  /** Names of the sites enrolled now (not invited, not revoked): one query, for checks over every connected site. */
  enrolledSiteNames(): Set<string> {
    const rows = this.prepared("SELECT name FROM sites WHERE state = 'enrolled'").pluck().all() as string[];
    return new Set(rows);
  }

  enrolledSiteCount(): number {
    return this.prepared("SELECT count(*) FROM sites WHERE state = 'enrolled'").pluck().get() as number;
  }

  listSites(): SiteRow[] {
    return (this.db.prepare('SELECT * FROM sites ORDER BY name').all() as Record<string, unknown>[]).map((r) => this.withPending(toSite(r)));
  }

  /**
   * Notes that a site was seen (and what it was doing). Held in memory and written with the next group commit,
   * within 2 s: a heartbeat costs no transaction of its own. This process reads the new values at once.
   */
  touchSite(name: string, activity: string | null, engine: string | null, now = Date.now(), softwareVersion: string | null = null): void {
    this.calls.touch(name, { activity, engine, softwareVersion }, now);
  }

  /**
   * Records a token id: resolves true once it is durably stored (its call may then proceed), false at once when it
   * was seen before (a replay), including before a restart. Ids share their commits (call-bookkeeping.ts).
   */
  consumeJti(jti: string, expiresAtSec: number, nowSec = Math.floor(Date.now() / 1000)): Promise<boolean> {
    return this.calls.consumeJti(jti, expiresAtSec, nowSec);
  }

  /** Notes that `name`'s task stream closed (bookkeeping: written with the next last-seen commit). */
  siteLeft(name: string, at = Date.now()): void {
    this.calls.left(name, at);
  }

  private withPending(s: SiteRow): SiteRow {
    const p = this.calls.pending(s.name);
    const left = this.calls.pendingLeft(s.name);
    // Read on every call's token check: the row as read when nothing is pending (no copy).
    if (!p && left === undefined) return s;
    const leftAt = left ?? s.leftAt;
    return p ? { ...s, leftAt, lastSeenAt: p.at, activity: p.activity ?? s.activity, engine: p.engine ?? s.engine, softwareVersion: p.softwareVersion ?? s.softwareVersion } : { ...s, leftAt };
  }

  // ---- models ----

  addModel(m: ModelRow): void {
    this.db.prepare('INSERT OR IGNORE INTO models (hash, path, round, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)').run(m.hash, m.path, m.round, m.sizeBytes, m.createdAt);
  }

  getModel(hash: string): ModelRow | undefined {
    const r = this.prepared('SELECT * FROM models WHERE hash = ?').get(hash) as Record<string, unknown> | undefined;
    return r ? toModel(r) : undefined;
  }

  listModels(): ModelRow[] {
    return (this.db.prepare('SELECT * FROM models ORDER BY created_at, round').all() as Record<string, unknown>[]).map(toModel);
  }

  // ---- rounds ----

  openRound(r: Omit<RoundRow, 'state' | 'closedAt' | 'resultModelHash' | 'note'>, outbox: readonly OutboxRow[] = []): void {
    this.db.transaction(() => {
      this.db
        .prepare("INSERT INTO rounds (round, state, base_model_hash, selected, opened_at, deadline_at) VALUES (?, 'open', ?, ?, ?, ?)")
        .run(r.round, r.baseModelHash, JSON.stringify(r.selected), r.openedAt, r.deadlineAt);
      this.addOutbox(outbox);
    }).immediate();
  }

  extendDeadline(round: number, deadlineAt: number): void {
    this.db.prepare('UPDATE rounds SET deadline_at = ? WHERE round = ?').run(deadlineAt, round);
  }

  /**
   * Closes a round, registers its model and writes `meta` in one transaction, so a crash leaves all or nothing.
   * Returns false, changing nothing, when the round is no longer open (an operator's rollback failed it meanwhile).
   */
  closeRound(round: number, result: ModelRow, now = Date.now(), meta: Record<string, string> = {}, outbox: readonly OutboxRow[] = []): boolean {
    return this.db.transaction((): boolean => {
      if (this.getRound(round)?.state !== 'open') return false;
      this.addModel(result);
      this.db.prepare("UPDATE rounds SET state = 'closed', closed_at = ?, result_model_hash = ? WHERE round = ?").run(now, result.hash, round);
      this.setMeta('current_model', result.hash);
      // State that moves on with the model (server-optimiser moments, DP accountant): both or neither.
      for (const [k, v] of Object.entries(meta)) this.setMeta(k, v);
      this.addOutbox(outbox);
      return true;
    }).immediate();
  }

  /** Earlier accepted sample counts of `site`, newest first (rounds before `beforeRound`). */
  recentSampleCounts(site: string, beforeRound: number, limit = 5): number[] {
    return (this.prepared('SELECT num_samples AS n FROM updates WHERE site = ? AND round < ? ORDER BY round DESC LIMIT ?').all(site, beforeRound, limit) as { n: number }[]).map((r) => r.n);
  }

  failRound(round: number, note: string, now = Date.now(), outbox: readonly OutboxRow[] = []): void {
    this.db.transaction(() => {
      this.db.prepare("UPDATE rounds SET state = 'failed', closed_at = ?, note = ? WHERE round = ?").run(now, note, round);
      this.addOutbox(outbox);
    }).immediate();
  }

  getRound(round: number): RoundRow | undefined {
    const r = this.prepared('SELECT * FROM rounds WHERE round = ?').get(round) as Record<string, unknown> | undefined;
    return r ? toRound(r) : undefined;
  }

  openRoundRow(): RoundRow | undefined {
    const r = this.prepared("SELECT * FROM rounds WHERE state = 'open' ORDER BY round DESC LIMIT 1").get() as Record<string, unknown> | undefined;
    return r ? toRound(r) : undefined;
  }

  listRounds(): RoundRow[] {
    return (this.db.prepare('SELECT * FROM rounds ORDER BY round').all() as Record<string, unknown>[]).map(toRound);
  }

  lastRoundNumber(): number {
    const r = this.prepared('SELECT MAX(round) AS m FROM rounds').get() as { m: number | null };
    return r.m ?? 0;
  }

  closedRoundCount(): number {
    return (this.prepared("SELECT COUNT(*) AS n FROM rounds WHERE state = 'closed'").get() as { n: number }).n;
  }

  // ---- updates ----

  /**
   * The row is the commit point of an update: once it is here, the update counts, even across a crash. Its
   * ledger entry and event (`outbox`) are committed with it, so neither can be lost when the process dies next.
   */
  insertUpdate(u: UpdateRow, outbox: readonly OutboxRow[] = []): void {
    this.db.transaction(() => {
      this.db
        .prepare('INSERT INTO updates (update_id, round, site, num_samples, sha256, path, size_bytes, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
        .run(u.updateId, u.round, u.site, u.numSamples, u.sha256, u.path, u.sizeBytes, u.acceptedAt);
      this.addOutbox(outbox);
    }).immediate();
  }

  /**
   * Several accepted updates in one transaction (one commit, one WAL sync), each with its outbox rows: all of them
   * are stored, or none is.
   */
  insertUpdates(updates: readonly { row: UpdateRow; outbox: readonly OutboxRow[] }[]): void {
    if (updates.length === 0) return;
    const insert = this.prepared('INSERT INTO updates (update_id, round, site, num_samples, sha256, path, size_bytes, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)');
    this.db.transaction(() => {
      for (const { row: u, outbox } of updates) {
        insert.run(u.updateId, u.round, u.site, u.numSamples, u.sha256, u.path, u.sizeBytes, u.acceptedAt);
        this.addOutbox(outbox);
      }
    }).immediate();
  }

  /** Every accepted update with its round's state, for `medfl audit verify`'s completeness check. */
  acceptedUpdates(): (UpdateRow & { roundState: RoundRow['state'] })[] {
    const rows = this.db.prepare('SELECT u.*, r.state AS round_state FROM updates u JOIN rounds r ON r.round = u.round ORDER BY u.round, u.accepted_at').all() as Record<string, unknown>[];
    return rows.map((r) => ({ ...toUpdate(r), roundState: r.round_state as RoundRow['state'] }));
  }

  // ---- outbox (coordinator/events/outbox.ts) ----

  /** Adds rows (inside the caller's transaction when there is one); a row whose id is already there is kept as it was. */
  addOutbox(rows: readonly OutboxRow[], now = Date.now()): void {
    if (rows.length === 0) return;
    const stmt = this.prepared('INSERT OR IGNORE INTO outbox (id, kind, body, created_at) VALUES (?, ?, ?, ?)');
    this.db.transaction(() => {
      for (const r of rows) stmt.run(r.id, r.kind, r.body, now);
    })();
  }

  /**
   * addOutbox for a published event, in a commit that does not wait for the disk (relaxedCommit): the event either
   * records no stored fact (a site joined) or its state change already committed the same row durably.
   */
  addPublishedEvent(rows: readonly OutboxRow[], now = Date.now()): void {
    this.relaxedCommit(() => this.addOutbox(rows, now));
  }

  /** The oldest rows of `kind` not yet acknowledged by their destination, in commit order. */
  pendingOutbox(kind: OutboxRow['kind'], limit = 100): StoredOutboxRow[] {
    return (this.prepared('SELECT * FROM outbox WHERE kind = ? AND published_at IS NULL ORDER BY pos LIMIT ?').all(kind, limit) as Record<string, unknown>[]).map(toOutbox);
  }

  listOutbox(kind: OutboxRow['kind']): StoredOutboxRow[] {
    return (this.db.prepare('SELECT * FROM outbox WHERE kind = ? ORDER BY pos').all(kind) as Record<string, unknown>[]).map(toOutbox);
  }

  /**
   * Marks rows their destination acknowledged, in one commit that does not wait for the disk (relaxedCommit): a
   * mark lost to a power cut only sends the row again, which its destination drops as a copy (delivery is at least once).
   */
  markOutboxPublished(ids: string | readonly string[], now = Date.now()): void {
    const list = typeof ids === 'string' ? [ids] : ids;
    if (list.length === 0) return;
    const stmt = this.prepared('UPDATE outbox SET published_at = ? WHERE id = ? AND published_at IS NULL');
    this.relaxedCommit(() =>
      this.db.transaction(() => {
        for (const id of list) stmt.run(now, id);
      })(),
    );
  }

  /**
   * Runs `write` as a commit that is not fsync'd (synchronous = NORMAL; the database is in WAL mode). Such a commit
   * survives a crash of this process at once, and power loss from the next ordinary (FULL) commit on, which syncs
   * the whole write-ahead log; the coordinator makes one every few milliseconds while sites call. For writes whose
   * loss to a power cut costs nothing: an fsync per published event was a third of the coordinator's SQLite time
   * at 1,000 sites. Inside a caller's transaction it changes nothing (that transaction's commit decides).
   */
  private relaxedCommit(write: () => void): void {
    if (this.db.inTransaction) return write();
    // Not prepared once: SQLite applies this pragma when the statement is compiled, so a kept statement run again
    // does not reliably set it.
    this.db.pragma('synchronous = NORMAL');
    try {
      write();
    } finally {
      this.db.pragma('synchronous = FULL');
    }
  }

  getUpdate(updateId: string): UpdateRow | undefined {
    const r = this.prepared('SELECT * FROM updates WHERE update_id = ?').get(updateId) as Record<string, unknown> | undefined;
    return r ? toUpdate(r) : undefined;
  }

  updateFor(round: number, site: string): UpdateRow | undefined {
    const r = this.prepared('SELECT * FROM updates WHERE round = ? AND site = ?').get(round, site) as Record<string, unknown> | undefined;
    return r ? toUpdate(r) : undefined;
  }

  updatesForRound(round: number): UpdateRow[] {
    return (this.db.prepare('SELECT * FROM updates WHERE round = ? ORDER BY accepted_at').all(round) as Record<string, unknown>[]).map(toUpdate);
  }

  // ---- metrics ----

  recordMetrics(round: number, site: string, values: Record<string, number>): void {
    const stmt = this.db.prepare('INSERT INTO metrics (round, site, key, value) VALUES (?, ?, ?, ?) ON CONFLICT(round, site, key) DO UPDATE SET value = excluded.value');
    this.db.transaction(() => {
      for (const [k, v] of Object.entries(values)) stmt.run(round, site, k, v);
    })();
  }

  listMetrics(): MetricRow[] {
    return this.db.prepare('SELECT round, site, key, value FROM metrics ORDER BY round, site, key').all() as MetricRow[];
  }
}

function toSite(r: Record<string, unknown>): SiteRow {
  return {
    name: r.name as string,
    state: r.state as SiteState,
    publicKey: (r.public_key as Buffer | null) ?? null,
    invitedAt: r.invited_at as number,
    inviteExpiresAt: r.invite_expires_at as number,
    enrolledAt: (r.enrolled_at as number | null) ?? null,
    revokedAt: (r.revoked_at as number | null) ?? null,
    lastSeenAt: (r.last_seen_at as number | null) ?? null,
    activity: (r.activity as string | null) ?? null,
    engine: (r.engine as string | null) ?? null,
    softwareVersion: (r.software_version as string | null) ?? null,
    leftAt: (r.left_at as number | null) ?? null,
  };
}

/**
 * Columns added after a release whose databases are still in use (CREATE TABLE IF NOT EXISTS leaves an existing
 * table as it is). One immediate transaction, so two processes opening the same older file add each column once.
 * Older releases read the file on with `SELECT *` and never name the new columns.
 */
const ADDED_COLUMNS: readonly { table: string; column: string; type: string }[] = [
  { table: 'sites', column: 'software_version', type: 'TEXT' },
  { table: 'sites', column: 'left_at', type: 'INTEGER' },
];

function addMissingColumns(db: Database.Database): void {
  const missing = () => ADDED_COLUMNS.filter((c) => !(db.prepare(`PRAGMA table_info(${c.table})`).all() as { name: string }[]).some((r) => r.name === c.column));
  if (missing().length === 0) return;
  db.transaction(() => {
    for (const c of missing()) db.exec(`ALTER TABLE ${c.table} ADD COLUMN ${c.column} ${c.type}`);
  }).immediate();
}

function toRound(r: Record<string, unknown>): RoundRow {
  return {
    round: r.round as number,
    state: r.state as RoundRow['state'],
    baseModelHash: r.base_model_hash as string,
    selected: JSON.parse(r.selected as string) as string[],
    openedAt: r.opened_at as number,
    deadlineAt: r.deadline_at as number,
    closedAt: (r.closed_at as number | null) ?? null,
    resultModelHash: (r.result_model_hash as string | null) ?? null,
    note: (r.note as string | null) ?? null,
  };
}

function toUpdate(r: Record<string, unknown>): UpdateRow {
  return {
    updateId: r.update_id as string,
    round: r.round as number,
    site: r.site as string,
    numSamples: r.num_samples as number,
    sha256: r.sha256 as string,
    path: r.path as string,
    sizeBytes: r.size_bytes as number,
    acceptedAt: r.accepted_at as number,
  };
}

function toOutbox(r: Record<string, unknown>): StoredOutboxRow {
  return {
    pos: r.pos as number,
    id: r.id as string,
    kind: r.kind as OutboxRow['kind'],
    body: r.body as string,
    createdAt: r.created_at as number,
    publishedAt: (r.published_at as number | null) ?? null,
  };
}

function toModel(r: Record<string, unknown>): ModelRow {
  return { hash: r.hash as string, path: r.path as string, round: r.round as number, sizeBytes: r.size_bytes as number, createdAt: r.created_at as number };
}
