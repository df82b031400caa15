/**
 * The bytes of the model versions being served, held in memory so that a round's downloads read the file once,
 * not once per site: every selected site downloads the same model at the start of a round, and at 1,000 sites the
 * per-download file work (open, a read on the thread pool per 64 KiB chunk, close) was ~5 % of the coordinator's
 * event loop. Model files are content-addressed and never rewritten (model-store.ts), so a cached copy cannot go
 * stale.
 *
 * Bounded by a byte budget: the most recently requested models are kept, older ones dropped as newer ones come;
 * a model larger than the whole budget is not cached (its downloads read the file as before). A failed read is
 * not kept, so the next download tries the file again.
 */
import { readFile } from 'node:fs/promises';

/** Enough for two versions of a 130 MB Med3D model; a 1 MB model costs 1 MB. */
export const DEFAULT_MODEL_CACHE_BYTES = 320 * 1024 * 1024;

interface Entry {
  bytes: Promise<Buffer>;
  size: number;
}

export class ModelBytesCache {
  /** Least recently requested first (a Map keeps insertion order; a hit is moved to the end). */
  private readonly entries = new Map<string, Entry>();
  private heldBytes = 0;

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
    bytes.catch(() => this.forget(path, entry));
    this.entries.set(path, entry);
    this.heldBytes += size;
    for (const [p, e] of this.entries) {
      if (this.heldBytes <= this.budgetBytes) break;
      if (e !== entry) this.forget(p, e);
    }
    return bytes;
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
