/**
 * Tensors for the checked-fold tests: one F32 tensor per length in `sizes` (lengths chosen to cross the kernels'
 * block edges), their offsets in the flat model, and seeded updates, base models and bundles over them.
 */
import type { RoundAggregator, Verdict } from '../../coordinator/aggregation/strategy.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';

/** What a finished round gave: the verdicts, the model flat in fixture order, the accepted norms and the count. */
export interface RoundResult {
  verdicts: Verdict[];
  out: Float32Array;
  norms: number[];
  count: number;
}

export interface FoldFixture {
  specs: TensorSpec[];
  offsets: Map<string, { off: number; n: number }>;
  /** Values in the whole model. */
  total: number;
  /** A seeded update whose values span 10^±(spread/2), times `scale`. */
  update(seed: number, spread?: number, scale?: number): TensorBundle;
  /** A seeded flat base model in [−0.5, 0.5). */
  baseModel(seed: number): Float32Array;
  /** The flat model cut back into the fixture's tensors. */
  bundleOf(flat: Float32Array): TensorBundle;
  /**
   * A round with every kind of refusal among four good updates: `ups` is good 0–2, a NaN (t8[30000]), a 50× outlier
   * of good 0, a weight of 3e38 (t4[10]), good 3. Needs a tensor t8 of more than 30,000 values.
   */
  refusalRound(): { base: TensorBundle; good: TensorBundle[]; ups: TensorBundle[] };
  /** Finishes `agg` and reads what the tests compare. */
  finishRound(agg: RoundAggregator, verdicts: Verdict[]): RoundResult;
}

export function foldFixture(sizes: readonly number[]): FoldFixture {
  const specs: TensorSpec[] = sizes.map((n, i) => ({ name: `t${i}`, dtype: 'F32', shape: [n] }));
  const offsets = new Map<string, { off: number; n: number }>();
  sizes.reduce((off, n, i) => (offsets.set(`t${i}`, { off, n }), off + n), 0);
  const total = sizes.reduce((a, b) => a + b, 0);
  return {
    specs,
    offsets,
    total,
    update(seed, spread = 1, scale = 1) {
      const rng = mulberry32(seed);
      return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, () => scale * (rng() - 0.5) * 10 ** (spread * (rng() - 0.5))) })));
    },
    baseModel(seed) {
      const rng = mulberry32(seed);
      return Float32Array.from({ length: total }, () => rng() - 0.5);
    },
    refusalRound() {
      const base = this.bundleOf(this.baseModel(8));
      const good = [1, 2, 3, 4].map((k) => this.update(k));
      const nan = this.update(30);
      nan.get('t8')!.data[30000] = Number.NaN;
      const huge = this.update(31);
      huge.get('t4')!.data[10] = 3e38;
      const outlier = makeBundle([...good[0].values()].map((t) => ({ ...t, data: t.data.map((v) => v * 50) })));
      return { base, good, ups: [good[0], good[1], good[2], nan, outlier, huge, good[3]] };
    },
    finishRound(agg, verdicts) {
      const count = agg.count;
      const norms = [...(agg as RoundAggregator & { acceptedNorms: readonly number[] }).acceptedNorms];
      const res = agg.finish();
      const out = new Float32Array(total);
      for (const sp of specs) out.set(res.get(sp.name)!.data, offsets.get(sp.name)!.off);
      return { verdicts, out, norms, count };
    },
    bundleOf(flat) {
      return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: flat.slice(offsets.get(s.name)!.off, offsets.get(s.name)!.off + s.shape[0]) })));
    },
  };
}

/** The largest distance in float32 units in the last place between two arrays of finite values of one sign pattern. */
export function maxUlpDiff(a: Float32Array, b: Float32Array): number {
  let worst = 0;
  const ai = new Int32Array(a.buffer, a.byteOffset, a.length);
  const bi = new Int32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(ai[i] - bi[i]));
  return worst;
}
