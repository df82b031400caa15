/**
 * A least-recently-used cache bounded in bytes, with single-flight async loading: a site with hundreds of
 * cases keeps only as many prepared volumes in memory as fit in `maxBytes`, and two callers asking for the
 * same uncached case share one read.
 *
 * Hand-written (about 100 lines) rather than the `lru-cache` package: the repository does not depend on it,
 * and the accounting this project needs to test (peak bytes, evictions, an entry larger than the budget being
 * handed out but never kept) is easier to state here than to infer from a general-purpose library.
 */

export interface CacheStats {
  /** Bytes currently held. */
  readonly bytes: number;
  /** Highest `bytes` ever held (after eviction); never above maxBytes. */
  readonly peakBytes: number;
  readonly entries: number;
  readonly hits: number;
  readonly misses: number;
  readonly evictions: number;
  /** Loaded values too big to keep at all (returned to the caller, not cached). */
  readonly oversize: number;
  readonly maxBytes: number;
}

export class ByteLruCache<K, V> {
  // Map iteration order is insertion order: the first key is the least recently used.
  private readonly map = new Map<K, { value: V; bytes: number }>();
  private readonly inflight = new Map<K, Promise<V>>();
  private bytes = 0;
  private peak = 0;
  private hits = 0;
  private misses = 0;
  private evictions = 0;
  private oversize = 0;

  constructor(
    readonly maxBytes: number,
    private readonly sizeOf: (v: V) => number,
    private readonly onEvict?: (key: K, bytes: number) => void,
  ) {
    if (!(Number.isFinite(maxBytes) && maxBytes >= 0)) throw new RangeError(`maxBytes must be a non-negative number, got ${maxBytes}`);
  }

  /** The cached value (and mark it most recently used), or undefined. */
  get(key: K): V | undefined {
    const e = this.map.get(key);
    if (!e) return undefined;
    this.map.delete(key);
    this.map.set(key, e);
    return e.value;
  }

  has(key: K): boolean {
    return this.map.has(key);
  }

  /** Insert (replacing any old value) and evict least-recently-used entries until within the budget. */
  set(key: K, value: V): void {
    const bytes = this.sizeOf(value);
    if (!(Number.isFinite(bytes) && bytes >= 0)) throw new RangeError(`sizeOf returned ${bytes}`);
    this.delete(key);
    if (bytes > this.maxBytes) {
      this.oversize++;
      return;
    }
    while (this.bytes + bytes > this.maxBytes) this.evictOldest();
    this.map.set(key, { value, bytes });
    this.bytes += bytes;
    if (this.bytes > this.peak) this.peak = this.bytes;
  }

  delete(key: K): boolean {
    const e = this.map.get(key);
    if (!e) return false;
    this.map.delete(key);
    this.bytes -= e.bytes;
    return true;
  }

  clear(): void {
    this.map.clear();
    this.bytes = 0;
  }

  /** Cached value, or load it once (concurrent callers for the same key share the load). Failures are not cached. */
  async getOrLoad(key: K, load: () => Promise<V>): Promise<V> {
    const hit = this.get(key);
    if (hit !== undefined) {
      this.hits++;
      return hit;
    }
    const pending = this.inflight.get(key);
    if (pending) {
      this.hits++;
      return pending;
    }
    this.misses++;
    const p = (async () => {
      try {
        const v = await load();
        this.set(key, v);
        return v;
      } finally {
        this.inflight.delete(key);
      }
    })();
    this.inflight.set(key, p);
    return p;
  }

  stats(): CacheStats {
    return {
      bytes: this.bytes, peakBytes: this.peak, entries: this.map.size, hits: this.hits, misses: this.misses,
      evictions: this.evictions, oversize: this.oversize, maxBytes: this.maxBytes,
    };
  }

  private evictOldest(): void {
    const first = this.map.keys().next();
    if (first.done) return;
    const key = first.value;
    const e = this.map.get(key)!;
    this.map.delete(key);
    this.bytes -= e.bytes;
    this.evictions++;
    this.onEvict?.(key, e.bytes);
  }
}
