/**
 * The checked fold: one pass over an update that checks it (every proposed weight finite and within ±maxValue,
 * the delta's L2 norm) and folds it into the float64 sums (sums += a·x), instead of a norm pass and then a fold
 * pass that read the whole update twice.
 *
 * Check-then-fold still holds at block granularity: a block (a few thousand floats, still in cache) is checked
 * first and folded only when every value in it passed. A block that fails is never folded; the blocks before it
 * are taken out again (sums += −a·x), so a non-finite or out-of-bound update leaves nothing in the sums. A verdict
 * that needs the whole norm (the norm bound) comes after the last block, and unfold() takes the update out then.
 * Taking out is exact for the round's bookkeeping and within float64 rounding for the sums: each touched sum
 * differs from never having folded by at most an ulp of |sum| + |a·x| ≤ |sum| + a·maxValue, about 1e-16
 * relative, far below the float32 the result is written in (test/aggregation/checked-fold.test.ts).
 *
 * The norm is accumulated in deltaNormJs's four lanes and order, and the fold is the float64 axpy of the mean
 * (one rounding for the product, one for the sum), so with every block passing, norm and sums equal the
 * unfused norm pass + fold bit for bit. The native addon runs the whole loop when built (in the widest of its SSE2,
 * AVX2 and AVX-512 variants the CPU runs: the same bytes); the JS twin checks a block and folds it through the
 * caller's fold (the WebAssembly SIMD arena).
 */
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { asBaseBlocks, type BaseBlocks, type BaseLike, type Offsets } from './base-blocks.ts';

export type { Offsets };

/** Where a checked fold adds: the flat float64 sums (spec order), and how a block is folded without the addon. */
export interface FoldTarget {
  readonly sums: Float64Array;
  /** sums[off … off + x.length) += a · x (the mean's own fold, e.g. through its SIMD arena). */
  foldBlock(off: number, x: Float32Array, a: number): void;
}

export interface CheckedFoldResult {
  /** L2 norm of the delta (x − base, or x for a delta upload or without a base); NaN when the values failed. */
  readonly norm: number;
  /** False: a value is non-finite or beyond ±maxValue, and nothing of the update is left in the sums. */
  readonly valuesOk: boolean;
}

/**
 * Checks `update` and folds a·update into `target` in one pass (see the file's comment). `base` is flat in spec
 * order (`offsets`) or read in blocks, required for a delta upload. On valuesOk: false the sums hold what they held before.
 */
export type CheckedFold = (
  update: TensorBundle,
  isDelta: boolean,
  base: BaseLike | undefined,
  offsets: Offsets,
  target: FoldTarget,
  a: number,
  maxValue: number,
) => CheckedFoldResult;

/** Floats checked and then folded at a time by the JS twin (64 KiB of update: stays in L1/L2 between the loops). */
export const JS_FOLD_BLOCK = 16 * 1024;

/** Takes a·update out of the sums again (sums += −a·update) over each tensor's first `upTo(name)` values. */
export function unfold(update: TensorBundle, offsets: Offsets, target: FoldTarget, a: number, upTo?: (name: string, n: number) => number): void {
  for (const [name, { off, n }] of offsets) {
    const len = upTo ? upTo(name, n) : n;
    if (len <= 0) continue;
    const x = update.get(name)!.data;
    target.foldBlock(off, len === x.length ? x : x.subarray(0, len), -a);
  }
}

/** Checks one block; adds its squares to `s` (valid only when it returns true). The JS loop of deltaNormJs, plus the bound. */
function checkBlockJs(x: Float32Array, from: number, to: number, b: Float32Array | undefined, boff: number, isDelta: boolean, maxValue: number, s: Float64Array): boolean {
  let s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
  let ok = true;
  const to4 = from + (to - from) - ((to - from) % 4);
  let i = from;
  if (b && !isDelta) {
    for (; i < to4; i += 4) {
      const x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      const a = x0 - b[boff + i], c = x1 - b[boff + i + 1], d = x2 - b[boff + i + 2], e = x3 - b[boff + i + 3];
      s0 += a * a; s1 += c * c; s2 += d * d; s3 += e * e;
      // NaN compares false: one test catches it with the infinities and the too-large values.
      if (!(Math.abs(x0) <= maxValue && Math.abs(x1) <= maxValue && Math.abs(x2) <= maxValue && Math.abs(x3) <= maxValue)) ok = false;
    }
    for (; i < to; i++) {
      const a = x[i] - b[boff + i];
      s0 += a * a;
      if (!(Math.abs(x[i]) <= maxValue)) ok = false;
    }
  } else {
    for (; i < to4; i += 4) {
      const x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      s0 += x0 * x0; s1 += x1 * x1; s2 += x2 * x2; s3 += x3 * x3;
      if (isDelta) {
        const j = boff + i;
        if (!(Math.abs(b![j] + x0) <= maxValue && Math.abs(b![j + 1] + x1) <= maxValue && Math.abs(b![j + 2] + x2) <= maxValue && Math.abs(b![j + 3] + x3) <= maxValue)) ok = false;
      } else if (!(Math.abs(x0) <= maxValue && Math.abs(x1) <= maxValue && Math.abs(x2) <= maxValue && Math.abs(x3) <= maxValue)) ok = false;
    }
    for (; i < to; i++) {
      const v = x[i];
      s0 += v * v;
      if (!(Math.abs(isDelta ? b![boff + i] + v : v) <= maxValue)) ok = false;
    }
  }
  s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3;
  return ok;
}

/** The JS twin: per block, the check loop and then the caller's fold of the same (cached) block. */
export const checkedFoldJs: CheckedFold = (update, isDelta, baseLike, offsets, target, a, maxValue) => {
  const base = asBaseBlocks(baseLike);
  if (isDelta && !base) throw new Error('a delta-encoded update needs the base model');
  const lanes = new Float64Array(4);
  let sq = 0;
  // How far each tensor got folded, for taking a failed update out again.
  const folded = new Map<string, number>();
  for (const [name, { off, n }] of offsets) {
    const x = update.get(name)!.data;
    lanes.fill(0);
    for (let at = 0; at < n; at += JS_FOLD_BLOCK) {
      const end = Math.min(n, at + JS_FOLD_BLOCK);
      // The block's base values are b[i - at] for update index i.
      if (!checkBlockJs(x, at, end, base?.block(off + at, end - at), -at, isDelta, maxValue, lanes)) {
        folded.set(name, at);
        unfold(update, offsets, target, a, (t) => folded.get(t) ?? 0);
        return { norm: Number.NaN, valuesOk: false };
      }
      target.foldBlock(off + at, x.subarray(at, end), a);
      folded.set(name, end);
    }
    sq += lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
  return { norm: Math.sqrt(sq), valuesOk: true };
};

/**
 * The instruction sets the addon's fold loops are built for (fold.h FoldIsa): the portable SSE2 build, and AVX2 and
 * AVX-512 loops chosen at run time by what the CPU has. Every one gives the same bytes as the JS twin.
 */
export type NativeFoldVariant = 'sse2' | 'avx2' | 'avx512';

interface FoldAddon {
  /** `variant` undefined: the widest the CPU runs. */
  foldChecked(x: Float32Array, b: Float32Array | null, isDelta: boolean, sums: Float64Array, a: number, maxValue: number, lanes: Float64Array, variant?: NativeFoldVariant): number;
}

interface FoldVariantsAddon {
  foldVariants(): { best: NativeFoldVariant; supported: NativeFoldVariant[] };
}

/**
 * Floats per call of the addon's loop: the base is read a chunk at a time (from its file: 256 KiB, still in L2 when
 * the loop reads it). A multiple of the loop's own block (8,192) and of four, so lanes and blocks are as in one call.
 */
export const NATIVE_FOLD_CHUNK = 64 * 1024;

/** The addon's loop (fold.cc): reads the update, the base chunk and the sums in place; same lanes, same fold. */
function nativeCheckedFold(addon: FoldAddon, variant?: NativeFoldVariant): CheckedFold {
  const lanes = new Float64Array(4);
  return (update, isDelta, baseLike, offsets, target, a, maxValue) => {
    const base = asBaseBlocks(baseLike);
    if (isDelta && !base) throw new Error('a delta-encoded update needs the base model');
    let sq = 0;
    const folded = new Map<string, number>();
    for (const [name, { off, n }] of offsets) {
      const x = update.get(name)!.data;
      lanes.fill(0);
      let got = 0;
      while (got < n) {
        const len = Math.min(NATIVE_FOLD_CHUNK, n - got);
        const done = addon.foldChecked(x.subarray(got, got + len), base ? base.block(off + got, len) : null, isDelta, target.sums.subarray(off + got, off + got + len), a, maxValue, lanes, variant);
        got += done;
        if (done !== len) break;
      }
      folded.set(name, got);
      if (got !== n) {
        unfold(update, offsets, target, a, (t) => folded.get(t) ?? 0);
        return { norm: Number.NaN, valuesOk: false };
      }
      sq += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
    return { norm: Math.sqrt(sq), valuesOk: true };
  };
}

let chosen: CheckedFold | undefined;

/** checkedFoldJs's result, computed by the native addon when it is built and has the loop. */
export const checkedFold: CheckedFold = (...args) => {
  if (!chosen) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<FoldAddon> | undefined;
    chosen = typeof addon?.foldChecked === 'function' ? nativeCheckedFold(addon as FoldAddon) : checkedFoldJs;
  }
  return chosen(...args);
};

/** Which loop checkedFold runs, for logs and benchmarks. */
export function checkedFoldKernel(): 'native' | 'js' {
  const addon = loadOneDnnKernels().kernels?.addon as Partial<FoldAddon> | undefined;
  return typeof addon?.foldChecked === 'function' ? 'native' : 'js';
}

/**
 * The addon's fold variants on this CPU: the one checkedFold and checkedFoldBatch run (`best`) and every one a caller
 * may name; undefined without the addon, or with one built before the variants (its loop is SSE2's).
 */
export function nativeFoldVariants(): { best: NativeFoldVariant; supported: NativeFoldVariant[] } | undefined {
  const addon = loadOneDnnKernels().kernels?.addon as Partial<FoldVariantsAddon> | undefined;
  return typeof addon?.foldVariants === 'function' ? addon.foldVariants() : undefined;
}

/** "native avx512", "native sse2", "js": the loop the checked folds run, for logs and benchmarks. */
export function checkedFoldLoop(): string {
  if (checkedFoldKernel() === 'js') return 'js';
  return `native ${nativeFoldVariants()?.best ?? 'sse2'}`;
}

/** The addon's folds forced to one variant (tests and benches compare them; a ComposedStrategy takes them as options). Throws without the addon or when this CPU does not run `variant`. */
export function nativeCheckedFoldsWith(variant: NativeFoldVariant): { one: CheckedFold; batch: CheckedFoldBatch } {
  const addon = loadOneDnnKernels().kernels?.addon as Partial<FoldAddon & FoldBatchAddon & FoldVariantsAddon> | undefined;
  if (typeof addon?.foldChecked !== 'function' || typeof addon.foldCheckedBatch !== 'function') throw new Error('the native checked fold is unavailable: build the addon (npm run build:native)');
  const supported = nativeFoldVariants()?.supported ?? [];
  if (!supported.includes(variant)) throw new Error(`this CPU or addon build has no ${variant} fold (it has: ${supported.join(', ') || 'none that can be named'})`);
  return { one: nativeCheckedFold(addon as FoldAddon, variant), batch: nativeCheckedFoldBatch(addon as FoldBatchAddon, variant) };
}

/** One update of a batch: its values a block at a time (a decoded bundle in place, or its file), and its coefficient. */
export interface BatchUpdate {
  readonly values: BaseBlocks;
  /** sums += a · update. */
  readonly a: number;
}

/**
 * Checks k updates and folds them in one pass over the sums (the updates waiting when a fold starts): per block,
 * every update's block is checked (its own norm lanes), then each sum gets a₁·x₁, then a₂·x₂, … in the batch's
 * order. That is the order, and the rounding, of folding the updates one by one with checkedFold, so the sums and
 * the norms equal k calls of it bit for bit, at 4 + 16/k bytes per update value against the sums instead of 20.
 * Every update of a batch has the same encoding (`isDelta`). When a block of any update fails, the batch is taken
 * out again and its updates are folded one by one, so only the failing ones are refused (the sums then within
 * float64 rounding of never having held the batch, as for unfold()). Results are in the batch's order.
 */
export type CheckedFoldBatch = (
  updates: readonly BatchUpdate[],
  isDelta: boolean,
  base: BaseLike | undefined,
  offsets: Offsets,
  target: FoldTarget,
  maxValue: number,
) => CheckedFoldResult[];

/** Takes a·update out of the sums over each tensor's first `upTo(name)` values (all of them without it). */
export function unfoldBlocks(values: BaseBlocks, offsets: Offsets, target: FoldTarget, a: number, upTo?: (name: string, n: number) => number): void {
  for (const [name, { off, n }] of offsets) {
    const len = upTo ? upTo(name, n) : n;
    for (let at = 0; at < len; at += JS_FOLD_BLOCK) {
      const end = Math.min(len, at + JS_FOLD_BLOCK);
      target.foldBlock(off + at, values.block(off + at, end - at), -a);
    }
  }
}

/**
 * One pass of a batch over one tensor's range [off, off + n) of the flat sums: every update checked and folded, or
 * up to the start of the first block that fails (the same extent for every update). Returns how far it got.
 */
type BatchPass = (updates: readonly BatchUpdate[], off: number, n: number, lanes: Float64Array) => number;

/**
 * Runs `pass` over every tensor. On failure the batch is taken out again; a batch of one is then refused, a larger
 * one is folded again one update at a time (the same pass with k = 1, which is checkedFold's loop).
 */
function runBatch(updates: readonly BatchUpdate[], offsets: Offsets, target: FoldTarget, pass: BatchPass): CheckedFoldResult[] {
  const k = updates.length;
  const lanes = new Float64Array(4 * k);
  const sq = new Float64Array(k);
  const folded = new Map<string, number>();
  for (const [name, { off, n }] of offsets) {
    lanes.fill(0);
    const got = pass(updates, off, n, lanes);
    folded.set(name, got);
    if (got !== n) {
      for (const u of updates) unfoldBlocks(u.values, offsets, target, u.a, (t) => folded.get(t) ?? 0);
      if (k === 1) return [{ norm: Number.NaN, valuesOk: false }];
      return updates.flatMap((u) => runBatch([u], offsets, target, pass));
    }
    for (let j = 0; j < k; j++) sq[j] += lanes[4 * j] + lanes[4 * j + 1] + lanes[4 * j + 2] + lanes[4 * j + 3];
  }
  return Array.from(sq, (s) => ({ norm: Math.sqrt(s), valuesOk: true }));
}

/** The JS twin: per block, each update's check loop, then the caller's fold of each update's (cached) block in order. */
export const checkedFoldBatchJs: CheckedFoldBatch = (updates, isDelta, baseLike, offsets, target, maxValue) => {
  const base = asBaseBlocks(baseLike);
  if (isDelta && !base) throw new Error('a delta-encoded update needs the base model');
  const one = new Float64Array(4);
  const pass: BatchPass = (batch, off, n, lanes) => {
    for (let at = 0; at < n; at += JS_FOLD_BLOCK) {
      const end = Math.min(n, at + JS_FOLD_BLOCK);
      const b = base?.block(off + at, end - at);
      const xs = batch.map((u) => u.values.block(off + at, end - at));
      for (let j = 0; j < xs.length; j++) {
        one.set(lanes.subarray(4 * j, 4 * j + 4));
        if (!checkBlockJs(xs[j], 0, end - at, b, 0, isDelta, maxValue, one)) return at;
        lanes.set(one, 4 * j);
      }
      for (let j = 0; j < xs.length; j++) target.foldBlock(off + at, xs[j], batch[j].a);
    }
    return n;
  };
  return runBatch(updates, offsets, target, pass);
};

interface FoldBatchAddon {
  foldCheckedBatch(xs: Float32Array[], b: Float32Array | null, isDelta: boolean, sums: Float64Array, a: Float64Array, maxValue: number, lanes: Float64Array, variant?: NativeFoldVariant): number;
}

/** The most updates one call of the addon's batch loop takes (fold.h kFoldBatchMax); longer batches are cut. */
export const FOLD_BATCH_MAX = 32;

/**
 * Floats per update per call of the addon's batch loop: updates read from their files are copied a chunk at a time,
 * and k chunks (k × 64 KiB) should still be in cache when the loop reads them. A multiple of the loop's block, so
 * lanes and blocks are as in checkedFold.
 */
export const NATIVE_FOLD_BATCH_CHUNK = 16 * 1024;

/** The addon's batch loop (fold.cc fold_checked_batch), in chunks of whole blocks, so blocks and lanes are checkedFold's. */
function nativeCheckedFoldBatch(addon: FoldBatchAddon, variant?: NativeFoldVariant): CheckedFoldBatch {
  return (updates, isDelta, baseLike, offsets, target, maxValue) => {
    const base = asBaseBlocks(baseLike);
    if (isDelta && !base) throw new Error('a delta-encoded update needs the base model');
    const pass: BatchPass = (batch, off, n, lanes) => {
      const a = Float64Array.from(batch, (u) => u.a);
      let got = 0;
      while (got < n) {
        const len = Math.min(NATIVE_FOLD_BATCH_CHUNK, n - got);
        const xs = batch.map((u) => u.values.block(off + got, len));
        const done = addon.foldCheckedBatch(xs, base ? base.block(off + got, len) : null, isDelta, target.sums.subarray(off + got, off + got + len), a, maxValue, lanes, variant);
        got += done;
        if (done !== len) break;
      }
      return got;
    };
    const out: CheckedFoldResult[] = [];
    for (let i = 0; i < updates.length; i += FOLD_BATCH_MAX) out.push(...runBatch(updates.slice(i, i + FOLD_BATCH_MAX), offsets, target, pass));
    return out;
  };
}

let chosenBatch: CheckedFoldBatch | undefined;

/** checkedFoldBatchJs's result, computed by the native addon when it is built and has the batch loop. */
export const checkedFoldBatch: CheckedFoldBatch = (...args) => {
  if (!chosenBatch) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<FoldBatchAddon> | undefined;
    chosenBatch = typeof addon?.foldCheckedBatch === 'function' ? nativeCheckedFoldBatch(addon as FoldBatchAddon) : checkedFoldBatchJs;
  }
  return chosenBatch(...args);
};
