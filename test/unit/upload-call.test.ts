/**
 * The UploadUpdate state machine (coordinator/server/upload-call.ts) without gRPC: a scripted stream of chunks into
 * a real UploadReceiver (partial files on disk) and a fake round engine, checking each way a call can end — one
 * answer, the slot given back once, and no partial file left.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { UploadCall, type UploadCallDeps } from '../../coordinator/server/upload-call.ts';
import { UploadCommits } from '../../coordinator/server/upload-commits.ts';
import { UploadReceiver } from '../../coordinator/server/upload-receiver.ts';
import type { UpdateRow } from '../../coordinator/store/store.ts';
import { waitFor } from '../../cli/processes.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';

const BASE = 'b'.repeat(64);
const specs = [{ name: 'w', shape: [4], dtype: 'F32' as const }];
const payload = encodeSafetensors(makeBundle([{ name: 'w', dtype: 'F32', shape: [4], data: Float32Array.from([1, 2, 3, 4]) }]));

interface Harness {
  call: UploadCall;
  replies: Array<{ err: Partial<grpc.StatusObject> | null; value?: Record<string, unknown> }>;
  released: () => number;
  log: string[];
  rows: UpdateRow[];
  engine: { rejected: string[]; folded: string[]; accepted: string[]; unfolded: string[]; stale: string[]; problem?: string };
  partials: () => string[];
}

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-upload-call-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

function harness(o: { stallMs?: number; insertFails?: Error; known?: UpdateRow; foldsWhileChecking?: boolean; batches?: boolean } = {}): Harness {
  const receiver = new UploadReceiver(join(dir, 'updates'), specs, 1 << 20);
  const replies: Harness['replies'] = [];
  let releases = 0;
  const rows: UpdateRow[] = [];
  const engine: Harness['engine'] = { rejected: [], folded: [], accepted: [], unfolded: [], stale: [] };
  const log: string[] = [];
  const logger = pino({ level: 'warn' }, { write: (l: string) => log.push(JSON.parse(l).msg) });
  const fakeEngine = {
    admissionProblem: () => engine.problem,
    checkAndFold: () => ({ verdict: {}, folded: !!o.foldsWhileChecking }),
    // With `batches` the round folds batches read from the files (as the composed FedAvg does), else one at a time.
    checkAndFoldBatch: (_round: number, items: readonly unknown[]) => (o.batches ? items.map(() => ({})) : undefined),
    unfold: (site: string) => {
      engine.unfolded.push(site);
    },
    unfoldItem: (_round: number, item: { info: { site: string } }) => {
      engine.unfolded.push(item.info.site);
    },
    folded: (row: UpdateRow) => {
      engine.folded.push(`${row.site} before its answer, batched`);
      return true;
    },
    serialised: <T>(fn: () => T | Promise<T>) => Promise.resolve().then(fn),
    aggregateStale: (_round: number, why: string) => {
      engine.stale.push(why);
    },
    acceptedEvent: (row: UpdateRow) => ({ id: row.updateId, type: 'update.accepted' as const, federation: 'f', at: '' }),
    fold: (row: UpdateRow, _update: unknown, opts?: { folded?: boolean }) => {
      engine.folded.push(`${row.site} after ${replies.length} answer(s)${opts?.folded ? ', already folded' : ''}`);
      return true;
    },
    accepted: async (row: UpdateRow) => {
      engine.accepted.push(row.updateId);
    },
    rejected: (_site: string, _round: number, reason: string) => {
      engine.rejected.push(reason);
    },
  };
  const store = {
    getUpdate: (id: string) => (o.known?.updateId === id ? o.known : undefined),
    insertUpdate: (row: UpdateRow) => {
      if (o.insertFails) throw o.insertFails;
      rows.push(row);
    },
    insertUpdates: (updates: readonly { row: UpdateRow }[]) => {
      if (o.insertFails) throw o.insertFails;
      rows.push(...updates.map((u) => u.row));
    },
  };
  const deps: UploadCallDeps = {
    site: 'site-a',
    store,
    engine: fakeEngine,
    receiver,
    commits: new UploadCommits({ engine: fakeEngine, store, receiver, log: logger }),
    log: logger,
    stream: { pause: () => undefined, resume: () => undefined },
    reply: (err, value) => replies.push({ err: err as Partial<grpc.StatusObject> | null, value: value as Record<string, unknown> | undefined }),
    answerSent: () => new Promise((r) => setTimeout(r, 5)),
    releaseSlot: () => releases++,
    stallMs: o.stallMs ?? 60_000,
    backlogBytes: 1 << 20,
  };
  return { call: new UploadCall(deps), replies, released: () => releases, log, rows, engine, partials: () => readdirSync(join(dir, 'updates', '.partial')) };
}

const header = (over: Record<string, unknown> = {}) => ({ part: 'header', header: { updateId: 'update-0001', round: 1, taskId: 'r1-site-a', baseModelHash: BASE, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4, ...over } });
const chunk = (offset: number, bytes: Uint8Array) => ({ part: 'data', offset, data: Buffer.from(bytes) });

describe('UploadCall', () => {
  it('accepts a whole upload: stored, answered, then folded and announced; the slot is given back once', async () => {
    const h = harness();
    h.call.data(header());
    expect(h.call.current).toBe('receiving');
    h.call.data(chunk(0, payload));
    h.call.end();
    expect(h.call.current).toBe('finishing');
    h.call.abort(); // a late 'cancelled' while finishing: the answer still comes and gives the slot back
    expect(h.released()).toBe(0);
    await waitFor(() => h.engine.accepted.length === 1, 5000, 'the update to be accepted');
    expect(h.replies).toEqual([{ err: null, value: { updateId: 'update-0001', accepted: true, duplicate: false, reason: '' } }]);
    expect(h.rows.map((r) => [r.site, r.numSamples, r.sha256])).toEqual([['site-a', 4, sha256Hex(payload)]]);
    // The ack went out before the fold.
    expect(h.engine.folded).toEqual(['site-a after 1 answer(s)']);
    expect(h.call.current).toBe('answered');
    expect(h.released()).toBe(1);
    expect(h.partials()).toEqual([]);
  });

  it('refuses at the header what the round does not admit, once, and ignores what follows', () => {
    const h = harness();
    h.engine.problem = 'round 1 is closing';
    h.call.data(header());
    h.call.data(chunk(0, payload));
    h.call.end();
    expect(h.replies).toEqual([{ err: null, value: { updateId: 'update-0001', accepted: false, duplicate: false, reason: 'round 1 is closing' } }]);
    expect(h.engine.rejected).toEqual(['round 1 is closing']);
    expect(h.released()).toBe(1);
    expect(h.partials()).toEqual([]);
  });

  it('answers a retried update id as a duplicate, and refuses one that belongs to another site', () => {
    const known = { updateId: 'update-0001', round: 1, site: 'site-a', numSamples: 4, sha256: 'a'.repeat(64), path: '', sizeBytes: 1, acceptedAt: 0 };
    const same = harness({ known });
    same.call.data(header());
    expect(same.replies[0]!.value).toMatchObject({ accepted: true, duplicate: true });
    const other = harness({ known: { ...known, site: 'site-b' } });
    other.call.data(header());
    expect(other.replies[0]!.value).toMatchObject({ accepted: false, reason: 'update id belongs to another site' });
  });

  it('refuses a stream that does not start with a header, or ends before any data', () => {
    const a = harness();
    a.call.data(chunk(0, payload));
    expect(a.replies[0]!.value).toMatchObject({ accepted: false, reason: 'the first chunk must carry the update header' });
    const b = harness();
    b.call.end();
    expect(b.replies[0]!.value).toMatchObject({ accepted: false, reason: 'upload ended before any data arrived' });
  });

  it('refuses an upload that ends short, deleting its partial file', async () => {
    const h = harness();
    h.call.data(header());
    h.call.data(chunk(0, payload.subarray(0, 10)));
    h.call.end();
    await waitFor(() => h.replies.length === 1, 5000, 'the answer');
    expect(h.replies[0]!.value).toMatchObject({ accepted: false, reason: expect.stringMatching(/upload ended after 10 of \d+ bytes/) });
    expect(h.partials()).toEqual([]);
    expect(h.released()).toBe(1);
  });

  it('answers a storage failure with UNAVAILABLE (the site sends it again), leaving nothing behind', async () => {
    const h = harness({ insertFails: Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' }) });
    h.call.data(header());
    h.call.data(chunk(0, payload));
    h.call.end();
    await waitFor(() => h.replies.length === 1, 5000, 'the answer');
    expect(h.replies[0]!.err).toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/cannot store the update now/) });
    expect(h.engine.rejected).toEqual([]);
    expect(readdirSync(join(dir, 'updates', 'round-1'))).toEqual([]);
    expect(h.partials()).toEqual([]);
  });

  it('an update folded while it was checked is taken out again when storing it fails, and recorded as folded when it is stored', async () => {
    const failing = harness({ foldsWhileChecking: true, insertFails: Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' }) });
    failing.call.data(header());
    failing.call.data(chunk(0, payload));
    failing.call.end();
    await waitFor(() => failing.replies.length === 1, 5000, 'the answer');
    expect(failing.replies[0]!.err).toMatchObject({ code: grpc.status.UNAVAILABLE });
    expect(failing.engine.unfolded).toEqual(['site-a']);
    expect(failing.engine.folded).toEqual([]);

    const stored = harness({ foldsWhileChecking: true });
    stored.call.data(header());
    stored.call.data(chunk(0, payload));
    stored.call.end();
    await waitFor(() => stored.engine.accepted.length === 1, 5000, 'the update to be accepted');
    expect(stored.engine.unfolded).toEqual([]);
    expect(stored.engine.folded).toEqual(['site-a after 1 answer(s), already folded']);
  });

  it('a batch-folded update is stored, counted and then answered; when storing it fails it is taken out again and its file deleted', async () => {
    const stored = harness({ batches: true });
    stored.call.data(header());
    stored.call.data(chunk(0, payload));
    stored.call.end();
    await waitFor(() => stored.engine.accepted.length === 1, 5000, 'the update to be accepted');
    expect(stored.replies).toEqual([{ err: null, value: { updateId: 'update-0001', accepted: true, duplicate: false, reason: '' } }]);
    expect(stored.engine.folded).toEqual(['site-a before its answer, batched']);
    expect(readdirSync(join(dir, 'updates', 'round-1'))).toEqual(['site-a-update-0001.safetensors']);
    expect(stored.partials()).toEqual([]);

    rmSync(join(dir, 'updates'), { recursive: true, force: true });
    const failing = harness({ batches: true, insertFails: Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' }) });
    failing.call.data(header());
    failing.call.data(chunk(0, payload));
    failing.call.end();
    await waitFor(() => failing.replies.length === 1, 5000, 'the answer');
    expect(failing.replies[0]!.err).toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/cannot store the update now/) });
    expect(failing.engine.unfolded).toEqual(['site-a']);
    expect(failing.engine.folded).toEqual([]);
    expect(readdirSync(join(dir, 'updates', 'round-1'))).toEqual([]);
    expect(failing.partials()).toEqual([]);
  });

  it('drops a stalled upload with UNAVAILABLE and deletes its partial file', async () => {
    const h = harness({ stallMs: 50 });
    h.call.data(header());
    h.call.data(chunk(0, payload.subarray(0, 10)));
    await waitFor(() => h.replies.length === 1, 5000, 'the stall');
    expect(h.replies[0]!.err).toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/nothing arrived for 0.1 s/) });
    expect(h.log).toContain('upload stalled: nothing arrived; partial data deleted (the site sends it again)');
    await waitFor(() => h.partials().length === 0, 5000, 'the partial file to go');
    expect(h.released()).toBe(1);
  });

  it('a call cut off while receiving gives its slot and partial file back without an answer', async () => {
    const h = harness();
    h.call.data(header());
    h.call.data(chunk(0, payload.subarray(0, 10)));
    h.call.abort();
    expect(h.replies).toEqual([]);
    expect(h.released()).toBe(1);
    expect(h.log).toContain('upload cut off before it ended: partial data deleted');
    await waitFor(() => h.partials().length === 0, 5000, 'the partial file to go');
  });
});
