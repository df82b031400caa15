/**
 * FedAvg (McMahan et al.): the new shared weights are the sample-weighted mean of the sites' weights.
 * One float32 accumulator per tensor, reused across the round: memory is one model, whatever the site count.
 */
import { elementCount, makeBundle, type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { createSimdArena, type SimdArena } from './simd-axpy.ts';
import type { AggregationStrategy, RoundAggregator, UpdateInfo, Verdict } from './strategy.ts';
import { DEFAULT_RULES, nonFiniteProblem, shapeAndSamplesProblem } from './validate.ts';

/** Floats staged at a time for the SIMD fold (1 MiB: stays in L2/L3 between the copy and the loop). */
const STAGING_FLOATS = 256 * 1024;

export class FedAvg implements AggregationStrategy {
  readonly name = 'fedavg';
  /** Kept across rounds: refilling memory costs milliseconds, faulting in fresh pages ~0.5 s per 132 MB. */
  private arena: SimdArena | undefined;

  begin(_current: TensorBundle, specs: readonly TensorSpec[]): RoundAggregator {
    const agg = new WeightedMeanAggregator(specs, { arena: this.arena });
    this.arena = agg.simdArena;
    return agg;
  }
}

export class WeightedMeanAggregator implements RoundAggregator {
  /** Where each tensor's running sum starts in the flat accumulator. */
  private readonly offsets = new Map<string, { off: number; n: number }>();
  private readonly total: number;
  /** WebAssembly SIMD arena when available (sums + a 1 MiB staging block), else plain per-tensor sums. */
  private readonly arena: SimdArena | undefined = undefined;
  private readonly sums: Float32Array;
  private totalWeight = 0;
  count = 0;

  constructor(private readonly specs: readonly TensorSpec[], opts: { simd?: boolean; arena?: SimdArena } = {}) {
    let off = 0;
    for (const s of specs) {
      const n = elementCount(s.shape);
      this.offsets.set(s.name, { off, n });
      off += n;
    }
    this.total = off;
    if (opts.simd !== false) this.arena = opts.arena?.floats === off ? opts.arena : createSimdArena(off, Math.min(off, STAGING_FLOATS));
    this.sums = this.arena ? this.arena.mem.subarray(0, off) : new Float32Array(off);
    if (this.arena && opts.arena === this.arena) this.sums.fill(0); // a reused arena holds last round's sums
  }

  /** The arena, so a strategy can hand it to the next round's aggregator. */
  get simdArena(): SimdArena | undefined {
    return this.arena;
  }

  /** Which loop folds updates, for logs and benchmarks. */
  get kernel(): 'wasm-simd' | 'js' {
    return this.arena ? 'wasm-simd' : 'js';
  }

  /** Layout, sample count and finiteness (the plain FedAvg keeps no base, so it bounds no norm). */
  check(update: TensorBundle, info: UpdateInfo): Verdict {
    const problem = shapeAndSamplesProblem(update, info, this.specs, DEFAULT_RULES) ?? nonFiniteProblem(update);
    return problem ? { problem } : {};
  }

  add(update: TensorBundle, info: UpdateInfo): void {
    if (!(info.numSamples > 0)) throw new Error(`update from ${info.site} has no samples; it cannot carry FedAvg weight`);
    if (info.isDelta) throw new Error(`update from ${info.site} is delta-encoded; the plain FedAvg folds weights (use the composed strategy)`);
    this.addWeighted(update, info.numSamples, info.site);
    this.totalWeight += info.numSamples;
  }

  /** sums += w · update (no bookkeeping of weights: the caller keeps them). */
  addWeighted(update: TensorBundle, w: number, site = 'an update'): void {
    for (const [name, { n }] of this.offsets) {
      const t = update.get(name);
      if (!t || t.data.length !== n) throw new Error(`update from ${site} lacks tensor ${name} or has the wrong size`);
    }
    for (const [name, { off, n }] of this.offsets) {
      const x = update.get(name)!.data;
      if (this.arena) {
        // Block by block: a copy into wasm memory at memcpy speed (it stays in cache), then the f32x4 loop.
        // The staging block keeps the arena at one model plus 1 MiB.
        const arena = this.arena;
        for (let a = 0; a < n; a += arena.stagingFloats) {
          const len = Math.min(arena.stagingFloats, n - a);
          arena.mem.set(len === n ? x : x.subarray(a, a + len), this.total);
          arena.axpyBlock(off + a, 0, len, w);
        }
      } else {
        axpy(this.sums.subarray(off, off + n), x, w);
      }
    }
    this.count++;
  }

  /** The running sums, flat in spec order (valid until the strategy's next begin()). */
  get rawSums(): Float32Array {
    return this.sums;
  }

  /** The mean, as views into the sums (no model-sized copy): valid until the strategy's next begin(). */
  finish(): TensorBundle {
    if (this.count === 0) throw new Error('no updates to aggregate');
    const inv = 1 / this.totalWeight;
    const out: NamedTensor[] = [];
    for (const s of this.specs) {
      const { off, n } = this.offsets.get(s.name)!;
      const data = this.sums.subarray(off, off + n);
      for (let i = 0; i < n; i++) data[i] *= inv;
      out.push({ name: s.name, dtype: 'F32', shape: [...s.shape], data });
    }
    return makeBundle(out);
  }
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
