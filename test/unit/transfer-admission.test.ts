/**
 * The coordinator's transfer gates (coordinator/server/transfer-admission.ts): first come first served, a slot given
 * back however a transfer ends (done, failed, cut off while waiting, its start throwing), never twice, and limits
 * derived from memory unless coordinator.json or the options set them.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { TransferAdmission, TransferGate, defaultTransferLimits, resolveTransferLimits, type TransferTicket } from '../../coordinator/server/transfer-admission.ts';

const tick = () => new Promise<void>((r) => process.nextTick(r));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** Admits `n` transfers named 0…n-1 and records the order they start in. */
function admitMany(gate: TransferGate, n: number): { started: number[]; tickets: TransferTicket[] } {
  const started: number[] = [];
  const tickets = Array.from({ length: n }, (_, i) => {
    const r = gate.admit(() => started.push(i));
    if (!r.ticket) throw new Error(`transfer ${i} refused: ${r.refused}`);
    return r.ticket;
  });
  return { started, tickets };
}

describe('a transfer gate', () => {
  it('runs the first `limit` at once and the rest in arrival order, whichever transfer ends first', async () => {
    const gate = new TransferGate('download', 2, Number.POSITIVE_INFINITY);
    const { started, tickets } = admitMany(gate, 6);
    expect(started).toEqual([0, 1]);
    expect(tickets.map((t) => t.state)).toEqual(['running', 'running', 'waiting', 'waiting', 'waiting', 'waiting']);
    tickets[1]!.release();
    // The next in line starts on the next tick, never inside the release that freed its slot.
    expect(started).toEqual([0, 1]);
    await tick();
    expect(started).toEqual([0, 1, 2]);
    tickets[0]!.release();
    tickets[2]!.release();
    await tick();
    expect(started).toEqual([0, 1, 2, 3, 4]);
    expect(gate.stats()).toMatchObject({ running: 2, waiting: 1, peakRunning: 2, peakWaiting: 4, queued: 4, refused: 0 });
  });

  it('gives a slot back once however often the transfer is released', async () => {
    const gate = new TransferGate('upload', 1, 10);
    const { started, tickets } = admitMany(gate, 3);
    tickets[0]!.release();
    tickets[0]!.release();
    tickets[0]!.release();
    await tick();
    expect(started).toEqual([0, 1]);
    expect(gate.stats()).toMatchObject({ running: 1, waiting: 1 });
  });

  it('forgets a transfer cut off while it waits: it never starts and holds no slot', async () => {
    const gate = new TransferGate('download', 1, Number.POSITIVE_INFINITY);
    const { started, tickets } = admitMany(gate, 4);
    tickets[1]!.release();
    tickets[2]!.release();
    expect(gate.stats()).toMatchObject({ running: 1, waiting: 1 });
    tickets[0]!.release();
    await tick();
    expect(started).toEqual([0, 3]);
    tickets[3]!.release();
    expect(gate.stats()).toMatchObject({ running: 0, waiting: 0 });
  });

  it('passes the slot on when a transfer is cut off between its turn coming and its start', async () => {
    const gate = new TransferGate('download', 1, Number.POSITIVE_INFINITY);
    const { started, tickets } = admitMany(gate, 3);
    tickets[0]!.release();
    expect(tickets[1]!.state).toBe('running');
    tickets[1]!.release(); // before its start ran
    await tick();
    await tick();
    expect(started).toEqual([0, 2]);
    expect(gate.stats()).toMatchObject({ running: 1, waiting: 0 });
  });

  it('gives the slot back when a start throws, reports it, and goes on with the next', async () => {
    const errors: unknown[] = [];
    const gate = new TransferGate('upload', 1, 10, (e) => errors.push(e));
    const started: string[] = [];
    const first = gate.admit(() => started.push('first')).ticket!;
    gate.admit(() => {
      throw new Error('broken start');
    });
    gate.admit(() => started.push('third'));
    first.release();
    await tick();
    await tick();
    expect(errors.map((e) => (e as Error).message)).toEqual(['broken start']);
    expect(started).toEqual(['first', 'third']);
    expect(gate.stats()).toMatchObject({ running: 1, waiting: 0 });
  });

  it('refuses a transfer when all slots run and the waiting room is full, and takes one again once a slot frees', async () => {
    const gate = new TransferGate('upload', 2, 1);
    const { tickets } = admitMany(gate, 3);
    const refused = gate.admit(() => undefined);
    expect(refused.refused).toMatch(/running 2 uploads with 1 more waiting/);
    tickets[0]!.release();
    await tick();
    expect(gate.admit(() => undefined).ticket?.state).toBe('waiting');
    expect(gate.stats()).toMatchObject({ running: 2, waiting: 1, refused: 1 });
  });

  it('refuses nonsense limits', () => {
    expect(() => new TransferGate('download', 0, 1)).toThrow(/integer ≥ 1/);
    expect(() => new TransferGate('upload', 1, -1)).toThrow(/integer ≥ 0/);
  });

  it('never refuses a download (a waiting one holds no buffer), whatever the upload waiting room', () => {
    const a = new TransferAdmission({ maxDownloads: 1, maxUploads: 1, maxWaitingUploads: 0 });
    for (let i = 0; i < 100; i++) expect(a.downloads.admit(() => undefined).ticket).toBeDefined();
    expect(a.uploads.admit(() => undefined).ticket).toBeDefined();
    expect(a.uploads.admit(() => undefined).refused).toBeDefined();
  });
});

describe('transfer limits', () => {
  it('follow memory and transfer size within their bounds', () => {
    // 1 MB model, 24 GiB: memory allows more than the concurrency bound.
    expect(defaultTransferLimits({ transferBytes: 1 * MiB, memoryBytes: 24 * GiB })).toEqual({ maxDownloads: 64, maxUploads: 64, maxWaitingUploads: 768 });
    // 130 MB Med3D model, 24 GiB: a running upload holds a window (32 MiB), its 16 MiB backlog and a 2 MiB message;
    // a running download only its chunk buffers, whatever the model's size, so downloads stay at the concurrency bound.
    expect(defaultTransferLimits({ transferBytes: 130 * MiB, memoryBytes: 24 * GiB })).toEqual({ maxDownloads: 64, maxUploads: 7, maxWaitingUploads: 24 });
    // A small machine still runs two uploads at once.
    expect(defaultTransferLimits({ transferBytes: 130 * MiB, memoryBytes: 1 * GiB })).toMatchObject({ maxUploads: 2, maxWaitingUploads: 2 });
    // Downloads are bounded by memory only on a tiny machine: a 64 MiB cgroup runs four.
    expect(defaultTransferLimits({ transferBytes: 130 * MiB, memoryBytes: 64 * MiB }).maxDownloads).toBe(4);
    // A narrower receive window holds less per waiting and per running upload, so more fit the same memory.
    expect(defaultTransferLimits({ transferBytes: 130 * MiB, memoryBytes: 24 * GiB, windowBytes: 1 * MiB })).toEqual({ maxDownloads: 64, maxUploads: 20, maxWaitingUploads: 768 });
    expect(defaultTransferLimits({ transferBytes: 130 * MiB, memoryBytes: 24 * GiB, windowBytes: 65_535 })).toEqual({ maxDownloads: 64, maxUploads: 21, maxWaitingUploads: 12_288 });
  });

  it('take what coordinator.json and the options set, and name a bad one', () => {
    const defaults = { maxDownloads: 64, maxUploads: 64, maxWaitingUploads: 768 };
    expect(resolveTransferLimits(defaults, { maxDownloads: 8 }, { maxUploads: 4, maxDownloads: undefined })).toEqual({ maxDownloads: 8, maxUploads: 4, maxWaitingUploads: 768 });
    expect(() => resolveTransferLimits(defaults, { maxUploads: 0 })).toThrow(/bad transfer limits: maxUploads/);
  });

  it("are checked in coordinator.json, with the file and the field named", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-transfer-config-'));
    try {
      const home = await CoordinatorHome.init(dir, { hosts: ['localhost'] });
      const config = home.config();
      writeFileSync(home.configPath, JSON.stringify({ ...config, transfers: { maxDownloads: 16 } }));
      expect(home.config().transfers).toEqual({ maxDownloads: 16 });
      writeFileSync(home.configPath, JSON.stringify({ ...config, transfers: { maxDownloads: 1.5 } }));
      expect(() => home.config()).toThrow(/coordinator\.json is not a valid coordinator configuration: transfers\.maxDownloads/);
      writeFileSync(home.configPath, JSON.stringify({ ...config, transfers: { maxDownload: 16 } }));
      expect(() => home.config()).toThrow(/transfers.*maxDownload/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
