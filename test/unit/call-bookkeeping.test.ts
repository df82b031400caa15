/**
 * Issue 15 (scale): a site call's token id and last-seen time share group commits instead of two fsync'd
 * transactions each, without weakening replay protection across a restart (coordinator/store/call-bookkeeping.ts).
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { CallBookkeeping } from '../../coordinator/store/call-bookkeeping.ts';
import { waitFor } from '../../cli/processes.ts';

const works: string[] = [];
afterAll(() => {
  for (const w of works) rmSync(w, { recursive: true, force: true });
});
function dbPath(): string {
  const w = mkdtempSync(join(tmpdir(), 'medfl-calls-'));
  works.push(w);
  return join(w, 'state.db');
}
const nowSec = () => Math.floor(Date.now() / 1000);
const key = Buffer.alloc(32, 7);

function enrolled(path: string, ...names: string[]): CoordinatorStore {
  const s = new CoordinatorStore(path);
  for (const n of names) {
    s.inviteSite(n, `hash-${n}`, Date.now() + 60_000);
    s.enrolSite(n, `hash-${n}`, key);
  }
  return s;
}

describe('token ids and last-seen times of site calls', () => {
  it('share a handful of commits for a burst of calls, and refuse a replay at once', async () => {
    const s = enrolled(dbPath(), 'a');
    const before = s.callCommits;
    const exp = nowSec() + 300;
    const spent = await Promise.all(Array.from({ length: 500 }, (_, i) => s.consumeJti(`a/${i}`, exp)));
    expect(spent.every(Boolean)).toBe(true);
    for (let i = 0; i < 500; i++) s.touchSite('a', 'idle', null);
    expect(await s.consumeJti('a/7', exp)).toBe(false);
    // 500 ids and 500 last-seen notes: one transaction each before; now the burst shares one or two.
    expect(s.callCommits - before).toBeLessThanOrEqual(2);
    s.close();
  });

  it('refuses after a kill -9 and restart every id let through before it', async () => {
    const path = dbPath();
    enrolled(path, 'site-a').close();
    const ids = Array.from({ length: 200 }, (_, i) => `site-a/${i}`);
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/jti-spender.ts', path, String(nowSec() + 300), ...ids], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    try {
      await waitFor(() => {
        if (child.exitCode !== null) throw new Error(`the store process exited with ${child.exitCode}`);
        return out.includes('durable ');
      }, 60_000, 'the store process to spend its ids');
      expect(out).toContain('durable 200');
    } finally {
      child.kill('SIGKILL');
    }
    await new Promise((r) => child.once('exit', r));
    // A fresh coordinator store on the same file (the restart): every spent id is still known.
    const s = new CoordinatorStore(path);
    const again = await Promise.all(ids.map((id) => s.consumeJti(id, nowSec() + 300)));
    expect(again.filter(Boolean)).toEqual([]);
    expect(await s.consumeJti('site-a/new', nowSec() + 300)).toBe(true);
    s.close();
  });

  it('shows a site as seen at once in this process, and to other processes within the flush interval', async () => {
    const path = dbPath();
    const s = enrolled(path, 'a');
    const other = new CoordinatorStore(path);
    const t = Date.now();
    s.touchSite('a', 'training', 'onednn', t);
    expect(s.getSite('a')).toMatchObject({ lastSeenAt: t, activity: 'training', engine: 'onednn' });
    expect(s.listSites()[0]).toMatchObject({ lastSeenAt: t, activity: 'training' });
    // A later note without an engine keeps the engine, as the SQL's COALESCE does.
    s.touchSite('a', 'idle', null, t + 1);
    expect(s.getSite('a')).toMatchObject({ lastSeenAt: t + 1, activity: 'idle', engine: 'onednn' });
    await waitFor(() => other.getSite('a')?.lastSeenAt === t + 1, 5_000, 'the last-seen time to reach the database');
    expect(other.getSite('a')).toMatchObject({ activity: 'idle', engine: 'onednn' });
    other.close();
    // Closing writes what is pending.
    s.touchSite('a', 'uploading', null, t + 2);
    s.close();
    const reopened = new CoordinatorStore(path);
    expect(reopened.getSite('a')).toMatchObject({ lastSeenAt: t + 2, activity: 'uploading' });
    reopened.close();
  });

  it('prepares its statements once, not for every commit', async () => {
    const path = dbPath();
    enrolled(path, 'a').close();
    const db = new Database(path);
    const prepare = vi.spyOn(db, 'prepare');
    const calls = new CallBookkeeping(db, { commitDelayMs: 1, lastSeenFlushMs: 50 });
    const exp = nowSec() + 300;
    // One call at a time: each waits for its own commit.
    for (let i = 0; i < 20; i++) {
      calls.touch('a', { activity: 'idle', engine: null, softwareVersion: null }, Date.now());
      expect(await calls.consumeJti(`a/${i}`, exp, nowSec())).toBe(true);
    }
    expect(calls.commits).toBe(20);
    // The replay window's one load at first use, and the four commit statements.
    expect(prepare.mock.calls.length).toBeLessThanOrEqual(5);
    db.close();
  });

  it('on a full database refuses the waiting calls with the storage error, keeps last-seen, and recovers when space returns', async () => {
    const path = dbPath();
    enrolled(path, 'a').close();
    // A connection whose database may not grow: SQLite's own SQLITE_FULL, as on a full disk.
    const db = new Database(path);
    db.pragma('journal_mode = WAL');
    db.exec('CREATE TABLE IF NOT EXISTS filler (x BLOB)');
    const pages = db.pragma('page_count', { simple: true }) as number;
    db.pragma(`max_page_count = ${pages}`);
    // Fill the free pages so that the next insert needs a new one.
    for (;;) {
      try {
        db.prepare('INSERT INTO filler VALUES (zeroblob(1024))').run();
      } catch {
        break;
      }
    }
    const calls = new CallBookkeeping(db, { commitDelayMs: 5, lastSeenFlushMs: 50 });
    const exp = nowSec() + 300;
    calls.touch('a', { activity: 'idle', engine: null, softwareVersion: null }, 1234);
    const refused = await Promise.all(Array.from({ length: 50 }, (_, i) => calls.consumeJti(`a/${'x'.repeat(100)}${i}`, exp, nowSec()).catch((e: Error) => e)));
    expect(refused.every((r) => r instanceof Error && /database or disk is full/.test(r.message))).toBe(true);
    expect(calls.pending('a')).toMatchObject({ at: 1234 });
    // Space returns: the next call goes through and the kept last-seen value is written with it.
    db.pragma(`max_page_count = ${pages * 100}`);
    expect(await calls.consumeJti('a/after', exp, nowSec())).toBe(true);
    expect(calls.pending('a')).toBeUndefined();
    expect((db.prepare('SELECT last_seen_at AS t FROM sites WHERE name = ?').get('a') as { t: number }).t).toBe(1234);
    db.close();
  });
});
