/**
 * The download path's hand-encoded ModelChunk must be byte-identical to protobufjs's, and the upload
 * path's threaded hashing writer must store and hash exactly what it was given, resume, and clean up.
 */
import { describe, expect, it } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { getHeapStatistics } from 'node:v8';
import { join } from 'node:path';
import protobuf from 'protobufjs';
import { MODEL_CHUNK_HEAD_ROOM, modelChunkTail, writeModelChunkHead } from '../../shared/protocol/chunk-codec.ts';
import { HashingFileWriter } from '../../shared/protocol/hashing-writer.ts';
import { PROTO_FILE } from '../../shared/protocol/grpc.ts';


describe('hand-encoded ModelChunk', () => {
  it('matches protobufjs byte for byte, for small and large offsets and sizes', async () => {
    const root = await protobuf.load(PROTO_FILE);
    const ModelChunk = root.lookupType('medfl.v1.ModelChunk');
    const sha = 'ab'.repeat(32);
    for (const [offset, len, total] of [[0, 5, 5], [127, 300, 1000], [2 ** 31 + 7, 70_000, 2 ** 33], [1, 1, 2 ** 40]] as const) {
      const data = randomBytes(len);
      const buf = Buffer.alloc(MODEL_CHUNK_HEAD_ROOM + len);
      data.copy(buf, MODEL_CHUNK_HEAD_ROOM);
      const start = writeModelChunkHead(buf, MODEL_CHUNK_HEAD_ROOM, offset, len);
      const ours = Buffer.concat([buf.subarray(start), modelChunkTail(total, sha)]);
      const theirs = Buffer.from(ModelChunk.encode(ModelChunk.fromObject({ offset, data, totalSize: total, sha256: sha })).finish());
      expect(ours.equals(theirs)).toBe(true);
    }
  });

  it('refuses values it cannot encode', () => {
    expect(() => writeModelChunkHead(Buffer.alloc(4), 2, 0, 10)).toThrow(/need \d+ bytes before the data/);
    expect(() => modelChunkTail(-1, 'x')).toThrow(/non-negative/);
  });
});

describe('threaded hashing file writer', () => {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-writer-'));

  it('hands each chunk\'s memory back once written (for the sender to reuse)', async () => {
    const w = new HashingFileWriter(join(dir, 'r.part'));
    const back: Uint8Array[] = [];
    w.onWritten = (m) => back.push(m);
    const chunk = Buffer.from(new ArrayBuffer(200_000));
    chunk.fill(7);
    w.write(chunk, 0, true);
    expect(chunk.length).toBe(0); // transferred away
    await w.finish({ fsync: false });
    expect(back.length).toBe(1);
    expect(back[0]!.byteLength).toBe(200_000);
    expect(back[0]!.every((b) => b === 7)).toBe(true);
  });

  it('keeps the memory of written chunks on its thread when nobody asked for it back', async () => {
    // Sent back unasked, each chunk would land on this thread's heap as garbage (32 MiB of external memory for its
    // collector here). Kept there, this thread's heap takes none of it back once the file is finished.
    const w = new HashingFileWriter(join(dir, 'kept.part'));
    const chunks = Array.from({ length: 32 }, () => Buffer.from(new ArrayBuffer(1 << 20)).fill(3));
    chunks.forEach((c, i) => w.write(c, i << 20, true));
    expect(chunks.every((c) => c.length === 0)).toBe(true); // transferred away
    const sent = getHeapStatistics().external_memory;
    await w.finish({ fsync: false });
    expect(getHeapStatistics().external_memory - sent).toBeLessThan(8 << 20);
    expect(readFileSync(join(dir, 'kept.part')).length).toBe(32 << 20);
  });

  it('writes and hashes out-of-thread exactly what it was given, transferred or copied', async () => {
    const path = join(dir, 'a.part');
    const w = new HashingFileWriter(path);
    const parts = [randomBytes(100), randomBytes(200_000), randomBytes(3)];
    let pos = 0;
    for (const [i, p] of parts.entries()) {
      w.write(Buffer.from(p), pos, i === 1);
      pos += p.length;
    }
    const digest = await w.finish({ fsync: true });
    const all = Buffer.concat(parts);
    expect(readFileSync(path).equals(all)).toBe(true);
    expect(digest).toBe(createHash('sha256').update(all).digest('hex'));
  });

  it('resumes a file: hashes the bytes already there, then the new ones', async () => {
    const path = join(dir, 'b.part');
    const head = randomBytes(1000);
    writeFileSync(path, head);
    const tail = randomBytes(5000);
    const w = new HashingFileWriter(path, { hashExisting: head.length });
    w.write(Buffer.from(tail), head.length);
    const digest = await w.finish();
    expect(digest).toBe(createHash('sha256').update(Buffer.concat([head, tail])).digest('hex'));
  });

  it('keeps many chunks in flight and still writes, hashes and hands back every one of them', async () => {
    const path = join(dir, 'many.part');
    const w = new HashingFileWriter(path);
    let back = 0;
    w.onWritten = () => back++;
    const parts = Array.from({ length: 40 }, () => randomBytes(1 << 20));
    parts.forEach((p, i) => w.write(Buffer.from(p), i << 20, true));
    expect(w.queuedBytes).toBeGreaterThan(0);
    const digest = await w.finish({ fsync: true });
    const all = Buffer.concat(parts);
    expect(readFileSync(path).equals(all)).toBe(true);
    expect(digest).toBe(createHash('sha256').update(all).digest('hex'));
    expect(back).toBe(40);
    expect(w.queuedBytes).toBe(0);
    expect(w.progressiveSyncs).toBe(0); // not asked for
  });

  it('syncs as it writes when asked (every syncEveryBytes), and the file is still exactly what was given', async () => {
    const path = join(dir, 'synced.part');
    const w = new HashingFileWriter(path, { syncEveryBytes: 4 << 20 });
    const parts = Array.from({ length: 20 }, () => randomBytes(1 << 20));
    // Paced, so writes complete between posts and the 4 MiB marks are crossed while writing, not all at the end.
    for (const [i, p] of parts.entries()) {
      w.write(Buffer.from(p), i << 20, true);
      await w.whenBelow(0);
    }
    const digest = await w.finish({ fsync: true });
    const all = Buffer.concat(parts);
    expect(readFileSync(path).equals(all)).toBe(true);
    expect(digest).toBe(createHash('sha256').update(all).digest('hex'));
    // 20 MiB at one sync per 4 MiB: up to 5, fewer when a sync is still running as the next mark passes.
    expect(w.progressiveSyncs).toBeGreaterThanOrEqual(1);
    expect(w.progressiveSyncs).toBeLessThanOrEqual(5);
  });

  it('fails the file when a progressive sync fails (after an error the kernel may call a later fsync clean)', async () => {
    // /dev/zero takes positioned writes but cannot be synced (fdatasync: EINVAL), like a disk that reports a
    // write-back error. Reached through a symlink, so nothing can ever unlink the device itself.
    const link = join(dir, 'unsyncable');
    symlinkSync('/dev/zero', link);
    const w = new HashingFileWriter(link, { syncEveryBytes: 1024 });
    const failed = new Promise<Error>((resolve) => (w.onError = resolve));
    w.write(randomBytes(4096), 0); // the write itself succeeds; the sync after it fails
    expect((await failed).message).toMatch(/EINVAL/);
    expect(() => w.write(randomBytes(10), 4096)).toThrow(/EINVAL/);
    await expect(w.finish({ fsync: true })).rejects.toThrow(/EINVAL/);
  });

  it('closes a discarded file only after its writes in flight are done (a reused descriptor would take them)', async () => {
    // Closing under a write in flight would let the next open() reuse the descriptor number and take the write.
    // /proc/self/fd shows when the descriptor closes; by then every chunk must have come back written.
    const path = join(dir, 'd1.part');
    const a = new HashingFileWriter(path);
    let back = 0;
    a.onWritten = () => back++;
    for (let i = 0; i < 32; i++) a.write(randomBytes(1 << 20), i << 20, true);
    a.discard();
    const open = () => readdirSync('/proc/self/fd').some((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`).startsWith(path);
      } catch {
        return false;
      }
    });
    expect(open()).toBe(true);
    const deadline = Date.now() + 10_000;
    while (open() && Date.now() < deadline) await new Promise((r) => setImmediate(r));
    expect(open()).toBe(false);
    expect(back).toBe(32);
    expect(existsSync(path)).toBe(false);
  });

  it('discard deletes the file, even mid-write', async () => {
    const path = join(dir, 'c.part');
    const w = new HashingFileWriter(path);
    w.write(randomBytes(300_000), 0, true);
    w.discard();
    await new Promise((r) => setTimeout(r, 200));
    expect(existsSync(path)).toBe(false);
  });
});
