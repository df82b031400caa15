/**
 * Writes a file from a stream of chunks on a worker thread and hashes (SHA-256) what it writes, so the
 * event loop that receives the chunks over gRPC spends no time in write(2) or SHA-256. Used for uploads at
 * the coordinator (PartialUpload) and model downloads at the site (ModelCache).
 *
 * Why a thread: on a loaded machine, writing ~130 MB into fresh page-cache pages costs 0.1–0.4 s of system
 * CPU and SHA-256 another ~0.1 s; done on the event loop, both stall the HTTP/2 session that is receiving
 * the next chunks (bench/README.md). Here the event loop only posts each chunk, transferring its memory
 * when the chunk owns a whole ArrayBuffer (a gRPC message's buffer), copying it otherwise. The thread hashes
 * each chunk while libuv's thread pool writes it, so a chunk costs the longer of the two, not their sum.
 *
 * Callers bound the memory in flight themselves: `queuedBytes` says how much is posted but not yet written,
 * and `whenBelow()` resolves once it has dropped under a limit (pause the source in between).
 *
 * One thread per process, started on first use from an inline CommonJS script (no loader needed, so it
 * works under tsx, vitest and the CLI alike) and unref'd whenever no file is open.
 */
import { Worker } from 'node:worker_threads';
import { closeSync, openSync, unlinkSync } from 'node:fs';

const WORKER_SOURCE = `
'use strict';
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const files = new Map();
const fail = (id, f, e) => {
  if (f.error) return;
  f.error = e && e.message ? e.message : String(e);
  parentPort.postMessage({ op: 'error', id, message: f.error });
};
// Writes all of b at pos on the libuv thread pool (pwrite may write less than asked).
const writeAll = (fd, b, pos, done) => {
  const step = (off) =>
    fs.write(fd, b, off, b.length - off, pos + off, (e, n) => {
      if (e) return done(e);
      if (off + n < b.length) return step(off + n);
      done(null);
    });
  step(0);
};
// Runs once no write of this file is in flight (finish and discard must not fsync or close under one).
const whenIdle = (f, then) => {
  if (f.pending === 0) then();
  else f.idle = then;
};
// One operation of this file is over: if it was the last one in flight, run what waits for that.
const settled = (f) => {
  f.pending--;
  if (f.pending === 0 && f.idle) {
    const then = f.idle;
    f.idle = undefined;
    then();
  }
};
// Progressive sync: every syncEvery bytes written, an fdatasync on the thread pool (not awaited), so the disk
// flushes while the rest still arrives and the closing fsync finds little left. Like RocksDB's bytes_per_sync.
// A failed fdatasync fails the file: after an error the kernel may report a later fsync as clean.
const startSync = (id, f) => {
  if (!f.syncEvery || f.syncing || f.error || f.closing || f.unsynced < f.syncEvery) return;
  f.syncing = true;
  f.unsynced = 0;
  f.syncs++;
  f.pending++;
  fs.fdatasync(f.fd, (e) => {
    f.syncing = false;
    if (e) fail(id, f, e);
    settled(f);
  });
};
// The chunk's memory goes back only to a sender that reuses it (back: true). Otherwise it is dropped here and freed by
// this thread's small heap: sent back unasked, every chunk became garbage on the receiving event loop instead, whose
// collector then ran over the whole process heap (bench/README.md, bench/transfer-cpu.ts).
const returnMemory = (id, b, back) =>
  back ? parentPort.postMessage({ op: 'written', id, bytes: b.length, data: b }, [b.buffer]) : parentPort.postMessage({ op: 'written', id, bytes: b.length });
parentPort.on('message', (m) => {
  const f = files.get(m.id);
  switch (m.op) {
    case 'open': {
      const file = { fd: m.fd, hash: createHash('sha256'), error: undefined, pending: 0, idle: undefined, closing: false, syncEvery: m.syncEvery, unsynced: 0, syncing: false, syncs: 0 };
      files.set(m.id, file);
      try {
        // Resuming: hash the bytes already in the file, so the digest covers all of it.
        const buf = Buffer.allocUnsafe(Math.min(m.hashExisting, 4 << 20));
        for (let pos = 0; pos < m.hashExisting; ) {
          const n = fs.readSync(m.fd, buf, 0, Math.min(buf.length, m.hashExisting - pos), pos);
          if (n === 0) throw new Error('file is shorter than the ' + m.hashExisting + ' bytes to resume from');
          file.hash.update(n === buf.length ? buf : buf.subarray(0, n));
          pos += n;
        }
      } catch (e) {
        fail(m.id, file, e);
      }
      return;
    }
    case 'write': {
      const b = m.data;
      if (!f || f.error || f.closing) return returnMemory(m.id, b, m.back);
      // The thread pool writes the chunk while this thread hashes it: both only read b, and its memory goes
      // back (the sender reuses it for later chunks) once the write is done, after the hash.
      f.pending++;
      writeAll(f.fd, b, m.position, (e) => {
        if (e) fail(m.id, f, e);
        f.unsynced += b.length; // before returnMemory, which may detach b
        returnMemory(m.id, b, m.back);
        startSync(m.id, f);
        settled(f);
      });
      try {
        f.hash.update(b);
      } catch (e) {
        fail(m.id, f, e);
      }
      return;
    }
    case 'finish': {
      // The descriptor belongs to the main thread, which closes it on 'finished' / 'dropped'.
      if (!f) return;
      f.closing = true;
      whenIdle(f, () => {
        files.delete(m.id);
        let error = f.error;
        try {
          if (!error && m.fsync) fs.fsyncSync(f.fd);
        } catch (e) {
          error = e && e.message ? e.message : String(e);
        }
        parentPort.postMessage(error ? { op: 'finished', id: m.id, error } : { op: 'finished', id: m.id, digest: f.hash.digest('hex'), syncs: f.syncs });
      });
      return;
    }
    case 'discard': {
      const dropped = () => {
        files.delete(m.id);
        parentPort.postMessage({ op: 'dropped', id: m.id });
      };
      if (!f) return dropped();
      f.closing = true;
      whenIdle(f, dropped);
      return;
    }
  }
});
`;

type FromWorker =
  | { op: 'written'; id: number; bytes: number; data?: Uint8Array }
  | { op: 'error'; id: number; message: string }
  | { op: 'finished'; id: number; digest?: string; error?: string; syncs?: number }
  | { op: 'dropped'; id: number };

/** The process's writer thread and the files it has open. */
class WriterThread {
  private worker: Worker | undefined;
  private readonly files = new Map<number, HashingFileWriter>();
  private nextId = 1;

  register(file: HashingFileWriter): number {
    const id = this.nextId++;
    this.files.set(id, file);
    const w = this.start();
    if (this.files.size === 1) w.ref();
    return id;
  }

  unregister(id: number): void {
    if (!this.files.delete(id)) return;
    if (this.files.size === 0) this.worker?.unref();
  }

  post(msg: Record<string, unknown>, transfer?: ArrayBuffer[]): void {
    this.start().postMessage(msg, transfer);
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(WORKER_SOURCE, { eval: true, name: 'medfl-file-writer' });
    w.unref();
    w.on('message', (m: FromWorker) => this.files.get(m.id)?.fromWorker(m));
    const died = (e: Error) => {
      if (this.worker !== w) return;
      this.worker = undefined;
      const open = [...this.files.values()];
      this.files.clear();
      for (const f of open) f.threadDied(e);
    };
    w.on('error', died);
    w.on('exit', (code) => died(new Error(`file writer thread exited (code ${code})`)));
    this.worker = w;
    return w;
  }
}

let thread: WriterThread | undefined;
const writerThread = (): WriterThread => (thread ??= new WriterThread());

/**
 * progressiveSyncBytes: the sync interval for files that end with an fsync (uploads at the coordinator, model
 * downloads at the site). On a disk writing 300 MB/s (blkio-throttled here) it cut the closing fsync of a 132 MB
 * file from 430 ms to ~2 ms and an upload to the ack from 940–960 to 585–615 ms; on this VM's unthrottled disk,
 * 578–606 to 536–567 (bench/README.md). 2 MiB did as well, 32 MiB left 60 ms. An object, so that a bench can change
 * it to compare (the transport bench did, before bench:wan replaced it).
 */
export const fileSyncOptions = { progressiveSyncBytes: 8 << 20 };

/** Below this, a chunk is copied rather than transferred (small buffers may share Node's pool). */
const MIN_TRANSFER_BYTES = 64 * 1024;
/**
 * A chunk is transferred only when its ArrayBuffer holds little else (a gRPC message: chunk + framing, in a
 * buffer sized for the largest message): at most this many bytes or an eighth of the chunk beside it.
 */
const MAX_TRANSFER_SLACK = 256;
const transferSlack = (n: number): number => Math.max(MAX_TRANSFER_SLACK, n / 8);

export class HashingFileWriter {
  private readonly id: number;
  private fd: number | undefined;
  private queued = 0;
  private failure: Error | undefined;
  private waiters: { limit: number; resolve: () => void }[] = [];
  private result: Promise<string> | undefined;
  private settle: { resolve: (digest: string) => void; reject: (e: Error) => void } | undefined;
  private state: 'open' | 'finishing' | 'finished' | 'discarded' = 'open';
  private dropping = false;
  private syncs = 0;
  /** Called once, on the first write failure (or loss of the writer thread); `write` throws it afterwards. */
  onError?: (e: Error) => void;
  /**
   * Gets the memory of each chunk written after it was set back (transferred or copied), for the caller to reuse.
   * Unset, the memory stays with the writer thread, which frees it: cheaper for a caller that would only drop it.
   */
  onWritten?: (memory: Uint8Array) => void;

  /**
   * Opens `path` for writing. `hashExisting` > 0 resumes a file that already holds that many bytes: they are
   * kept and hashed (on the thread) before the new chunks, which continue at that position. `syncEveryBytes` > 0
   * starts an fdatasync after every that many bytes written, not waited for, so that a closing fsync
   * (finish()) has little left to flush; any failure of one fails the file.
   */
  constructor(readonly path: string, opts: { mode?: number; hashExisting?: number; syncEveryBytes?: number } = {}) {
    const existing = opts.hashExisting ?? 0;
    this.fd = openSync(path, existing > 0 ? 'r+' : 'w', opts.mode ?? 0o644);
    const t = writerThread();
    this.id = t.register(this);
    t.post({ op: 'open', id: this.id, fd: this.fd, hashExisting: existing, syncEvery: opts.syncEveryBytes ?? 0 });
  }

  /** Bytes posted to the thread and not yet written. */
  get queuedBytes(): number {
    return this.queued;
  }

  get error(): Error | undefined {
    return this.failure;
  }

  /** How many progressive fdatasyncs ran while the file was written (known once finish() has resolved). */
  get progressiveSyncs(): number {
    return this.syncs;
  }

  /**
   * Queues `data` to be written at `position`. When `transfer` is set and `data` is (nearly) all of its
   * ArrayBuffer, that memory moves to the thread and `data` is left detached (empty) here: pass it only
   * for buffers nobody reads afterwards. Throws the first write failure, if any.
   */
  write(data: Uint8Array, position: number, transfer = false): void {
    if (this.failure) throw this.failure;
    if (this.state !== 'open') throw new Error(`file ${this.path} is already ${this.state}`);
    const n = data.byteLength;
    if (n === 0) return;
    let sent = false;
    const ab = data.buffer;
    const back = this.onWritten !== undefined;
    if (transfer && ab instanceof ArrayBuffer && n >= MIN_TRANSFER_BYTES && ab.byteLength - n <= transferSlack(n)) {
      try {
        writerThread().post({ op: 'write', id: this.id, data, position, back }, [ab]);
        sent = true;
      } catch {
        // Not transferable (e.g. memory owned by native code): copy below.
      }
    }
    if (!sent) {
      const copy = new Uint8Array(n);
      copy.set(data);
      writerThread().post({ op: 'write', id: this.id, data: copy, position, back }, [copy.buffer]);
    }
    this.queued += n;
  }

  /** Resolves once no more than `limit` bytes are queued (at once if so already, or after a failure). */
  whenBelow(limit: number): Promise<void> {
    if (this.queued <= limit || this.failure || this.state === 'discarded') return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ limit, resolve }));
  }

  /**
   * Waits for every queued chunk, has the thread fsync the file (unless `fsync: false`), then closes it.
   * Resolves the SHA-256 (hex) of the whole file; rejects on any write or fsync failure.
   * Idempotent: later calls return the same promise.
   */
  finish(opts: { fsync?: boolean } = {}): Promise<string> {
    if (this.result) return this.result;
    if (this.state === 'discarded') return (this.result = Promise.reject(new Error(`file ${this.path} was discarded`)));
    if (this.failure) {
      this.discardFd();
      return (this.result = Promise.reject(this.failure));
    }
    this.state = 'finishing';
    this.result = new Promise<string>((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    writerThread().post({ op: 'finish', id: this.id, fsync: opts.fsync ?? true });
    return this.result;
  }

  /**
   * Deletes the file now and drops whatever is still queued (the descriptor is closed once the thread has
   * finished the chunk it is writing). Safe to call at any time, also after finish().
   */
  discard(): void {
    try { unlinkSync(this.path); } catch { /* already gone or moved */ }
    if (this.state === 'discarded' || this.state === 'finished') return;
    const wasFinishing = this.state === 'finishing';
    this.state = 'discarded';
    if (!wasFinishing) this.discardFd();
    this.release();
  }

  /** @internal messages from the thread */
  fromWorker(m: FromWorker): void {
    if (m.op === 'written') {
      this.queued -= m.bytes;
      if (m.data) this.onWritten?.(m.data);
      this.release();
      return;
    }
    if (m.op === 'error') {
      this.fail(new Error(m.message));
      return;
    }
    // finished or dropped: the thread is done with the descriptor.
    this.closeFd();
    writerThread().unregister(this.id);
    if (m.op === 'dropped') return;
    const s = this.settle;
    this.settle = undefined;
    if (this.state === 'discarded') {
      s?.reject(new Error(`file ${this.path} was discarded`));
      return;
    }
    this.state = 'finished';
    this.syncs = m.syncs ?? 0;
    if (m.error !== undefined || !m.digest) s?.reject(this.failure ?? new Error(m.error ?? 'no digest'));
    else s?.resolve(m.digest);
  }

  /** @internal the thread died: nothing queued will be written. */
  threadDied(e: Error): void {
    this.closeFd(); // the thread is gone, so nothing else uses the descriptor
    this.queued = 0;
    this.fail(e);
    const s = this.settle;
    this.settle = undefined;
    s?.reject(this.failure!);
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.release();
    if (this.state === 'open') this.onError?.(e);
  }

  /** Asks the thread to drop what is queued; the descriptor is closed when it confirms ('dropped'). */
  private discardFd(): void {
    if (this.fd === undefined || this.dropping) return;
    this.dropping = true;
    writerThread().post({ op: 'discard', id: this.id });
  }

  private closeFd(): void {
    if (this.fd === undefined) return;
    try { closeSync(this.fd); } catch { /* already closed */ }
    this.fd = undefined;
  }

  private release(): void {
    if (this.waiters.length === 0) return;
    const ready = this.waiters.filter((w) => this.queued <= w.limit || this.failure || this.state === 'discarded');
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve();
  }
}
