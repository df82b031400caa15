import { describe, expect, it } from 'vitest';
import { ByteLruCache } from '../../site-agent/data/lru-cache.ts';

const bytes = (n: number): Uint8Array => new Uint8Array(n);

describe('ByteLruCache', () => {
  it('evicts least recently used entries to stay within the byte budget', () => {
    const evicted: string[] = [];
    const c = new ByteLruCache<string, Uint8Array>(100, (v) => v.byteLength, (k) => void evicted.push(k));
    c.set('a', bytes(40));
    c.set('b', bytes(40));
    expect(c.get('a')).toBeDefined(); // a is now most recent
    c.set('c', bytes(40)); // must evict b, not a
    expect(evicted).toEqual(['b']);
    expect([c.has('a'), c.has('b'), c.has('c')]).toEqual([true, false, true]);
    expect(c.stats()).toMatchObject({ bytes: 80, entries: 2, evictions: 1, peakBytes: 80 });
    c.set('a', bytes(10)); // replacing re-counts
    expect(c.stats().bytes).toBe(50);
  });

  it('hands out but never keeps a value larger than the budget', async () => {
    const c = new ByteLruCache<string, Uint8Array>(10, (v) => v.byteLength);
    c.set('small', bytes(5));
    const big = await c.getOrLoad('big', async () => bytes(11));
    expect(big.byteLength).toBe(11);
    expect(c.has('big')).toBe(false);
    expect(c.has('small')).toBe(true);
    expect(c.stats()).toMatchObject({ oversize: 1, bytes: 5 });
  });

  it('loads once for concurrent callers and does not cache failures', async () => {
    const c = new ByteLruCache<string, Uint8Array>(1000, (v) => v.byteLength);
    let loads = 0;
    const load = async (): Promise<Uint8Array> => {
      loads++;
      await new Promise((r) => setTimeout(r, 5));
      return bytes(3);
    };
    const [a, b] = await Promise.all([c.getOrLoad('k', load), c.getOrLoad('k', load)]);
    expect(a).toBe(b);
    expect(loads).toBe(1);
    await c.getOrLoad('k', load);
    expect(loads).toBe(1);
    expect(c.stats()).toMatchObject({ hits: 2, misses: 1 });

    let tries = 0;
    const failing = async (): Promise<Uint8Array> => {
      tries++;
      throw new Error('boom');
    };
    await expect(c.getOrLoad('bad', failing)).rejects.toThrow('boom');
    await expect(c.getOrLoad('bad', failing)).rejects.toThrow('boom');
    expect(tries).toBe(2);
  });

  it('never holds more than maxBytes under a long random access pattern', () => {
    const c = new ByteLruCache<number, Uint8Array>(1000, (v) => v.byteLength);
    let s = 7;
    for (let i = 0; i < 5000; i++) {
      s = (s * 1103515245 + 12345) % 2147483648;
      const k = s % 200;
      if (!c.get(k)) c.set(k, bytes(50 + (k % 7) * 30));
      expect(c.stats().bytes).toBeLessThanOrEqual(1000);
    }
    expect(c.stats().peakBytes).toBeLessThanOrEqual(1000);
    expect(c.stats().evictions).toBeGreaterThan(100);
  });
});
