import { PlanSchema, type Plan } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';

export const SPECS: TensorSpec[] = [
  { name: 'a.weight', dtype: 'F32', shape: [4, 8] },
  { name: 'b.bias', dtype: 'F32', shape: [8] },
];
export const SIZE = 40;

/** A bundle of SPECS from one flat array (spec order). */
export function flatBundle(flat: ArrayLike<number>): TensorBundle {
  return makeBundle([
    { name: 'a.weight', dtype: 'F32', shape: [4, 8], data: Float32Array.from({ length: 32 }, (_, i) => flat[i]) },
    { name: 'b.bias', dtype: 'F32', shape: [8], data: Float32Array.from({ length: 8 }, (_, i) => flat[32 + i]) },
  ]);
}

export function flatOf(b: TensorBundle): number[] {
  return [...b.get('a.weight')!.data, ...b.get('b.bias')!.data];
}

export function aggregationPlan(a: Record<string, unknown>): Plan['aggregation'] {
  return PlanSchema.parse({ aggregation: a }).aggregation;
}

/** Deterministic pseudo-random values in [-1, 1). */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return (s / 2 ** 32) * 2 - 1;
  };
}

/** Honest updates: base + a common direction + small per-site noise. */
export function honestUpdates(base: number[], sites: number, seed = 1): number[][] {
  const r = rng(seed);
  const dir = base.map(() => 0.1 * r());
  return Array.from({ length: sites }, () => base.map((b, i) => b + dir[i] + 0.01 * r()));
}

export const dist = (x: number[], y: number[]) => Math.sqrt(x.reduce((s, v, i) => s + (v - y[i]) ** 2, 0));
