/**
 * The model bytes held for downloads (coordinator/models/model-bytes-cache.ts): one read of the file for every
 * download of a version, a byte budget that drops the least recently requested versions first, models over the
 * budget left to the file, and a failed read that is tried again rather than kept.
 */
import { describe, expect, it } from 'vitest';
import { ModelBytesCache } from '../../coordinator/models/model-bytes-cache.ts';

/** A reader that counts reads per path and answers `size(path)` bytes. */
function countingReader(size: (path: string) => number = () => 100) {
  const reads = new Map<string, number>();
  let failNext = false;
  const read = async (path: string) => {
    reads.set(path, (reads.get(path) ?? 0) + 1);
    if (failNext) {
      failNext = false;
      throw new Error('EIO');
    }
    return Buffer.alloc(size(path), 1);
  };
  return { read, reads, failOnce: () => (failNext = true) };
}

describe('model bytes cache', () => {
  it('reads a model once for any number of downloads, concurrent or later', async () => {
    const r = countingReader();
    const cache = new ModelBytesCache(1000, r.read);
    const all = await Promise.all(Array.from({ length: 50 }, () => cache.get('/m/a', 100)));
    expect(all.every((b) => b === all[0])).toBe(true);
    await cache.get('/m/a', 100);
    expect(r.reads.get('/m/a')).toBe(1);
    expect(cache.held).toBe(100);
  });

  it('keeps the most recently requested models within its budget and leaves larger ones to the file', async () => {
    const r = countingReader();
    const cache = new ModelBytesCache(250, r.read);
    await cache.get('/m/a', 100);
    await cache.get('/m/b', 100);
    await cache.get('/m/a', 100); // a is now the most recent
    await cache.get('/m/c', 100); // over budget: b goes
    expect(cache.held).toBe(200);
    await cache.get('/m/a', 100);
    await cache.get('/m/b', 100);
    expect(r.reads.get('/m/a')).toBe(1);
    expect(r.reads.get('/m/b')).toBe(2);
    expect(cache.get('/m/big', 251)).toBeUndefined();
    expect(r.reads.has('/m/big')).toBe(false);
  });

  it('refuses a file of another size than recorded, and reads again after a failure', async () => {
    const r = countingReader((p) => (p === '/m/short' ? 50 : 100));
    const cache = new ModelBytesCache(1000, r.read);
    await expect(cache.get('/m/short', 100)!).rejects.toThrow(/holds 50 bytes, its record says 100/);
    r.failOnce();
    await expect(cache.get('/m/a', 100)!).rejects.toThrow(/EIO/);
    expect(cache.held).toBe(0);
    await expect(cache.get('/m/a', 100)!).resolves.toHaveLength(100);
    expect(r.reads.get('/m/a')).toBe(2);
  });

  it('refuses a budget that is not a whole number of bytes', () => {
    expect(() => new ModelBytesCache(-1)).toThrow(/budgetBytes must be an integer ≥ 0/);
  });
});
