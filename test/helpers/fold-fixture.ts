/**
 * Tensors for the checked-fold tests: one F32 tensor per length in `sizes` (lengths chosen to cross the kernels'
 * block edges), their offsets in the flat model, and seeded updates, base models and bundles over them.
 */
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { mulberry32 } from '../../shared/util/random.ts';

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
    bundleOf(flat) {
      return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: flat.slice(offsets.get(s.name)!.off, offsets.get(s.name)!.off + s.shape[0]) })));
    },
  };
}
