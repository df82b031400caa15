/**
 * The round's base model as the aggregation reads it: flat in spec order, one block at a time. A round that needs
 * the base (a norm bound, clipping, DP, delta uploads, a server optimiser, the robust rules) reads it once per
 * update for the norm and once at the close; holding it decoded costs one model of RSS for the whole round. Read
 * from the model file instead (the coordinator's case: model-reader.ts), it costs one block, and the page cache
 * keeps the file warm while memory allows. A decoded bundle (tests, benches) is read in place, without a copy.
 */
import type { TensorBundle } from '../../shared/tensors/bundle.ts';

export type Offsets = ReadonlyMap<string, { off: number; n: number }>;

/** Tensors read in part: the coordinator's model files (coordinator/models/model-reader.ts). */
export interface TensorReader {
  /** Element count of tensor `name`, or undefined when the file holds none by that name. */
  size(name: string): number | undefined;
  /** Copies values [from, from + out.length) of tensor `name` into `out`. */
  read(name: string, from: number, out: Float32Array): void;
  /** Closes the file (reading again reopens it). */
  close(): void;
}

/** What a strategy's begin() is given as the round's base model: decoded tensors, or a reader over its file. */
export type RoundBase = TensorBundle | TensorReader;

export function isTensorReader(b: RoundBase): b is TensorReader {
  return typeof (b as Partial<TensorReader>).read === 'function';
}

/** The base, flat in spec order, a block at a time. */
export interface BaseBlocks {
  readonly total: number;
  /**
   * Values [off, off + len): a view into the base where it is in memory in one piece, else into a buffer this
   * object reuses. Valid until the next call; callers must not write to it.
   */
  block(off: number, len: number): Float32Array;
  /** Releases the file behind it, if any. */
  close(): void;
}

/** A flat array in spec order (a view per block, no copy). */
export function flatBase(x: Float32Array): BaseBlocks {
  return { total: x.length, block: (off, len) => x.subarray(off, off + len), close: () => undefined };
}

/** Where callers may pass either: a flat array is wrapped, blocks pass through. */
export type BaseLike = Float32Array | BaseBlocks;

export function asBaseBlocks(b: BaseLike | undefined): BaseBlocks | undefined {
  return b === undefined || !(b instanceof Float32Array) ? b : flatBase(b);
}

/**
 * The shared tensors of `source` (one per entry of `offsets`, spec order) as blocks. Throws, naming it, when a
 * shared tensor is missing or has the wrong size.
 */
export function baseBlocks(source: RoundBase, offsets: Offsets): BaseBlocks {
  const reader = isTensorReader(source) ? source : undefined;
  const bundle = reader ? undefined : (source as TensorBundle);
  const segments: { name: string; off: number; n: number; data?: Float32Array }[] = [];
  let total = 0;
  for (const [name, { off, n }] of offsets) {
    const size = reader ? reader.size(name) : bundle!.get(name)?.data.length;
    if (size !== n) {
      reader?.close();
      throw new Error(`base model lacks shared tensor ${name} or has the wrong size`);
    }
    segments.push({ name, off, n, data: bundle?.get(name)?.data });
    total = Math.max(total, off + n);
  }
  segments.sort((a, b) => a.off - b.off);
  let scratch = new Float32Array(0);
  /** Index of the segment holding flat offset `off` (the last one starting at or before it). */
  const segmentAt = (off: number): number => {
    let lo = 0;
    let hi = segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (segments[mid].off <= off) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  return {
    total,
    block(off, len) {
      if (off < 0 || len < 0 || off + len > total) throw new Error(`base block [${off}, ${off + len}) is outside the model's ${total} values`);
      let k = segmentAt(off);
      const first = segments[k];
      // In memory and inside one tensor: the tensor's own values.
      if (first?.data && off + len <= first.off + first.n) return first.data.subarray(off - first.off, off - first.off + len);
      if (scratch.length < len) scratch = new Float32Array(len);
      const out = scratch.subarray(0, len);
      for (let at = 0; at < len; k++) {
        const s = segments[k];
        const from = off + at - s.off;
        const take = Math.min(s.n - from, len - at);
        if (s.data) out.set(s.data.subarray(from, from + take), at);
        else reader!.read(s.name, from, out.subarray(at, at + take));
        at += take;
      }
      return out;
    },
    close: () => reader?.close(),
  };
}

/** Values read per block by the passes over the whole base (1 MiB). */
export const BASE_BLOCK_FLOATS = 1 << 18;

/** max |value| of the base, read block by block. */
export function baseMaxAbs(base: BaseBlocks): number {
  let m = 0;
  for (let at = 0; at < base.total; at += BASE_BLOCK_FLOATS) {
    const b = base.block(at, Math.min(BASE_BLOCK_FLOATS, base.total - at));
    for (let i = 0; i < b.length; i++) {
      const a = Math.abs(b[i]);
      if (a > m) m = a;
    }
  }
  return m;
}
