/**
 * The model download's buffers (coordinator/server/model-stream.ts): a model smaller than one chunk is sent from a
 * buffer of its own size (with many downloads at once, a whole 2 MiB chunk buffer each for a 1 MB model doubled
 * what the downloads held), the messages still decode to the file's bytes, from any offset, and a download never has
 * more than about 128 KiB with the call at once (what one write to the connection's TLS layer holds, and what that
 * layer then keeps for the connection's life).
 */
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { afterAll, describe, expect, it } from 'vitest';
import { DOWNLOAD_CHUNK_BYTES, modelStreamOptions, streamModelFile } from '../../coordinator/server/model-stream.ts';
import { ModelBytesCache } from '../../coordinator/models/model-bytes-cache.ts';
import { loadProto } from '../../shared/protocol/grpc.ts';
import { sha256Hex } from '../../shared/util/hash.ts';

const work = mkdtempSync(join(tmpdir(), 'medfl-model-stream-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** The bytes of each buffer a download wrote from (its whole allocation, not only the message in it). */
let heldBytes: number[] = [];

/**
 * Streams `bytes` from `offset` through a call that copies each message and completes the write at once (as grpc-js
 * does: the buffer may then be refilled); resolves the messages.
 */
function stream(bytes: Buffer, offset = 0, cache?: ModelBytesCache, existing?: string): Promise<Buffer[]> {
  heldBytes = [];
  const path = existing ?? join(work, `model-${Math.random()}.safetensors`);
  if (!existing) writeFileSync(path, bytes);
  const written: Buffer[] = [];
  return new Promise((resolve, reject) => {
    const call = Object.assign(new EventEmitter(), {
      write(buf: Buffer, done: () => void) {
        heldBytes.push(buf.buffer.byteLength);
        written.push(Buffer.from(buf));
        setImmediate(done);
        return true;
      },
      end: () => resolve(written),
    });
    call.on('error', (e: { details: string }) => reject(new Error(e.details)));
    streamModelFile(call as unknown as grpc.ServerWritableStream<unknown, unknown>, path, offset, bytes.length, sha256Hex(bytes), undefined, cache);
  });
}

const decode = (buf: Buffer) => loadProto().Federation.service.DownloadModel!.responseDeserialize(buf) as { offset: number; data: Buffer; totalSize: number };

describe('model download buffers', () => {
  it('sends a model smaller than a chunk from a buffer of about its size, not a whole chunk', async () => {
    const model = randomBytes(40_000);
    const [message, ...more] = await stream(model);
    expect(more).toHaveLength(0);
    expect(heldBytes[0]).toBeLessThan(model.length + 4096);
    expect(heldBytes[0]).toBeLessThan(DOWNLOAD_CHUNK_BYTES);
    const m = decode(message!);
    expect(m).toMatchObject({ offset: 0, totalSize: model.length });
    expect(Buffer.compare(m.data, model)).toBe(0);
  });

  it('still cuts a larger model into chunks, and a resumed download sends the rest', async () => {
    const saved = modelStreamOptions.chunkBytes;
    modelStreamOptions.chunkBytes = 64 * 1024;
    try {
      const model = randomBytes(200_000);
      for (const offset of [0, 70_000]) {
        const messages = (await stream(model, offset)).map(decode);
        expect(messages.map((m) => m.offset)).toEqual(offset === 0 ? [0, 65536, 131072, 196608] : [70_000, 135_536]);
        expect(Buffer.compare(Buffer.concat(messages.map((m) => m.data)), model.subarray(offset))).toBe(0);
      }
    } finally {
      modelStreamOptions.chunkBytes = saved;
    }
  });

  it('has at most two small messages with the call at once, so one write to TLS stays small whatever the model size', async () => {
    const model = randomBytes(1024 * 1024 + 1234);
    const path = join(work, 'model-outstanding.safetensors');
    writeFileSync(path, model);
    let outstanding = 0;
    let most = 0;
    const received: Buffer[] = [];
    await new Promise<void>((resolve, reject) => {
      const call = Object.assign(new EventEmitter(), {
        write(buf: Buffer, done: () => void) {
          outstanding += buf.length;
          most = Math.max(most, outstanding);
          received.push(Buffer.from(buf));
          // Completed late, as when the socket is slow: everything the stream wrote meanwhile is with the call.
          setTimeout(() => {
            outstanding -= buf.length;
            done();
          }, 5);
          return true;
        },
        end: () => resolve(),
      });
      call.on('error', (e: { details: string }) => reject(new Error(e.details)));
      streamModelFile(call as unknown as grpc.ServerWritableStream<unknown, unknown>, path, 0, model.length, sha256Hex(model));
    });
    expect(most).toBeLessThanOrEqual(2 * (64 * 1024 + 256));
    const messages = received.map(decode);
    expect(Buffer.compare(Buffer.concat(messages.map((m) => m.data)), model)).toBe(0);
  });

  it('serves every download of a model from memory once the cache has read its file, from any offset', async () => {
    const saved = modelStreamOptions.chunkBytes;
    modelStreamOptions.chunkBytes = 64 * 1024;
    try {
      const model = randomBytes(300_000);
      const path = join(work, 'model-cached.safetensors');
      writeFileSync(path, model);
      const cache = new ModelBytesCache();
      for (let i = 0; i < 2; i++) {
        const early = (await stream(model, 0, cache, path)).map(decode);
        expect(Buffer.compare(Buffer.concat(early.map((m) => m.data)), model)).toBe(0);
        expect(cache.held).toBe(i === 0 ? 0 : model.length); // the second download starts the one read of the file
      }
      await cache.get(path, model.length); // that read (no download waited for it)
      // The file is gone: only the cache can serve the next downloads (the file is read once, not per download).
      rmSync(path);
      for (const offset of [0, 100_000]) {
        const messages = (await stream(model, offset, cache, path)).map(decode);
        expect(messages.map((m) => m.offset)).toEqual(offset === 0 ? [0, 65536, 131072, 196608, 262144] : [100_000, 165_536, 231_072, 296_608]);
        expect(Buffer.compare(Buffer.concat(messages.map((m) => m.data)), model.subarray(offset))).toBe(0);
      }
    } finally {
      modelStreamOptions.chunkBytes = saved;
    }
  });

  it('reads the file while the cache cannot hold the model, and keeps nothing from a failed read', async () => {
    const model = randomBytes(1000);
    const cache = new ModelBytesCache(1024 * 1024, async () => Buffer.alloc(10));
    const path = join(work, 'model-bad-cache.safetensors');
    writeFileSync(path, model);
    for (let i = 0; i < 3; i++) {
      const messages = (await stream(model, 0, cache, path)).map(decode);
      expect(Buffer.compare(Buffer.concat(messages.map((m) => m.data)), model)).toBe(0);
      await new Promise((r) => setImmediate(r));
      expect(cache.held).toBe(0);
    }
  });

  it('does not hold a download back until the whole model is in memory', async () => {
    const model = randomBytes(1000);
    const path = join(work, 'model-slow-cache.safetensors');
    writeFileSync(path, model);
    // A cache whose read never finishes: the download must come from the file all the same.
    const cache = new ModelBytesCache(1024 * 1024, () => new Promise<Buffer>(() => undefined));
    for (let i = 0; i < 3; i++) {
      const messages = (await stream(model, 0, cache, path)).map(decode);
      expect(Buffer.compare(Buffer.concat(messages.map((m) => m.data)), model)).toBe(0);
    }
    expect(cache.held).toBe(1000);
  });
});
