/**
 * Seeded helpers for the synthetic phantoms, on top of the shared mulberry32 / gaussian in
 * shared/util/random.ts (re-exported so phantom code has one import).
 */
import { gaussian, mulberry32, randomInt, type Rng } from '../../shared/util/random.ts';

export { gaussian, mulberry32, randomInt, type Rng };

/** Uniform in [lo, hi). */
export function uniform(rng: Rng, lo: number, hi: number): number {
  return lo + (hi - lo) * rng();
}

/** Derive an independent 32-bit seed for sub-stream `index` of `seed` (splitmix-style mixing). */
export function deriveSeed(seed: number, index: number): number {
  let z = (Math.imul(seed >>> 0, 0x9e3779b1) + Math.imul(index + 1, 0x85ebca6b)) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x7feb352d) >>> 0;
  z = Math.imul(z ^ (z >>> 15), 0x846ca68b) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}
