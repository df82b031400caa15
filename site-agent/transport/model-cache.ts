/**
 * Global model versions cached by hash. A version already here is never downloaded again; a download
 * cut off midway resumes from the bytes already in its .part file; a finished file is kept only if its
 * SHA-256 is the one asked for.
 */
import { existsSync, mkdirSync, openSync, closeSync, writeSync, fsyncSync, renameSync, statSync, readdirSync, rmSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { sha256File, SHA256_HEX, sha256Hex } from '../../shared/util/hash.ts';
import { fsyncDir } from '../../shared/util/fs-atomic.ts';
import type { FederationClient } from './client.ts';

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
   */
  async ensure(client: FederationClient, hash: string, expectedSize: number, onProgress?: (done: number, total: number) => void): Promise<number> {
    if (this.has(hash)) return 0;
    const part = join(this.dir, `${hash}.part`);
    let offset = existsSync(part) ? statSync(part).size : 0;
    if (offset > expectedSize) {
      rmSync(part, { force: true });
      offset = 0;
    }
    const fd = openSync(part, offset > 0 ? 'a' : 'w');
    let received = 0;
    try {
      await new Promise<void>((resolve, reject) => {
        const stream = client.downloadModel(hash, offset);
        let pos = offset;
        stream.on('data', (c: { offset: number; data: Buffer; totalSize: number; sha256: string }) => {
          try {
            if (c.sha256 !== hash) throw new Error(`server sent chunks of model ${c.sha256.slice(0, 12)}…, not ${hash.slice(0, 12)}…`);
            if (c.offset !== pos) throw new Error(`out-of-order model chunk at ${c.offset}, expected ${pos}`);
            if (c.totalSize !== expectedSize) throw new Error(`model is ${c.totalSize} bytes, the task said ${expectedSize}`);
            if (pos + c.data.length > expectedSize) throw new Error('model chunk runs past the announced size');
            let off = 0;
            while (off < c.data.length) off += writeSync(fd, c.data, off, c.data.length - off);
            pos += c.data.length;
            received += c.data.length;
            onProgress?.(pos, expectedSize);
          } catch (e) {
            stream.cancel();
            reject(e);
          }
        });
        stream.on('error', reject);
        stream.on('end', () => resolve());
      });
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    const size = statSync(part).size;
    if (size !== expectedSize) throw new Error(`model download ended at ${size} of ${expectedSize} bytes; it will resume from there`);
    const digest = await sha256File(part);
    if (digest !== hash) {
      rmSync(part, { force: true });
      throw new Error(`downloaded model hashes to ${digest.slice(0, 12)}…, expected ${hash.slice(0, 12)}…; discarded, will download again`);
    }
    renameSync(part, this.pathFor(hash));
    fsyncDir(this.dir);
    return received;
  }
}
