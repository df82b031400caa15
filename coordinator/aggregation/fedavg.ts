/**
 * FedAvg (McMahan et al.): the new shared weights are the sample-weighted mean of the sites' weights.
 * One float64 accumulator per value, reused across rounds: memory is two models' worth of float32, whatever the
 * site count. Float64 because one site's huge but finite values (3e38, with a weight) overflowed a float32 sum to
 * +Inf and poisoned every later round; float64 holds any weighted sum of float32 values. The mean is written
 * back as float32 into the same memory (no third model-sized buffer).
 */
import { elementCount, makeBundle, type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import type { RoundBase } from './base-blocks.ts';
import { createSimdArena64, type SimdArena64 } from './simd-axpy.ts';
import type { AggregationStrategy, RoundAggregator, UpdateInfo, Verdict } from './strategy.ts';
import { DEFAULT_RULES, nonFiniteProblem, shapeAndSamplesProblem, valueBoundProblem } from './validate.ts';

/** Floats staged at a time for the SIMD fold (1 MiB: stays in L2/L3 between the copy and the loop). */
const STAGING_FLOATS = 256 * 1024;

export class FedAvg implements AggregationStrategy {
  readonly name = 'fedavg';
  /** Kept across rounds: refilling memory costs milliseconds, faulting in fresh pages ~0.5 s per 132 MB. */
  private arena: SimdArena64 | undefined;

  begin(_current: RoundBase, specs: readonly TensorSpec[]): RoundAggregator {
    const agg = new WeightedMeanAggregator(specs, { arena: this.arena });
    this.arena = agg.simdArena;
    return agg;
  }
}

export class WeightedMeanAggregator implements RoundAggregator {
  /** Where each tensor's running sum starts in the flat accumulator. */
  private readonly offsets = new Map<string, { off: number; n: number }>();
  private readonly total: number;
  /** WebAssembly SIMD arena when available (float64 sums + a 1 MiB float32 staging block), else plain sums. */
  private readonly arena: SimdArena64 | undefined = undefined;
  private readonly sums: Float64Array;
  private totalWeight = 0;
  count = 0;

  constructor(private readonly specs: readonly TensorSpec[], opts: { simd?: boolean; arena?: SimdArena64 } = {}) {
    let off = 0;
    for (const s of specs) {
      const n = elementCount(s.shape);
      this.offsets.set(s.name, { off, n });
      off += n;
    }
    this.total = off;
    if (opts.simd !== false) this.arena = opts.arena?.floats === off ? opts.arena : createSimdArena64(off, Math.min(off, STAGING_FLOATS));
    this.sums = this.arena ? this.arena.sums : new Float64Array(off);
    if (this.arena && opts.arena === this.arena) this.sums.fill(0); // a reused arena holds last round's sums
  }

  /** The arena, so a strategy can hand it to the next round's aggregator. */
  get simdArena(): SimdArena64 | undefined {
    return this.arena;
  }

  /** Which loop folds updates, for logs and benchmarks. */
  get kernel(): 'wasm-simd' | 'js' {
    return this.arena ? 'wasm-simd' : 'js';
  }

  /** Layout, sample count and finiteness (the plain FedAvg keeps no base, so it bounds no norm). */
  check(update: TensorBundle, info: UpdateInfo): Verdict {
    const problem = shapeAndSamplesProblem(update, info, this.specs, DEFAULT_RULES) ?? nonFiniteProblem(update) ?? valueBoundProblem(update, DEFAULT_RULES.maxValue!);
    return problem ? { problem } : {};
  }

  add(update: TensorBundle, info: UpdateInfo): void {
    if (!(info.numSamples > 0)) throw new Error(`update from ${info.site} has no samples; it cannot carry FedAvg weight`);
    if (info.isDelta) throw new Error(`update from ${info.site} is delta-encoded; the plain FedAvg folds weights (use the composed strategy)`);
    this.addWeighted(update, info.numSamples, info.site);
    this.totalWeight += info.numSamples;
  }

  /**
   * Changes the weight of an update already added from `from` to `to` (maxWeightShare): folds (to − from) · update.
   * Exact in float64, so reweighting after the fact gives the sum that folding with `to` would have given.
   */
  reweight(update: TensorBundle, info: UpdateInfo, to: number): void {
    if (!(to > 0) || to > info.numSamples) throw new Error(`weight of ${info.site} can only be lowered, to a positive value (asked ${to} of ${info.numSamples})`);
    this.addWeighted(update, to - info.numSamples, info.site);
    this.count--; // the same update, not another one
    this.totalWeight += to - info.numSamples;
  }

  /** sums += w · update (no bookkeeping of weights: the caller keeps them). */
  addWeighted(update: TensorBundle, w: number, site = 'an update'): void {
    for (const [name, { n }] of this.offsets) {
      const t = update.get(name);
      if (!t || t.data.length !== n) throw new Error(`update from ${site} lacks tensor ${name} or has the wrong size`);
    }
    for (const [name, { off }] of this.offsets) this.foldBlock(off, update.get(name)!.data, w);
    this.count++;
  }

  /**
   * sums[off … off + x.length) += w · x: through the SIMD arena block by block (a copy into wasm memory at memcpy
   * speed, still in cache for the f32x4 loop; the staging block keeps the arena at one model plus 1 MiB), else in JS.
   */
  foldBlock(off: number, x: Float32Array, w: number): void {
    const arena = this.arena;
    if (!arena) {
      axpy64(this.sums.subarray(off, off + x.length), x, w);
      return;
    }
    const n = x.length;
    for (let a = 0; a < n; a += arena.stagingFloats) {
      const len = Math.min(arena.stagingFloats, n - a);
      arena.staging.set(len === n ? x : x.subarray(a, a + len));
      arena.axpyBlock(off + a, 0, len, w);
    }
  }

  /** The running float64 sums, flat in spec order (valid until the strategy's next begin()). */
  get rawSums(): Float64Array {
    return this.sums;
  }

  /**
   * Float32 output over the sums' own memory, for writing the result in place: element i lives in bytes
   * [4i, 4i+4), which only overlap sums already read when the loop goes upwards and reads sums[i] before it
   * writes out[i]. After that the sums are gone (a reused arena is zeroed at the next begin()).
   */
  get outputInPlace(): Float32Array {
    return new Float32Array(this.sums.buffer, this.sums.byteOffset, this.total);
  }

  /** Σ weights so far (the divisor of the mean). */
  get weight(): number {
    return this.totalWeight;
  }

  /** The mean, as float32 views into the sums' memory (no model-sized copy): valid until the strategy's next begin(). */
  finish(): TensorBundle {
    if (this.count === 0) throw new Error('no updates to aggregate');
    const inv = 1 / this.totalWeight;
    const sums = this.sums;
    const y = this.outputInPlace;
    for (let i = 0; i < this.total; i++) y[i] = sums[i] * inv;
    const out: NamedTensor[] = [];
    for (const s of this.specs) {
      const { off, n } = this.offsets.get(s.name)!;
      out.push({ name: s.name, dtype: 'F32', shape: [...s.shape], data: y.subarray(off, off + n) });
    }
    return makeBundle(out);
  }
}

/** acc += w·x with float64 sums (the fallback where wasm SIMD is missing). */
export function axpy64(acc: Float64Array, x: Float32Array, w: number): void {
  const n = x.length;
  for (let i = 0; i < n; i++) acc[i] += w * x[i];
}

/** acc += w·x in plain JS, unrolled by 4 (the fallback where wasm SIMD is missing; ~3 GB/s here). */
export function axpy(acc: Float32Array, x: Float32Array, w: number): void {
  const n = x.length;
  const n4 = n - (n % 4);
  let i = 0;
  for (; i < n4; i += 4) {
    acc[i] += w * x[i];
    acc[i + 1] += w * x[i + 1];
    acc[i + 2] += w * x[i + 2];
    acc[i + 3] += w * x[i + 3];
  }
  for (; i < n; i++) acc[i] += w * x[i];
}
