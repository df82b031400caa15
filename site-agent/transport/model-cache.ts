/**
 * Global model versions cached by hash. A version already here is never downloaded again; a download
 * cut off midway resumes from the bytes already in its .part file; a finished file is kept only if its
 * SHA-256 is the one asked for.
 */
import { existsSync, mkdirSync, renameSync, statSync, readdirSync, rmSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { SHA256_HEX, sha256Hex } from '../../shared/util/hash.ts';
import { fsyncDir } from '../../shared/util/fs-atomic.ts';
import { HashingFileWriter, fileSyncOptions } from '../../shared/protocol/hashing-writer.ts';
import * as grpc from '@grpc/grpc-js';
import type { FederationClient } from './client.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { safetensorsLayout } from '../../shared/tensors/safetensors.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../../shared/protocol/reconnect.ts';
import type { Logger } from '../../shared/util/log.ts';

/** Downloaded bytes allowed to wait for the file-writer thread before the stream is paused. */
const DOWNLOAD_BACKLOG_BYTES = 16 * 1024 * 1024;

/** Room for the header's metadata (architecture, round, parent, an encoding's per-tensor scales) beyond the layout. */
const MODEL_HEADER_SLACK_BYTES = 1024 * 1024;

/**
 * The largest model file the task's architecture can account for: every parameter as float32 in safetensors, plus
 * header slack. A coordinator (compromised or buggy) that announces more is refused before a byte is downloaded.
 */
export function modelSizeLimit(model: TaskSettings['model']): number {
  const { header, dataBytes } = safetensorsLayout(architectureFor(model).params());
  return 8 + header.length + dataBytes + MODEL_HEADER_SLACK_BYTES;
}

export class ModelCache {
  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true });
  }

  pathFor(hash: string): string {
    if (!SHA256_HEX.test(hash)) throw new Error('not a model hash');
    return join(this.dir, `${hash}.safetensors`);
  }

  has(hash: string): boolean {
    return existsSync(this.pathFor(hash));
  }

  hashes(): string[] {
    return readdirSync(this.dir)
      .filter((f) => f.endsWith('.safetensors'))
      .map((f) => f.slice(0, -'.safetensors'.length))
      .filter((h) => SHA256_HEX.test(h));
  }

  read(hash: string): Buffer {
    const bytes = readFileSync(this.pathFor(hash));
    if (sha256Hex(bytes) !== hash) {
      rmSync(this.pathFor(hash), { force: true });
      throw new Error(`cached model ${hash.slice(0, 12)}… was corrupt on disk and has been removed; it will be downloaded again`);
    }
    return bytes;
  }

  /**
   * Makes sure `hash` is in the cache, downloading (or resuming) it if needed.
   * Returns how many bytes crossed the wire (0 for a cache hit).
   *
   * Chunks are written and hashed on the file-writer thread as they arrive (shared/protocol/hashing-writer.ts),
   * so the download needs no second pass over the file to check its SHA-256.
   */
  async ensure(client: FederationClient, hash: string, expectedSize: number, onProgress?: (done: number, total: number) => void): Promise<number> {
    if (this.has(hash)) return 0;
    const part = join(this.dir, `${hash}.part`);
    let offset = existsSync(part) ? statSync(part).size : 0;
    if (offset > expectedSize) {
      rmSync(part, { force: true });
      offset = 0;
    }
    // A resumed download hashes the bytes already in the .part file first. Synced as it arrives, so the closing
    // fsync has little left (fileSyncOptions).
    const file = new HashingFileWriter(part, { hashExisting: offset, syncEveryBytes: fileSyncOptions.progressiveSyncBytes });
    let received = 0;
    let digest: string;
    try {
      await new Promise<void>((resolve, reject) => {
        const stream = client.downloadModel(hash, offset);
        let pos = offset;
        let paused = false;
        const fail = (e: Error) => {
          stream.cancel();
          reject(e);
        };
        file.onError = (e) => fail(new Error(`writing ${part} failed: ${e.message}`));
        stream.on('data', (c: { offset: number; data: Buffer; totalSize: number; sha256: string }) => {
          try {
            if (c.sha256 !== hash) throw new Error(`server sent chunks of model ${c.sha256.slice(0, 12)}…, not ${hash.slice(0, 12)}…`);
            if (c.offset !== pos) throw new Error(`out-of-order model chunk at ${c.offset}, expected ${pos}`);
            if (c.totalSize !== expectedSize) throw new Error(`model is ${c.totalSize} bytes, the task said ${expectedSize}`);
            if (pos + c.data.length > expectedSize) throw new Error('model chunk runs past the announced size');
            const n = c.data.length;
            file.write(c.data, pos, true); // the chunk's memory moves to the writer thread
            pos += n;
            received += n;
            onProgress?.(pos, expectedSize);
            // Stop reading while the disk is behind (HTTP/2 flow control then holds the coordinator).
            if (!paused && file.queuedBytes > DOWNLOAD_BACKLOG_BYTES) {
              paused = true;
              stream.pause();
              void file.whenBelow(DOWNLOAD_BACKLOG_BYTES / 2).then(() => {
                paused = false;
                stream.resume();
              });
            }
          } catch (e) {
            fail(e as Error);
          }
        });
        stream.on('error', reject);
        stream.on('end', () => resolve());
      });
      digest = await file.finish({ fsync: true });
    } catch (e) {
      // Keep what arrived for a resume: let the queued chunks reach the .part file before giving up.
      await file.finish({ fsync: false }).catch(() => undefined);
      throw e;
    }
    const size = statSync(part).size;
    if (size !== expectedSize) throw new Error(`model download ended at ${size} of ${expectedSize} bytes; it will resume from there`);
    if (digest !== hash) {
      rmSync(part, { force: true });
      throw new Error(`downloaded model hashes to ${digest.slice(0, 12)}…, expected ${hash.slice(0, 12)}…; discarded, will download again`);
    }
    renameSync(part, this.pathFor(hash));
    fsyncDir(this.dir);
    return received;
  }
}

/** Answers that will not change on another try: the model is not there, the request is wrong, or the site is refused. */
const FINAL_DOWNLOAD_CODES: ReadonlySet<grpc.status> = new Set([grpc.status.NOT_FOUND, grpc.status.INVALID_ARGUMENT, grpc.status.PERMISSION_DENIED]);

export interface DownloadRetryOptions {
  /** Tries stop once the next would start after this time, Unix ms (the task's deadline). */
  until: number;
  /** Longest wait between two tries (default: the sites' reconnect backoff cap). */
  maxBackoffMs?: number;
  /** Checked before each wait and retry: true stops retrying (the agent is stopping). */
  cancelled?: () => boolean;
  onProgress?: (done: number, total: number) => void;
  log?: Logger;
}

/**
 * ModelCache.ensure, tried again after a failure with exponential backoff until `until`: each try resumes from the
 * bytes already in the .part file, on the client the agent holds at that moment (it may have reconnected meanwhile),
 * so a download cut by a timeout, a restart of the coordinator or a dropped connection costs the site a pause, not
 * its round. NOT_FOUND, INVALID_ARGUMENT and PERMISSION_DENIED are final. Returns the bytes moved over all tries;
 * throws the last error when it gives up.
 */
export async function ensureWithRetry(cache: ModelCache, client: () => FederationClient, hash: string, size: number, o: DownloadRetryOptions): Promise<number> {
  const maxBackoffMs = o.maxBackoffMs ?? SITE_MAX_RECONNECT_BACKOFF_MS;
  let moved = 0;
  for (let tryNo = 1; ; tryNo++) {
    const part = join(cache.dir, `${hash}.part`);
    const before = existsSync(part) ? statSync(part).size : 0;
    try {
      return moved + (await cache.ensure(client(), hash, size, o.onProgress));
    } catch (e) {
      const err = e as Partial<grpc.ServiceError>;
      const after = existsSync(part) ? statSync(part).size : 0;
      moved += Math.max(0, after - before);
      if (err.code !== undefined && FINAL_DOWNLOAD_CODES.has(err.code)) throw e;
      // Half fixed, half random: sites whose downloads failed together do not come back in lockstep.
      const cap = Math.min(maxBackoffMs, 500 * 2 ** Math.min(tryNo - 1, 16));
      const delay = Math.round(cap / 2 + (Math.random() * cap) / 2);
      if (o.cancelled?.() || Date.now() + delay > o.until) throw e;
      o.log?.warn(
        { model: hash.slice(0, 12), attempt: tryNo, resumeAt: after, delayMs: delay, code: err.code !== undefined ? grpc.status[err.code] : undefined, reason: err.details ?? (e as Error).message },
        'model download failed; resuming it after a pause',
      );
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}
