/**
 * The commit of uploads whose bytes are complete and durable, as a group commit. Closed uploads wait in the engine's
 * fold queue; each time the queue reaches them, everything then waiting (up to `maxBatch` updates and `maxBatchBytes`)
 * is checked and folded in one pass over the round's sums (the strategy's checkAndAddBatch), each update read from its
 * own stored file a block at a time, so no model-sized buffer holds an update. The accepted ones are then stored
 * together: their renames into the round's folder made durable by one directory fsync, their rows, events and ledger
 * entries by one store transaction. Only then is each site acknowledged.
 *
 * What does not change: an update is acknowledged only once it is stored and counted; a refused update (hash,
 * layout, non-finite values, norm bound, admission) refuses only itself, in the words of the one-at-a-time path; if
 * the renames or the transaction fail, every update of the batch is taken out of the sums again and its file deleted,
 * and each site gets the error the one-at-a-time path gives (a storage fault: UNAVAILABLE, sent again later).
 * Rounds whose strategy cannot fold a batch (median, trimmed mean) and float16/int8 uploads are committed one at a
 * time as before: decoded into the receiver's scratch buffer, stored, acknowledged, then folded.
 */
import { rmSync } from 'node:fs';
import type { Logger } from '../../shared/util/log.ts';
import type { BatchItem, Verdict } from '../aggregation/strategy.ts';
import type { TensorReader } from '../aggregation/base-blocks.ts';
import { outboxRows } from '../events/outbox.ts';
import { openModelReader } from '../models/model-reader.ts';
import type { RoundEngine } from '../rounds/round-engine.ts';
import type { CoordinatorStore, UpdateRow } from '../store/store.ts';
import { UploadRefused, type PartialUpload, type UploadReceiver } from './upload-receiver.ts';

/** Updates checked and folded in one pass at most; the native batch fold takes up to 32. */
export const MAX_COMMIT_BATCH = 32;
/**
 * Bytes of updates per batch at most (a single larger update still makes a batch of one). The pass runs on the event
 * loop, which serves no call meanwhile: at ~3.8 GB/s, 512 MiB is ~0.15 s, where 32 updates of a 132 MB model would
 * hold every heartbeat and download for over a second.
 */
export const MAX_COMMIT_BATCH_BYTES = 512 * 1024 * 1024;

/** One closed upload asking to be committed. */
export interface CommitRequest {
  /** The authenticated site the upload came from. */
  site: string;
  /** Every chunk written, fsynced and hashed (`await partial.close()` done). */
  partial: PartialUpload;
  /** Answers the site that its update was accepted; resolves once that answer has left the process. */
  acknowledge(row: UpdateRow): Promise<void>;
}

export interface UploadCommitsDeps {
  engine: Pick<RoundEngine, 'admissionProblem' | 'checkAndFold' | 'unfold' | 'fold' | 'checkAndFoldBatch' | 'unfoldItem' | 'folded' | 'serialised' | 'acceptedEvent' | 'aggregateStale'>;
  store: Pick<CoordinatorStore, 'insertUpdate' | 'insertUpdates'>;
  receiver: Pick<UploadReceiver, 'verify' | 'inspect' | 'place' | 'syncFolder' | 'finish'>;
  log: Logger;
  /** Most updates per batch (default MAX_COMMIT_BATCH). */
  maxBatch?: number;
  /** Most bytes of updates per batch (default MAX_COMMIT_BATCH_BYTES); an update larger alone is a batch of one. */
  maxBatchBytes?: number;
  /** Told of each batch folded in one pass (its size); must not throw (benches and tests count them). */
  onBatch?: (size: number) => void;
}

interface Waiting {
  req: CommitRequest;
  resolve(row: UpdateRow): void;
  reject(e: unknown): void;
}

/** A waiting upload whose file a batch can read: its reader, and once accepted its row and final path. */
interface Readable {
  w: Waiting;
  reader: TensorReader;
  item: BatchItem;
  verdict?: Verdict;
  /** Where the file is now: the partial path until place() moved it. */
  path: string;
  row?: UpdateRow;
}

export class UploadCommits {
  private waiting: Waiting[] = [];
  private scheduled = false;
  private readonly maxBatch: number;
  private readonly maxBatchBytes: number;

  constructor(private readonly d: UploadCommitsDeps) {
    this.maxBatch = d.maxBatch ?? MAX_COMMIT_BATCH;
    this.maxBatchBytes = d.maxBatchBytes ?? MAX_COMMIT_BATCH_BYTES;
    if (!(Number.isInteger(this.maxBatch) && this.maxBatch >= 1)) throw new RangeError(`maxBatch must be an integer ≥ 1, got ${this.maxBatch}`);
    if (!(this.maxBatchBytes > 0)) throw new RangeError(`maxBatchBytes must be > 0, got ${this.maxBatchBytes}`);
  }

  /** The uploads the next job takes: in arrival order, up to maxBatch of them and maxBatchBytes (at least one). */
  private nextBatch(): Waiting[] {
    let n = 0;
    let bytes = 0;
    while (n < this.waiting.length && n < this.maxBatch) {
      const size = this.waiting[n].req.partial.header.totalSize;
      if (n > 0 && bytes + size > this.maxBatchBytes) break;
      bytes += size;
      n++;
    }
    return this.waiting.splice(0, n);
  }

  /**
   * Commits a closed upload: resolves with its row once it is stored, counted and acknowledged. Rejects with an
   * UploadRefused (its reason for the site) or the failure that kept it from being stored; then it was neither
   * acknowledged nor counted, and its file is gone.
   */
  submit(req: CommitRequest): Promise<UpdateRow> {
    return new Promise<UpdateRow>((resolve, reject) => {
      this.waiting.push({ req, resolve, reject });
      this.schedule();
    });
  }

  /** One job in the fold queue for whatever is waiting when the queue reaches it. */
  private schedule(): void {
    if (this.scheduled || this.waiting.length === 0) return;
    this.scheduled = true;
    this.d.engine
      .serialised(async () => {
        this.scheduled = false;
        const batch = this.nextBatch();
        // What arrives meanwhile, and what did not fit, waits for the next job.
        this.schedule();
        try {
          await this.commitBatch(batch);
        } catch (e) {
          // Not expected (each step settles its uploads), but no call may wait for ever: the ones still unsettled
          // fail (settling twice changes nothing; a stored update's file was moved away from its partial path).
          for (const w of batch) this.drop(w, e);
          throw e;
        }
      })
      .catch((e: Error) => this.d.log.error({ err: e.message }, 'committing uploads failed'));
  }

  private async commitBatch(batch: Waiting[]): Promise<void> {
    const oneByOne: Waiting[] = [];
    const readable: Readable[] = [];
    const taken = new Set<string>();
    for (const w of batch) {
      try {
        const r = this.prepare(w, taken);
        if (r) readable.push(r);
        else oneByOne.push(w);
      } catch (e) {
        this.drop(w, e);
      }
    }
    if (readable.length > 0) {
      const round = readable[0].w.req.partial.header.round;
      let verdicts: Verdict[] | undefined;
      try {
        verdicts = this.d.engine.checkAndFoldBatch(round, readable.map((r) => r.item));
        // Nothing was counted: this round folds one update at a time.
        if (!verdicts) oneByOne.unshift(...readable.map((r) => r.w));
      } catch (e) {
        // Part of the batch may be in the sums: none of it is stored (the sites send it again), and the close
        // rebuilds the round's aggregate from what is.
        this.d.log.error({ round, updates: readable.length, err: (e as Error).message }, 'folding a batch of uploads failed; the sites send them again');
        this.d.engine.aggregateStale(round, `folding a batch of ${readable.length} uploads failed: ${(e as Error).message}`);
        for (const r of readable) this.drop(r.w, e);
      } finally {
        for (const r of readable) r.reader.close();
      }
      if (verdicts) {
        this.d.onBatch?.(readable.length);
        await this.storeBatch(round, readable, verdicts);
      }
    }
    for (const w of oneByOne) {
      try {
        w.resolve(await this.commitOne(w.req));
      } catch (e) {
        w.reject(e);
      }
    }
  }

  /**
   * The checks before the fold: every byte and the hash, the file's header and layout, the round's admission (and
   * no second update of a site in one batch). A reader over the file, or undefined when the file must be decoded
   * (float16, int8). Throws UploadRefused with the reason.
   */
  private prepare(w: Waiting, taken: Set<string>): Readable | undefined {
    const { site, partial: p } = w.req;
    const h = p.header;
    this.d.receiver.verify(p, site);
    const file = this.d.receiver.inspect(p);
    if (!file) return undefined;
    // The store answers for committed updates; the batch itself for the ones it holds.
    const problem = this.d.engine.admissionProblem(site, h.round, h.baseModelHash) ?? (taken.has(site) ? `site '${site}' already reported an update for round ${h.round}` : undefined);
    if (problem) {
      file.reader.close();
      throw new UploadRefused(problem);
    }
    taken.add(site);
    const item: BatchItem = { reader: file.reader, info: { site, numSamples: h.numSamples, isDelta: file.isDelta }, decode: file.decode };
    return { w, reader: file.reader, item, path: p.path };
  }

  /** After the batch fold: the refused ones refused, the accepted ones stored together, or all taken out again. */
  private async storeBatch(round: number, readable: Readable[], verdicts: Verdict[]): Promise<void> {
    const { receiver, store, engine } = this.d;
    const accepted: Readable[] = [];
    readable.forEach((r, i) => {
      const v = verdicts[i];
      if (v.problem) this.drop(r.w, new UploadRefused(v.problem));
      else accepted.push({ ...r, verdict: v });
    });
    if (accepted.length === 0) return;
    try {
      for (const a of accepted) a.path = receiver.place(a.w.req.partial, a.w.req.site);
      for (const dir of new Set(accepted.map((a) => a.path))) receiver.syncFolder(dir);
      const now = Date.now();
      for (const a of accepted) {
        const { site, partial: p } = a.w.req;
        const h = p.header;
        a.row = { updateId: h.updateId, round: h.round, site, numSamples: h.numSamples, sha256: p.expectedSha256!, path: a.path, sizeBytes: h.totalSize, acceptedAt: now };
      }
      // The commit point: every row with its event and ledger entry (events/outbox.ts), or none.
      store.insertUpdates(accepted.map((a) => ({ row: a.row!, outbox: outboxRows(engine.acceptedEvent(a.row!)) })));
    } catch (e) {
      for (const a of accepted) this.takeOut(round, a);
      for (const a of accepted) a.w.reject(e);
      return;
    }
    for (const a of accepted) engine.folded(a.row!);
    this.d.log.debug({ round, updates: readable.length, accepted: accepted.length }, 'uploads checked, folded and stored together');
    // Stored and counted: each site is told on its own, so one call's failure cannot fail the others (or the
    // one-at-a-time uploads still waiting in this job).
    const sent = accepted.map((a) => {
      try {
        return a.w.req.acknowledge(a.row!);
      } catch (e) {
        return Promise.reject(e);
      }
    });
    for (const a of accepted) a.w.resolve(a.row!);
    // Let the acks leave the process before the next model-sized job of the queue.
    for (const r of await Promise.allSettled(sent)) {
      if (r.status === 'rejected') this.d.log.warn({ round, err: (r.reason as Error)?.message }, 'acknowledging a stored update failed; the site learns of it when it sends the update again');
    }
  }

  /** An accepted update of a batch that could not be stored: out of the sums (read again from its file), file deleted. */
  private takeOut(round: number, a: Readable): void {
    try {
      const reader = a.path === a.w.req.partial.path ? a.reader : openModelReader(a.path);
      try {
        this.d.engine.unfoldItem(round, { reader, info: a.item.info }, a.verdict!);
      } finally {
        reader.close();
      }
    } catch (e) {
      this.d.engine.aggregateStale(round, `taking an unstored update out of the round failed: ${(e as Error).message}`);
    }
    rmSync(a.path, { force: true }); // not committed: the site sends it again
    a.w.req.partial.discard();
  }

  /** Refused or failed before anything counted: its file deleted, the error to its call. */
  private drop(w: Waiting, e: unknown): void {
    w.req.partial.discard();
    w.reject(e);
  }

  /**
   * One update at a time (a strategy without a batch fold, or a float16/int8 file): decoded into the receiver's
   * scratch buffer, checked (and folded where the strategy can), stored, acknowledged, then folded.
   */
  private async commitOne(req: CommitRequest): Promise<UpdateRow> {
    const { engine, receiver, store } = this.d;
    const { site, partial: p } = req;
    const h = p.header;
    // Re-check before the file moves: the round may have closed while the bytes were travelling, and a second upload
    // of an update already stored (a site's retry that crossed its first attempt) would be renamed onto the stored
    // file's name, whose deletion on refusal would then take the stored update's file with it.
    const problem = engine.admissionProblem(site, h.round, h.baseModelHash);
    if (problem) {
      p.discard();
      throw new UploadRefused(problem);
    }
    const received = receiver.finish(p, site);
    // The strategy's validation filter: finite values, norm bound, sample count; where the strategy can, the fold
    // in the same pass over the update (`folded`), taken out again below if the update cannot be stored.
    const checked = engine.checkAndFold(site, h.round, received.bundle, h.numSamples, received.isDelta);
    const verdict: Verdict | undefined = checked?.verdict;
    if (verdict?.problem) {
      rmSync(received.path, { force: true }); // refused updates leave no trace
      throw new UploadRefused(verdict.problem);
    }
    const folded = !!checked?.folded;
    const row: UpdateRow = { updateId: h.updateId, round: h.round, site, numSamples: h.numSamples, sha256: p.expectedSha256!, path: received.path, sizeBytes: h.totalSize, acceptedAt: Date.now() };
    // The store row is the commit point; the ack goes out only after it is written. Its event and ledger
    // entry are committed with it (events/outbox.ts), so no acknowledged update can miss the ledger.
    try {
      store.insertUpdate(row, outboxRows(engine.acceptedEvent(row)));
    } catch (e) {
      rmSync(received.path, { force: true }); // not committed: the site sends it again
      if (folded) {
        try {
          engine.unfold(site, h.round, received.bundle, h.numSamples, received.isDelta, verdict!);
        } catch (e2) {
          engine.aggregateStale(h.round, `taking an unstored update out of the round failed: ${(e2 as Error).message}`);
        }
      }
      throw e;
    }
    // Let the ack leave the process before the model-sized, synchronous fold (only bookkeeping when checkAndFold
    // folded it already). The fold stays in this serialised job: the bundle views the receiver's scratch buffer,
    // which the next finish() reuses.
    await req.acknowledge(row);
    try {
      engine.fold(row, received.bundle, { isDelta: received.isDelta, verdict, folded });
    } catch (e) {
      // Stored and acknowledged, so it counts: the close rebuilds the round's aggregate from the stored updates.
      engine.aggregateStale(row.round, `folding the accepted update of site '${site}' failed: ${(e as Error).message}`);
    }
    return row;
  }
}
