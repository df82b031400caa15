/**
 * The segmentation loss in the native addon (ElementwiseKernels.segmentationLoss) against the JS loss it
 * replaced in the Med3D trainer (segmentationLossJs, itself checked against tf ops and finite differences in
 * test/model/segmentation-loss.test.ts): the same loss and gradient on hard and soft targets, with and without
 * per-voxel weights (zeros included), 2 and 4 classes, small and multi-threaded sizes; bad input is refused.
 * The native kernels come with the oneDNN addon; when it is not built this fails with the loader's reason.
 */
import { describe, expect, it } from 'vitest';
import { jsElementwiseKernels, type ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { segmentationLossJs } from '../../shared/model/graph/segmentation-loss.ts';
import { mulberry32 } from '../../shared/util/random.ts';

function nativeKernels(): ElementwiseKernels {
  const r = loadOneDnnKernels();
  if (!r.kernels) throw new Error(`native elementwise kernels unavailable: ${r.reason}`);
  if (!r.kernels.elementwise) throw new Error('the oneDNN addon has no elementwise functions: rebuild it (npm run build:native)');
  return r.kernels.elementwise;
}

function problem(nv: number, C: number, soft: boolean, seed: number) {
  const r = mulberry32(seed);
  const z = Float32Array.from({ length: nv * C }, () => 6 * r() - 3);
  const target = new Float32Array(nv * C);
  for (let v = 0; v < nv; v++) {
    if (soft) {
      // A pooled label: fractions that sum to 1.
      let s = 0;
      for (let c = 0; c < C; c++) s += target[v * C + c] = r() < 0.5 ? 0 : r();
      if (s === 0) target[v * C] = 1;
      else for (let c = 0; c < C; c++) target[v * C + c] /= s;
    } else target[v * C + (r() < 0.7 ? 0 : 1 + Math.floor(r() * (C - 1)))] = 1;
  }
  const weight = Float32Array.from({ length: nv }, () => (r() < 0.2 ? 0 : r() * 2));
  return { z, target, weight };
}

function relErr(got: Float32Array, want: Float32Array): number {
  let d = 0;
  let m = 0;
  for (let i = 0; i < want.length; i++) {
    d = Math.max(d, Math.abs(got[i] - want[i]));
    m = Math.max(m, Math.abs(want[i]));
  }
  return d / m;
}

describe('native segmentation loss against the JS loss', () => {
  const cases: [string, number, number, boolean, boolean][] = [
    ['2 classes, hard targets, one thread', 300, 2, false, false],
    ['2 classes, soft targets, 2×24³ (threaded)', 2 * 24 ** 3, 2, true, false],
    ['2 classes, weighted, 2×24³', 2 * 24 ** 3, 2, false, true],
    ['4 classes, soft and weighted, 20³', 20 ** 3, 4, true, true],
  ];
  for (const [name, nv, C, soft, weighted] of cases) {
    it(name, () => {
      const { z, target, weight } = problem(nv, C, soft, nv + C);
      const w = weighted ? weight : undefined;
      const want = segmentationLossJs(z, target, C, w);
      const got = nativeKernels().segmentationLoss(z, target, C, w);
      expect(Math.abs(got.loss - want.loss)).toBeLessThan(1e-6 * Math.abs(want.loss));
      expect(relErr(got.grad, want.grad)).toBeLessThan(1e-5);
      // The JS kernel is the same function behind the same interface.
      const js = jsElementwiseKernels.segmentationLoss(z, target, C, w);
      expect(js.loss).toBe(want.loss);
      expect(relErr(js.grad, want.grad)).toBe(0);
    });
  }

  it('writes every gradient value into a dirty buffer from its allocator', () => {
    const { z, target } = problem(1000, 2, false, 7);
    const dirty = (n: number) => new Float32Array(n).fill(Number.NaN);
    const got = nativeKernels().withAlloc(dirty).segmentationLoss(z, target, 2);
    expect(got.grad.every(Number.isFinite)).toBe(true);
    expect(relErr(got.grad, segmentationLossJs(z, target, 2).grad)).toBeLessThan(1e-5);
  });

  it('refuses mismatched lengths and fewer than two classes, in both implementations', () => {
    const { z, target, weight } = problem(10, 2, false, 3);
    for (const k of [jsElementwiseKernels, nativeKernels()]) {
      expect(() => k.segmentationLoss(z, target.subarray(2), 2)).toThrow(/target values/);
      expect(() => k.segmentationLoss(z, target, 2, weight.subarray(1))).toThrow(/voxel weights/);
      expect(() => k.segmentationLoss(z, target, 1)).toThrow(/at least 2 classes/);
    }
  });
});
