/**
 * Streams a model file as DownloadModel's ModelChunk messages with a fixed set of reused buffers.
 *
 * Each chunk is read from disk (libuv thread pool) straight into a buffer laid out as the encoded message
 * (shared/protocol/chunk-codec.ts): room for the head, the data, the per-model tail. The buffer is written to
 * the call as it is (the service's serializer passes pre-encoded Buffers through) and reused only once the call
 * reports that write done (grpc-js has then copied it into a framed message of its own).
 * fs.createReadStream allocated a fresh buffer per chunk and protobuf encoding another, which with grpc-js's copy
 * made the coordinator run a full GC every 20–40 ms while serving a model.
 *
 * Given a ModelBytesCache, the chunks are copied from the model's bytes in memory (read from the file once for every
 * download of that version) instead of read from the file per download; a download that comes before those bytes
 * are in memory reads the file.
 */
import * as grpc from '@grpc/grpc-js';
import { close, open, read } from 'node:fs';
import type { ModelBytesCache } from '../models/model-bytes-cache.ts';
import { CHUNK_BYTES } from '../../shared/protocol/grpc.ts';
import { MODEL_CHUNK_HEAD_ROOM, modelChunkTail, writeModelChunkHead } from '../../shared/protocol/chunk-codec.ts';

/**
 * Bytes of model per ModelChunk, well under the 2 MiB (CHUNK_BYTES) a message may carry. Node's TLS layer sizes the
 * buffer for a connection's encrypted output by the largest write the HTTP/2 session hands it at once (all the DATA
 * queued on the connection in one turn of the event loop), and keeps that buffer until the connection closes. A
 * download's queued messages are that write, so with 2 MiB messages every site that had downloaded kept 1–4 MB of
 * native memory at the coordinator for as long as it stayed connected (bench:connection-memory measures it).
 * 64 KiB messages with two buffers keep it to about two 64 KiB writes' worth; the link is still filled, since the
 * next chunk is queued as soon as the kernel takes the one before.
 */
export const DOWNLOAD_CHUNK_BYTES = 64 * 1024;

/** Tunables; the transport benches change them in their own server process to sweep them. */
export const modelStreamOptions = {
  /** Bytes of model per ModelChunk (at most CHUNK_BYTES). */
  chunkBytes: DOWNLOAD_CHUNK_BYTES,
  /** Buffers per download: one being sent, the next read from disk meanwhile. Their sum bounds one write to TLS. */
  slots: 2,
};

/** Room for the tail: total_size (≤ 1 + 8 B) and sha256 (2 + 64 B), rounded up. */
const TAIL_ROOM = 128;

/** Free buffers, shared by all downloads; a few are kept between downloads. */
const pool = new Map<number, Buffer[]>();
const POOL_KEEP = 8;

function takeBuffer(size: number): Buffer {
  return pool.get(size)?.pop() ?? Buffer.allocUnsafe(size);
}

function giveBack(buf: Buffer): void {
  const free = pool.get(buf.length) ?? [];
  pool.set(buf.length, free);
  if (free.length < POOL_KEEP) free.push(buf);
}

/**
 * `onSent` runs once the last chunk has been handed to the call (not for a download that failed or was cut off).
 * With `cache`, the bytes come from it once it holds them (where the model fits its budget).
 */
export function streamModelFile(call: grpc.ServerWritableStream<unknown, unknown>, path: string, start: number, totalSize: number, sha256: string, onSent?: () => void, cache?: ModelBytesCache): void {
  const chunkBytes = Math.min(modelStreamOptions.chunkBytes, CHUNK_BYTES);
  const tail = modelChunkTail(totalSize, sha256);
  // A model smaller than a chunk needs a buffer of its own size, not a whole chunk's: with many downloads at once a
  // 1 MB model would otherwise hold 2 MiB per download. Sized by the model, not the offset, so every download of
  // one model shares the pool's buffers.
  const size = MODEL_CHUNK_HEAD_ROOM + Math.min(chunkBytes, totalSize) + Math.max(TAIL_ROOM, tail.length);
  const free: Buffer[] = [];
  let owned = 0; // buffers taken from the pool by this download
  let source: ChunkSource | undefined;
  let nextPos = start; // next file position to read
  let reading = false;
  let stopped = false; // everything read (or the call failed): the file is closed, buffers go back to the pool

  const stop = () => {
    if (stopped) return;
    stopped = true;
    source?.close();
    source = undefined;
    // Buffers still queued in the call stay with it (it may be cancelled and never complete them).
    for (const b of free.splice(0)) giveBack(b);
  };
  const fail = (details: string) => {
    if (stopped) return;
    stop();
    call.emit('error', { code: grpc.status.INTERNAL, details });
  };

  const pump = () => {
    if (stopped || reading || source === undefined) return;
    if (nextPos >= totalSize) {
      // Every chunk is with the call; it sends the status after the last one.
      stop();
      call.end();
      onSent?.();
      return;
    }
    let buf = free.pop();
    if (!buf) {
      if (owned >= modelStreamOptions.slots) return; // all buffers are with the call: wait for a write to complete
      buf = takeBuffer(size);
      owned++;
    }
    const slot = buf;
    const pos = nextPos;
    const want = Math.min(chunkBytes, totalSize - pos);
    reading = true;
    source.read(slot, MODEL_CHUNK_HEAD_ROOM, want, pos, (err) => {
      reading = false;
      if (stopped) return giveBack(slot);
      if (err) {
        giveBack(slot);
        return fail(`reading model failed: ${err.message}`);
      }
      nextPos = pos + want;
      const dataEnd = MODEL_CHUNK_HEAD_ROOM + want;
      tail.copy(slot, dataEnd);
      const msgStart = writeModelChunkHead(slot, MODEL_CHUNK_HEAD_ROOM, pos, want);
      // The callback runs once this buffer is no longer needed (grpc-js copied it into a framed message), so only
      // then may it be refilled.
      call.write(slot.subarray(msgStart, dataEnd + tail.length), () => {
        if (stopped) return giveBack(slot);
        free.push(slot);
        pump();
      });
      pump();
    });
  };

  call.on('cancelled', stop);
  call.on('error', stop);
  const opened = (err: Error | null, s?: ChunkSource) => {
    if (err || !s) return fail(`reading model failed: ${err?.message ?? 'no source'}`);
    if (stopped) return s.close();
    source = s;
    pump();
  };
  const inMemory = cache?.peek(path, totalSize);
  if (inMemory) opened(null, memorySource(inMemory));
  else openFileSource(path, opened);
}

/** Where a download's chunks are read from: the model file, or its bytes in memory. */
interface ChunkSource {
  /** Fills `length` bytes of `buf` at `offset` from model position `position`. */
  read(buf: Buffer, offset: number, length: number, position: number, cb: (err: Error | null) => void): void;
  close(): void;
}

function openFileSource(path: string, cb: (err: Error | null, s?: ChunkSource) => void): void {
  open(path, 'r', (err, fd) => {
    if (err) return cb(err);
    cb(null, {
      read: (buf, offset, length, position, done) => readFully(fd, buf, offset, length, position, done),
      close: () => close(fd, () => undefined),
    });
  });
}

/** A copy from memory, answered at once (the call's write callbacks come asynchronously, so pumping does not recurse deeply). */
function memorySource(bytes: Buffer): ChunkSource {
  return {
    read(buf, offset, length, position, done) {
      if (position + length > bytes.length) return done(new Error(`model bytes end at ${bytes.length}, before position ${position + length}`));
      bytes.copy(buf, offset, position, position + length);
      done(null);
    },
    close: () => undefined,
  };
}

/** fs.read until `length` bytes are in `buf` at `offset`; a file that ends early is an error. */
function readFully(fd: number, buf: Buffer, offset: number, length: number, position: number, cb: (err: Error | null) => void): void {
  read(fd, buf, offset, length, position, (err, n) => {
    if (err) return cb(err);
    if (n === length) return cb(null);
    if (n === 0) return cb(new Error(`model file ended at byte ${position}, before its recorded size`));
    readFully(fd, buf, offset + n, length - n, position + n, cb);
  });
}
