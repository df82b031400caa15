/**
 * One UploadUpdate call as a small state machine: the chunks a site streams (header, data, optional trailer) move it
 * from waiting for its header, through receiving, to finishing (the file closed, then checked, folded, stored and
 * acknowledged by the group commit, upload-commits.ts), and every way it can end (accepted, a duplicate, refused, a
 * storage failure, stalled, cut off) answers it at most once and leaves no partial file behind.
 *
 *   awaiting-header ──header──▶ receiving ──end──▶ finishing ──▶ answered
 *          │                        │                  │
 *          └──── refusal, storage failure, stall ──────┴──────▶ answered   (a cut-off call ends where it is)
 *
 * The gRPC handler (federation-service.ts) only wires the call's events to this class and counts the site's slots.
 */
import * as grpc from '@grpc/grpc-js';
import type { Logger } from '../../shared/util/log.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import type { RoundEngine } from '../rounds/round-engine.ts';
import type { CoordinatorStore, UpdateRow } from '../store/store.ts';
import type { UploadCommits } from './upload-commits.ts';
import { UploadRefused, type PartialUpload, type UpdateHeader, type UploadReceiver } from './upload-receiver.ts';

export type UploadState = 'awaiting-header' | 'receiving' | 'finishing' | 'answered';

/** What the call answers with when it acknowledges (accepted, duplicate or refused with a reason). */
export interface UploadAckMessage {
  updateId: string;
  accepted: boolean;
  duplicate?: boolean;
  reason?: string;
}

export interface UploadCallDeps {
  /** The authenticated site the call acts for. */
  site: string;
  store: Pick<CoordinatorStore, 'getUpdate'>;
  engine: Pick<RoundEngine, 'admissionProblem' | 'accepted' | 'rejected'>;
  receiver: Pick<UploadReceiver, 'parseHeader' | 'begin'>;
  /** Checks, folds, stores and acknowledges closed uploads, several at once where it can (upload-commits.ts). */
  commits: Pick<UploadCommits, 'submit'>;
  log: Logger;
  /** Reading is paused (HTTP/2 flow control holds the site) and resumed through these. */
  stream: { pause(): void; resume(): void };
  /** The call's one answer. */
  reply: grpc.sendUnaryData<unknown>;
  /** Resolves once the answer about to be given has left the process (so the fold never holds the ack back). */
  answerSent: () => Promise<void>;
  /** Gives the site's open-upload slot back; called once the call is answered or cut off (idempotent). */
  releaseSlot: () => void;
  /** Nothing arriving for this long while reading drops the upload (UNAVAILABLE). */
  stallMs: number;
  /** Bytes allowed to wait for the file-writer thread before reading pauses. */
  backlogBytes: number;
  /** Told of each accepted upload (metrics); must not throw. */
  onTransfer?: (t: { direction: 'upload'; bytes: number; seconds: number }) => void;
}

export class UploadCall {
  private state: UploadState = 'awaiting-header';
  private header: UpdateHeader | undefined;
  /** The partial file while bytes arrive (receiving); handed over to finishing, or discarded. */
  private partial: PartialUpload | undefined;
  private startedAt = 0;
  private stallTimer: NodeJS.Timeout | undefined;
  private paused = false;

  constructor(private readonly d: UploadCallDeps) {
    this.watchStall(true);
  }

  get current(): UploadState {
    return this.state;
  }

  /** One message of the client stream. */
  data(msg: Record<string, unknown>): void {
    if (this.state === 'answered') return;
    this.watchStall(!this.paused);
    try {
      if (this.state === 'awaiting-header') return this.onHeader(msg);
      if (this.state !== 'receiving') throw new UploadRefused('data after the upload ended');
      const partial = this.partial!;
      if (msg.part === 'trailer') return partial.setTrailer(msg.trailer);
      if (msg.part !== 'data') throw new UploadRefused('only one header per upload');
      // The chunk's memory moves to the writer thread: msg.data must not be used after this.
      partial.write(Number(msg.offset), msg.data as Buffer);
      this.throttle(partial);
    } catch (e) {
      this.failed(e, 'upload failed');
    }
  }

  /** The site ended the stream: every byte is in. */
  end(): void {
    this.watchStall(false);
    if (this.state === 'answered') return;
    const h = this.header;
    const p = this.partial;
    if (this.state !== 'receiving' || !h || !p) return this.refuse('upload ended before any data arrived');
    if (p.expectedSha256 === undefined) return this.refuse('upload ended without the UpdateTrailer (SHA-256) its header announced by leaving sha256 empty');
    const seconds = (performance.now() - this.startedAt) / 1000;
    this.partial = undefined;
    this.state = 'finishing';
    // Wait for the writer thread (last chunks, fsync, SHA-256) outside the fold queue: it needs no scratch buffer,
    // and other uploads' checks and folds run meanwhile. Then the group commit takes it with whatever else waits.
    p.close()
      .then(
        () => undefined,
        (e: Error) => {
          p.discard();
          throw isStorageFault(e) ? e : new UploadRefused(`upload failed: storing it failed: ${e.message}`);
        },
      )
      .then(() => this.d.commits.submit({ site: this.d.site, partial: p, acknowledge: (row) => this.acknowledge(row, seconds) }))
      .then(
        (row) => this.d.engine.accepted(row),
        (e: Error) => this.failed(e, 'upload failed'),
      )
      .catch((e: Error) => this.d.log.error({ err: e.message }, 'aggregation step failed'));
  }

  /** The call was cut off (cancelled by the site, or its connection died). */
  abort(): void {
    this.watchStall(false);
    // While finishing, the answer (which always comes) gives the slot back: the file is still being closed.
    if (this.state !== 'finishing') this.d.releaseSlot();
    if (this.partial) {
      this.partial.discard();
      this.partial = undefined;
      this.d.log.warn({ site: this.d.site, round: this.header?.round }, 'upload cut off before it ended: partial data deleted');
    }
  }

  private onHeader(msg: Record<string, unknown>): void {
    const { receiver, store, engine, site } = this.d;
    if (msg.part !== 'header') throw new UploadRefused('the first chunk must carry the update header');
    const header = (this.header = receiver.parseHeader(msg.header));
    const earlier = store.getUpdate(header.updateId);
    if (earlier) {
      if (earlier.site !== site) throw new UploadRefused('update id belongs to another site');
      // Idempotent retry: the first upload was stored and counted; this one changes nothing.
      return this.answer({ updateId: header.updateId, accepted: true, duplicate: true });
    }
    const problem = engine.admissionProblem(site, header.round, header.baseModelHash);
    if (problem) throw new UploadRefused(problem);
    const partial = (this.partial = receiver.begin(header));
    this.state = 'receiving';
    this.startedAt = performance.now();
    partial.onWriteError = (e) => this.failed(e, 'upload failed: storing it failed');
  }

  /** The update is stored and counted: the site is told; resolves once the answer has left the process. */
  private acknowledge(row: UpdateRow, seconds: number): Promise<void> {
    const sent = this.d.answerSent();
    this.answer({ updateId: row.updateId, accepted: true });
    this.d.onTransfer?.({ direction: 'upload', bytes: row.sizeBytes, seconds });
    return sent;
  }

  /** Ends the call with `err` or an acknowledgement; nothing happens once it was answered. */
  private settle(err: Partial<grpc.StatusObject> | null, ack?: UploadAckMessage): boolean {
    if (this.state === 'answered') return false;
    this.state = 'answered';
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    this.d.releaseSlot();
    if (err) this.d.reply(err);
    else this.d.reply(null, { duplicate: false, reason: '', ...ack });
    return true;
  }

  private answer(ack: UploadAckMessage): void {
    this.settle(null, ack);
  }

  private discardPartial(): void {
    this.partial?.discard();
    this.partial = undefined;
  }

  /** Refused with a reason the site reads (accepted: false); the partial file is deleted. */
  private refuse(reason: string): void {
    this.discardPartial();
    if (this.state === 'answered') return;
    this.d.engine.rejected(this.d.site, this.header?.round ?? 0, reason);
    this.answer({ updateId: this.header?.updateId ?? '', accepted: false, reason });
  }

  /** A storage fault is not the update's: UNAVAILABLE, so the site keeps its update and sends it again later. */
  private failed(e: unknown, what: string): void {
    if (!isStorageFault(e)) return this.refuse(e instanceof UploadRefused ? e.message : `${what}: ${(e as Error).message}`);
    this.discardPartial();
    if (this.state === 'answered') return;
    const reason = `the coordinator cannot store the update now (${describeStorageFault(e)}); send it again later`;
    this.d.log.error({ site: this.d.site, round: this.header?.round, err: describeStorageFault(e) }, 'upload not stored: storage failure; the site is told to retry');
    this.settle({ code: grpc.status.UNAVAILABLE, details: reason });
  }

  /** Dropped as dead when nothing arrives for stallMs while reading (not while the coordinator holds the site back). */
  private stalled(): void {
    if (this.state === 'answered') return;
    this.discardPartial();
    const seconds = Math.round(this.d.stallMs / 100) / 10;
    this.d.log.warn({ site: this.d.site, round: this.header?.round, seconds }, 'upload stalled: nothing arrived; partial data deleted (the site sends it again)');
    this.settle({ code: grpc.status.UNAVAILABLE, details: `nothing arrived for ${seconds} s, so the coordinator dropped this upload; send it again` });
  }

  private watchStall(reading: boolean): void {
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    if (this.state === 'answered' || !reading) return;
    this.stallTimer = setTimeout(() => this.stalled(), this.d.stallMs);
    this.stallTimer.unref();
  }

  /**
   * Chunks are written on the file-writer thread; stop reading (HTTP/2 flow control then holds the client) while
   * more than backlogBytes wait for the disk, so a slow disk never buffers a whole update.
   */
  private throttle(p: PartialUpload): void {
    if (this.paused || p.backlog <= this.d.backlogBytes) return;
    this.paused = true;
    this.watchStall(false);
    this.d.stream.pause();
    void p.drained(this.d.backlogBytes / 2).then(() => {
      this.paused = false;
      this.watchStall(true);
      this.d.stream.resume();
    });
  }
}
