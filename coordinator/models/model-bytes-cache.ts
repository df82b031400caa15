/**
 * The bytes of the model versions being served, held in memory so that a round's downloads read the file once,
 * not once per site: every selected site downloads the same model at the start of a round, and at 1,000 sites the
 * per-download file work (open, a read on the thread pool per 64 KiB chunk, close) was ~5 % of the coordinator's
 * event loop. Model files are content-addressed and never rewritten (model-store.ts), so a cached copy cannot go
 * stale.
 *
 * Bounded by a byte budget: the most recently requested models are kept, older ones dropped as newer ones come;
 * a model larger than the whole budget is not cached (its downloads read the file as before). A failed read is
 * not kept, so the next download tries the file again. A download never waits for the whole model to be read
 * (`peek`): until the bytes are in memory it reads the file, as without a cache — waiting cost a lone download over a
 * fast link the ~0.1 s a 132 MB read takes (bench:wan, 1 Gbit/s at 20 ms: 0.97 → 0.88 of the link) — and the read
 * starts with a model's second download, so a lone download does not share the machine with it (0.90–0.91 then).
 */
import { readFile } from 'node:fs/promises';

/** Enough for two versions of a 130 MB Med3D model; a 1 MB model costs 1 MB. */
export const DEFAULT_MODEL_CACHE_BYTES = 320 * 1024 * 1024;
/** Model versions remembered as requested once (one per round; only the last few matter). */
const MAX_REMEMBERED = 64;

interface Entry {
  bytes: Promise<Buffer>;
  /** The bytes once read and checked. */
  loaded?: Buffer;
  size: number;
}

export class ModelBytesCache {
  /** Least recently requested first (a Map keeps insertion order; a hit is moved to the end). */
  private readonly entries = new Map<string, Entry>();
  private heldBytes = 0;
  /** Models requested once and not read into memory yet (oldest first, at most MAX_REMEMBERED). */
  private readonly requested = new Set<string>();

  constructor(
    readonly budgetBytes = DEFAULT_MODEL_CACHE_BYTES,
    private readonly read: (path: string) => Promise<Buffer> = readFile,
  ) {
    if (!(Number.isInteger(budgetBytes) && budgetBytes >= 0)) throw new RangeError(`budgetBytes must be an integer ≥ 0, got ${budgetBytes}`);
  }

  /**
   * The `size` bytes of the model file at `path`, read once for all callers; undefined when the model is larger than
   * the budget (read the file instead). Rejects when the file cannot be read or does not hold `size` bytes.
   */
  get(path: string, size: number): Promise<Buffer> | undefined {
    if (size > this.budgetBytes) return undefined;
    const hit = this.entries.get(path);
    if (hit) {
      this.entries.delete(path);
      this.entries.set(path, hit);
      return hit.bytes;
    }
    const bytes = this.read(path).then((b) => {
      if (b.length !== size) throw new Error(`model file ${path} holds ${b.length} bytes, its record says ${size}`);
      return b;
    });
    const entry: Entry = { bytes, size };
    bytes.then(
      (b) => (entry.loaded = b),
      () => this.forget(path, entry),
    );
    this.entries.set(path, entry);
    this.heldBytes += size;
    for (const [p, e] of this.entries) {
      if (this.heldBytes <= this.budgetBytes) break;
      if (e !== entry) this.forget(p, e);
    }
    return bytes;
  }

  /**
   * The model's bytes if they are in memory already; otherwise undefined, after starting to read them (when they fit
   * the budget), so the caller reads the file this time and a later download finds them here.
   */
  peek(path: string, size: number): Buffer | undefined {
    const hit = this.entries.get(path);
    if (hit?.loaded && hit.size === size) {
      this.entries.delete(path);
      this.entries.set(path, hit);
      return hit.loaded;
    }
    if (hit) return undefined;
    // The first request only marks the model: a lone download (one site, or a resumed one) never pays for a second
    // read of the file beside its own; the second request starts the read that every later download shares.
    if (!this.requested.delete(path)) {
      this.requested.add(path);
      if (this.requested.size > MAX_REMEMBERED) this.requested.delete(this.requested.values().next().value!);
      return undefined;
    }
    this.get(path, size)?.catch(() => undefined);
    return undefined;
  }

  /** Bytes of the models held (or being read). */
  get held(): number {
    return this.heldBytes;
  }

  private forget(path: string, entry: Entry): void {
    if (this.entries.get(path) !== entry) return;
    this.entries.delete(path);
    this.heldBytes -= entry.size;
  }
}
