/**
 * Admission control of the coordinator's bulk transfers: at most `maxDownloads` model downloads and `maxUploads`
 * update uploads run at once; the others wait their turn in arrival order (FIFO), and uploads beyond
 * `maxWaitingUploads` waiting are refused with RESOURCE_EXHAUSTED, which every site version retries until the
 * round's deadline (the update is kept, nothing is lost).
 *
 * Why: every connection can hold up to an HTTP/2 window of a transfer's bytes, so with a thousand sites transferring
 * at once the coordinator's memory grew with sites × window and its event loop had no time left for heartbeats.
 * With the gate, memory grows with the limits instead of with the number of sites.
 *
 * A waiting download holds nothing but its call (no buffer, no file). A waiting upload may hold what its site sent
 * before the coordinator stopped reading (at most one window, or the update if smaller), hence the cap on waiting
 * uploads. Unary calls (heartbeats, metrics, task streams) never pass through here.
 */
import { totalmem } from 'node:os';
import { z } from 'zod';
import { CHUNK_BYTES, SERVER_FLOW_CONTROL_WINDOW } from '../../shared/protocol/grpc.ts';
import { DOWNLOAD_CHUNK_BYTES } from './model-stream.ts';

export type TransferDirection = 'download' | 'upload';

export const TransferLimitsSchema = z
  .object({
    /** Model downloads served at once. */
    maxDownloads: z.number().int().min(1).max(100_000),
    /** Update uploads received at once. */
    maxUploads: z.number().int().min(1).max(100_000),
    /** Uploads that may wait for a slot; more are refused with RESOURCE_EXHAUSTED (sites send them again later). */
    maxWaitingUploads: z.number().int().min(0).max(1_000_000),
  })
  .strict();
export type TransferLimits = z.infer<typeof TransferLimitsSchema>;

/** What coordinator.json's `transfers` may set; each limit left out takes its default (defaultTransferLimits). */
export const TransferLimitsConfigSchema = TransferLimitsSchema.partial();
export type TransferLimitsConfig = z.infer<typeof TransferLimitsConfigSchema>;

/** Share of the machine's memory the default limits let transfers hold (running ones and waiting uploads). */
const TRANSFER_MEMORY_SHARE = 1 / 16;
/** Default concurrency stays within these bounds whatever the memory: enough to fill a link, few enough for two cores. */
const MIN_DEFAULT_CONCURRENCY = 2;
const MAX_DEFAULT_CONCURRENCY = 64;

/** Upload bytes allowed to wait for the file-writer thread before an upload call stops reading. */
export const UPLOAD_BACKLOG_BYTES = 16 * 1024 * 1024;
/**
 * What one running download holds, whatever the model's size: its two chunk buffers (model-stream.ts) and the TLS
 * write they make, rounded up. It sends a chunk only once the kernel took the one before, so the site's receive
 * window stays in the network, not here.
 */
export const RUNNING_DOWNLOAD_BYTES = 4 * DOWNLOAD_CHUNK_BYTES;

/**
 * Limits for a machine with `memoryBytes` (default: this one's, or its cgroup limit when lower) and transfers of up to
 * `transferBytes` each (the model file, the largest update). A quarter of the transfer budget goes to running downloads,
 * a quarter to running uploads and half to waiting uploads. The two directions hold different memory: a running
 * download little (RUNNING_DOWNLOAD_BYTES), a running upload one window of its bytes (what HTTP/2 lets its site send
 * unread), its backlog for the file writer and the message being assembled; a waiting upload one window of its bytes.
 * The window is the coordinator's receive window (`windowBytes`, coordinator.json's `receiveWindow`; default 32 MiB),
 * so a narrower window lets more uploads run and wait in the same memory.
 */
export function defaultTransferLimits(o: { transferBytes: number; memoryBytes?: number; windowBytes?: number }): TransferLimits {
  const memory = o.memoryBytes ?? machineMemoryBytes();
  const budget = memory * TRANSFER_MEMORY_SHARE;
  const size = Math.max(1, o.transferBytes);
  const inWindow = Math.min(size, o.windowBytes ?? SERVER_FLOW_CONTROL_WINDOW);
  const runningUpload = inWindow + Math.min(size, UPLOAD_BACKLOG_BYTES) + Math.min(size, CHUNK_BYTES);
  const concurrency = (holds: number) => clamp(Math.floor(budget / 4 / holds), MIN_DEFAULT_CONCURRENCY, MAX_DEFAULT_CONCURRENCY);
  const maxUploads = concurrency(runningUpload);
  return { maxDownloads: concurrency(RUNNING_DOWNLOAD_BYTES), maxUploads, maxWaitingUploads: Math.max(maxUploads, Math.floor(budget / 2 / inWindow)) };
}

/**
 * `defaults` with each limit that `overrides` set (later ones win; undefined leaves the one before), checked: a bad
 * limit is an error naming it, before the coordinator starts.
 */
export function resolveTransferLimits(defaults: TransferLimits, ...overrides: Array<TransferLimitsConfig | undefined>): TransferLimits {
  const merged: Record<string, unknown> = { ...defaults };
  for (const o of overrides) for (const [k, v] of Object.entries(o ?? {})) if (v !== undefined) merged[k] = v;
  const r = TransferLimitsSchema.safeParse(merged);
  if (!r.success) throw new Error(`bad transfer limits: ${r.error.issues.map((i) => `${i.path.join('.') || '(limits)'}: ${i.message}`).join('; ')}`);
  return r.data;
}

function machineMemoryBytes(): number {
  // constrainedMemory() is 0 or a huge number without a cgroup limit.
  const limit = process.constrainedMemory?.() ?? 0;
  return limit > 0 ? Math.min(limit, totalmem()) : totalmem();
}

function clamp(x: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, x));
}

/** One transfer's place: waiting, running, or over. */
export interface TransferTicket {
  readonly state: 'waiting' | 'running' | 'released';
  /** Leaves the queue, or gives the slot back to the next in line; safe to call any number of times. */
  release(): void;
}

export type AdmissionResult = { ticket: TransferTicket; refused?: undefined } | { ticket?: undefined; refused: string };

export interface GateStats {
  running: number;
  waiting: number;
  /** Most transfers that ran at once since the coordinator started. */
  peakRunning: number;
  peakWaiting: number;
  /** Transfers that had to wait for a slot, and those refused because too many waited. */
  queued: number;
  refused: number;
}

interface Entry extends TransferTicket {
  state: 'waiting' | 'running' | 'released';
  start: () => void;
}

/** One direction's FIFO semaphore. */
export class TransferGate {
  private running = 0;
  private readonly queue: Entry[] = [];
  private readonly counts = { peakRunning: 0, peakWaiting: 0, queued: 0, refused: 0 };

  constructor(
    readonly direction: TransferDirection,
    private readonly maxRunning: number,
    private readonly maxWaiting: number,
    /** Told when a transfer's start callback threw (its slot was given back); must not throw. */
    private readonly onStartError: (e: unknown) => void = () => undefined,
  ) {
    if (!(Number.isInteger(maxRunning) && maxRunning >= 1)) throw new RangeError(`${direction}s at once must be an integer ≥ 1, got ${maxRunning}`);
    if (!(maxWaiting === Number.POSITIVE_INFINITY || (Number.isInteger(maxWaiting) && maxWaiting >= 0))) throw new RangeError(`waiting ${direction}s must be an integer ≥ 0, got ${maxWaiting}`);
  }

  /**
   * Asks to start a transfer. `start` runs at once when a slot is free (before this returns), else when this ticket's
   * turn comes (on a later tick, never inside another transfer's release). Refused only when too many wait already.
   * The caller must release the ticket however the transfer ends, and when its call is cut off while it waits.
   */
  admit(start: () => void): AdmissionResult {
    if (this.running >= this.maxRunning && this.queue.length >= this.maxWaiting) {
      this.counts.refused++;
      return { refused: `the coordinator is running ${this.running} ${this.direction}s with ${this.queue.length} more waiting, the most it takes at once` };
    }
    const entry: Entry = {
      state: 'waiting',
      start,
      release: () => this.release(entry),
    };
    if (this.running < this.maxRunning) {
      this.run(entry);
      this.begin(entry);
    } else {
      this.queue.push(entry);
      this.counts.queued++;
      this.counts.peakWaiting = Math.max(this.counts.peakWaiting, this.queue.length);
    }
    return { ticket: entry };
  }

  stats(): GateStats {
    return { running: this.running, waiting: this.queue.length, ...this.counts };
  }

  private run(entry: Entry): void {
    entry.state = 'running';
    this.running++;
    this.counts.peakRunning = Math.max(this.counts.peakRunning, this.running);
  }

  private begin(entry: Entry): void {
    try {
      entry.start();
    } catch (e) {
      entry.release();
      this.onStartError(e);
    }
  }

  private release(entry: Entry): void {
    if (entry.state === 'released') return;
    const was = entry.state;
    entry.state = 'released';
    if (was === 'waiting') {
      const i = this.queue.indexOf(entry);
      if (i >= 0) this.queue.splice(i, 1);
      return;
    }
    this.running--;
    const next = this.queue.shift();
    if (!next) return;
    // The slot passes to the next in line now; its start runs on the next tick, outside the caller's event handler.
    this.run(next);
    process.nextTick(() => {
      if (next.state === 'running') this.begin(next);
    });
  }
}

/** Both directions' gates, as the Federation handlers use them. */
export class TransferAdmission {
  readonly downloads: TransferGate;
  readonly uploads: TransferGate;

  constructor(
    readonly limits: TransferLimits,
    onStartError?: (direction: TransferDirection, e: unknown) => void,
  ) {
    // A waiting download holds no buffer, so it is never refused.
    this.downloads = new TransferGate('download', limits.maxDownloads, Number.POSITIVE_INFINITY, (e) => onStartError?.('download', e));
    this.uploads = new TransferGate('upload', limits.maxUploads, limits.maxWaitingUploads, (e) => onStartError?.('upload', e));
  }

  gate(direction: TransferDirection): TransferGate {
    return direction === 'download' ? this.downloads : this.uploads;
  }
}
