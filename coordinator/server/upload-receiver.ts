/**
 * Receives one update upload (a client stream of chunks) into a partial file, checks everything, and
 * makes it durable: fsync, rename into place, then the store row — and only then is it acknowledged.
 * Anything refused or cut off is deleted, so a dropped upload leaves no trace.
 *
 * Chunks are checked on arrival (order, size) and then written and hashed on the file-writer thread
 * (shared/protocol/hashing-writer.ts), so the event loop keeps receiving while the disk catches up.
 */
import { randomUUID } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { decodeUpdate, decodeUpdateHeader, type UpdateFileHeader } from '../../shared/tensors/update-codec.ts';
import { checkAgainstSpecs, type DType, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { CHUNK_BYTES } from '../../shared/protocol/grpc.ts';
import { fsyncDir } from '../../shared/util/fs-atomic.ts';
import { SHA256_HEX } from '../../shared/util/hash.ts';
import { SITE_NAME_PATTERN } from '../../shared/protocol/site-names.ts';
import { HashingFileWriter, fileSyncOptions } from '../../shared/protocol/hashing-writer.ts';
import type { TensorReader } from '../aggregation/base-blocks.ts';
import { tensorFileReader } from '../models/model-reader.ts';

export const UpdateHeaderSchema = z.object({
  updateId: z.string().regex(/^[A-Za-z0-9._-]{8,128}$/, 'update_id must be 8–128 characters of [A-Za-z0-9._-]'),
  round: z.number().int().positive(),
  taskId: z.string().max(200),
  baseModelHash: z.string().regex(SHA256_HEX, 'base_model_hash must be 64 lowercase hex digits'),
  totalSize: z.number().int().positive(),
  // Empty: the hash comes last, in an UpdateTrailer (feature upload-sha256-trailer).
  sha256: z.union([z.literal(''), z.string().regex(SHA256_HEX, 'sha256 must be 64 lowercase hex digits, or empty when an UpdateTrailer carries it')]),
  numSamples: z.number().int().positive().max(10_000_000),
});
export type UpdateHeader = z.infer<typeof UpdateHeaderSchema>;
/** Without the trailer feature the header must carry the hash (as before the feature existed). */
const HeaderWithHashSchema = UpdateHeaderSchema.extend({ sha256: z.string().regex(SHA256_HEX, 'sha256 must be 64 lowercase hex digits') });

export class UploadRefused extends Error {
  override name = 'UploadRefused';
}

export interface ReceivedUpdate {
  header: UpdateHeader;
  /** Float32, decoded from whatever encoding the site used (plan.compression). */
  bundle: TensorBundle;
  /** The bundle holds x − x_base (a delta encoding), not weights. */
  isDelta: boolean;
  /** Final path, already fsynced and renamed into place. */
  path: string;
}

export class UploadReceiver {
  private readonly partialDir: string;

  constructor(
    private readonly updatesDir: string,
    private readonly specs: readonly TensorSpec[],
    private readonly maxBytes: number,
    /** sha256Trailer: accept an empty header hash followed by an UpdateTrailer (default true). */
    private readonly accepts: { sha256Trailer?: boolean } = {},
  ) {
    this.partialDir = join(updatesDir, '.partial');
    mkdirSync(this.partialDir, { recursive: true });
  }

  /** Deletes partial files left by a crash: they were never acknowledged, so they never counted. */
  cleanPartials(): number {
    let n = 0;
    for (const f of readdirSync(this.partialDir)) {
      rmSync(join(this.partialDir, f), { force: true });
      n++;
    }
    return n;
  }

  parseHeader(raw: unknown): UpdateHeader {
    const schema = this.accepts.sha256Trailer === false ? HeaderWithHashSchema : UpdateHeaderSchema;
    const r = schema.safeParse(raw);
    if (!r.success) throw new UploadRefused(`bad update header: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    if (r.data.totalSize > this.maxBytes) {
      throw new UploadRefused(`update of ${r.data.totalSize} bytes exceeds the ${this.maxBytes}-byte limit for this model`);
    }
    return r.data;
  }

  /** Starts a partial file for a header already admitted by the round engine. */
  begin(header: UpdateHeader): PartialUpload {
    return new PartialUpload(header, join(this.partialDir, `${randomUUID()}.part`));
  }

  /**
   * One read buffer for every upload, reused: a fresh model-sized buffer per update would leave several
   * alive until the GC runs (5× one model measured, bench/README.md). Callers serialise finish() and the
   * fold, so the views handed out are consumed before the next finish() overwrites them.
   */
  private scratch: Buffer | undefined;
  /** Float32 output of float16/int8 decoding, reused for the same reason. */
  private decoded: Float32Array | undefined;

  private readIntoScratch(path: string, size: number): Buffer {
    if (!this.scratch || this.scratch.length < size) this.scratch = Buffer.allocUnsafe(size);
    const buf = this.scratch.subarray(0, size);
    const fd = openSync(path, 'r');
    try {
      for (let off = 0; off < size; ) {
        const n = readSync(fd, buf, off, size - off, off);
        if (n === 0) throw new UploadRefused(`stored upload is shorter than the ${size} bytes received`);
        off += n;
      }
    } finally {
      closeSync(fd);
    }
    return buf;
  }

  /**
   * The checks that need no read of the stored file: every announced byte arrived and hashes (on the writer thread,
   * while it arrived) to the SHA-256 the site announced, and the site's name is one a file may be named after.
   * `p` must have been closed (`await p.close()`). Throws UploadRefused with a reason.
   */
  verify(p: PartialUpload, site: string): void {
    const h = p.header;
    if (p.received !== h.totalSize) throw new UploadRefused(`upload ended after ${p.received} of ${h.totalSize} bytes`);
    const expected = p.expectedSha256;
    if (expected === undefined) throw new UploadRefused('upload ended without the UpdateTrailer (SHA-256) its header announced by leaving sha256 empty');
    const digest = p.digest();
    if (digest !== expected) {
      const from = h.sha256 ? 'header' : 'trailer';
      throw new UploadRefused(`hash mismatch: received bytes hash to ${digest.slice(0, 16)}…, ${from} says ${expected.slice(0, 16)}…`);
    }
    // The file name is built from checked values only: the round and update id by the header schema, the site
    // name by enrolment (and again here, should an auth path ever hand over something else).
    if (!SITE_NAME_PATTERN.test(site)) throw new UploadRefused('the authenticated site name is not a valid site name');
  }

  /**
   * A verified upload as a batch reads it: only its header is read here, checked with decodeUpdate's checks and
   * words and against the plan's shared tensors, and a reader over the file gives the float32 values a block at a
   * time (no model-sized buffer). Undefined for a float16 or int8 encoding: finish() decodes those. Throws
   * UploadRefused as finish() would. The reader reads `p.path`: use it before place() moves the file.
   */
  inspect(p: PartialUpload): { reader: TensorReader; isDelta: boolean; decode: () => TensorBundle } | undefined {
    let head: UpdateFileHeader;
    try {
      head = readUpdateHeader(p.path, p.received);
    } catch (e) {
      if (e instanceof UploadRefused) throw e;
      throw new UploadRefused(`payload is not a valid update (safetensors, float32/float16/int8): ${(e as Error).message}`);
    }
    if (head.encoding.update !== 'float32') return undefined;
    const specProblem = checkAgainstSpecs(new Map(head.entries.map((e) => [e.name, { dtype: e.dtype as DType, shape: e.shape }])), this.specs);
    if (specProblem) throw new UploadRefused(`update does not match the plan's shared tensors: ${specProblem}`);
    // Decoding the whole file is left to a refusal that must name its bad value (as finish() would have).
    const reader = tensorFileReader(p.path, new Map(head.entries.map((e) => [e.name, e])), head.dataStart);
    return { reader, isDelta: head.isDelta, decode: () => decodeUpdate(readFileSync(p.path), { views: true }).bundle };
  }

  /**
   * Moves a verified upload into its round's folder and returns its final path. The folder's fsync is the caller's
   * (syncFolder), so a batch of uploads pays one for all its renames.
   */
  place(p: PartialUpload, site: string): string {
    const h = p.header;
    const dir = join(this.updatesDir, `round-${h.round}`);
    mkdirSync(dir, { recursive: true });
    const finalPath = join(dir, `${site}-${h.updateId}.safetensors`);
    renameSync(p.path, finalPath);
    return finalPath;
  }

  /** Makes the renames into the folder of `finalPath` durable. */
  syncFolder(finalPath: string): void {
    fsyncDir(dirname(finalPath));
  }

  /**
   * Validates a complete partial upload, decodes it and moves it into place (fsynced): the path for updates a
   * batch cannot read from their file (float16, int8, or a round that folds one at a time). Throws UploadRefused.
   * `p` must have been closed (`await p.close()`: every chunk written, fsynced, hashed) — that wait needs no
   * scratch buffer, so callers do it before entering their serialised section.
   * The returned bundle views the receiver's scratch buffer: use it before the next finish().
   */
  finish(p: PartialUpload, site: string): ReceivedUpdate {
    try {
      const h = p.header;
      this.verify(p, site);
      const bytes = this.readIntoScratch(p.path, p.received);
      let bundle: TensorBundle;
      let isDelta: boolean;
      try {
        const d = decodeUpdate(bytes, {
          views: true,
          into: (n) => (this.decoded && this.decoded.length >= n ? this.decoded : (this.decoded = new Float32Array(n))),
        });
        bundle = d.bundle;
        isDelta = d.isDelta;
      } catch (e) {
        throw new UploadRefused(`payload is not a valid update (safetensors, float32/float16/int8): ${(e as Error).message}`);
      }
      const specProblem = checkAgainstSpecs(bundle, this.specs);
      if (specProblem) throw new UploadRefused(`update does not match the plan's shared tensors: ${specProblem}`);
      // Finite values, the norm bound and the sample count are the strategy's validation filter (engine.checkUpdate).
      const finalPath = this.place(p, site);
      this.syncFolder(finalPath);
      return { header: h, bundle, isDelta, path: finalPath };
    } catch (e) {
      p.discard();
      throw e;
    }
  }
}

/** The header of the update file at `path` (`bytes` long), read and checked; the values are not read. */
function readUpdateHeader(path: string, bytes: number): UpdateFileHeader {
  const fd = openSync(path, 'r');
  try {
    const read = (n: number): Uint8Array => {
      const b = new Uint8Array(n);
      for (let off = 0; off < n; ) {
        const got = readSync(fd, b, off, n - off, off);
        if (got === 0) throw new UploadRefused(`stored upload is shorter than the ${bytes} bytes received`);
        off += got;
      }
      return b;
    };
    let head = decodeUpdateHeader(read(Math.min(8, bytes)), bytes);
    if (!('entries' in head)) head = decodeUpdateHeader(read(head.headerBytes), bytes);
    if (!('entries' in head)) throw new Error('header could not be read');
    return head;
  } finally {
    closeSync(fd);
  }
}

export class PartialUpload {
  received = 0;
  private readonly file: HashingFileWriter;
  private closing: Promise<void> | undefined;
  private sha256: string | undefined;
  private trailer: string | undefined;

  constructor(readonly header: UpdateHeader, readonly path: string) {
    this.file = new HashingFileWriter(path, { mode: 0o600, syncEveryBytes: fileSyncOptions.progressiveSyncBytes });
  }

  /** The SHA-256 the site announced: from the header, or from the trailer when the header left it empty. */
  get expectedSha256(): string | undefined {
    return this.header.sha256 || this.trailer;
  }

  /** The UpdateTrailer: the last message, allowed only when the header left sha256 empty. */
  setTrailer(raw: unknown): void {
    if (this.closing) throw new UploadRefused('upload already finished');
    if (this.header.sha256) throw new UploadRefused('an UpdateTrailer was sent although the header already carries sha256');
    if (this.trailer !== undefined) throw new UploadRefused('only one UpdateTrailer per upload');
    const sha = (raw as { sha256?: unknown } | null | undefined)?.sha256;
    if (typeof sha !== 'string' || !SHA256_HEX.test(sha)) throw new UploadRefused('bad UpdateTrailer: sha256 must be 64 lowercase hex digits');
    if (this.received !== this.header.totalSize) {
      throw new UploadRefused(`UpdateTrailer after ${this.received} of ${this.header.totalSize} bytes: it must follow the last data chunk`);
    }
    this.trailer = sha;
  }

  /**
   * Appends a chunk; chunks must arrive in order and stay within the announced size. The chunk is written
   * and hashed on the writer thread; its memory may move there, so the caller must not use `data` again.
   * Throws UploadRefused for a bad chunk, and the writer's error if an earlier write failed.
   */
  write(offset: number, data: Buffer): void {
    if (this.closing) throw new UploadRefused('upload already finished');
    if (this.trailer !== undefined) throw new UploadRefused('data chunk after the UpdateTrailer: the trailer must come last');
    if (offset !== this.received) throw new UploadRefused(`out-of-order chunk: offset ${offset}, expected ${this.received}`);
    if (data.length === 0) throw new UploadRefused('empty chunk');
    if (data.length > CHUNK_BYTES) throw new UploadRefused(`chunk of ${data.length} bytes is larger than the ${CHUNK_BYTES}-byte maximum`);
    if (this.received + data.length > this.header.totalSize) {
      throw new UploadRefused(`chunk at offset ${offset} runs past the announced size ${this.header.totalSize}`);
    }
    const n = data.length;
    this.file.write(data, offset, true);
    this.received += n;
  }

  /** Bytes received but not yet written to the partial file. */
  get backlog(): number {
    return this.file.queuedBytes;
  }

  /** Resolves once at most `bytes` are waiting to be written (or the write failed). */
  drained(bytes: number): Promise<void> {
    return this.file.whenBelow(bytes);
  }

  /** Called once if writing the partial file fails while chunks are still arriving. */
  set onWriteError(f: ((e: Error) => void) | undefined) {
    this.file.onError = f;
  }

  /** SHA-256 (hex) of everything written; available after close(). */
  digest(): string {
    if (this.sha256 === undefined) throw new Error('digest() before close() finished');
    return this.sha256;
  }

  /** Waits for every chunk to be written, then fsyncs and closes the file. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.file.finish({ fsync: true }).then((d) => {
      this.sha256 = d;
    });
    return this.closing;
  }

  discard(): void {
    this.file.discard();
  }
}
