/**
 * The addon's fused window blending (window-blend.ts "native": upsampling, logistic/softmax and weighted sums in one
 * pass per window) against the JS kernel it replaces (window-probs.ts then addWindowProbs, the code sliding-window
 * inference ran before): random logits, 2 and 3 classes, factor 4 and 1, odd volume sizes, edge windows cropped by the
 * volume, a side shorter than the window, several batches into the same sums; bad geometry is refused. The native
 * kernel comes with the oneDNN addon; when it is not built this fails with the loader's reason.
 */
import { describe, expect, it } from 'vitest';
import type { ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';
import { blendWeights, InferenceSettingsSchema, slidingWindowProbs, windowStarts, type Shape3 } from '../../shared/model/sliding-window.ts';
import { blendSums, jsWindowBlend, windowBlendOf, type WindowBlendKernel } from '../../shared/model/window-blend.ts';
import { mulberry32 } from '../../shared/util/random.ts';

function nativeBlend(): WindowBlendKernel {
  const r = loadOneDnnKernels();
  if (!r.kernels) throw new Error(`native window blending unavailable: ${r.reason}`);
  const k = windowBlendOf(r.kernels);
  if (k.name !== 'native') throw new Error('the oneDNN addon has no windowBlend: rebuild it (npm run build:native)');
  return k;
}

const maxAbsDiff = (a: Float32Array, b: Float32Array) => {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

/** Every window start of a volume (nnU-Net's placement), sides shorter than the window padded. */
function startsOf(volume: Shape3, window: Shape3, overlap: number): Shape3[] {
  const axes = [0, 1, 2].map((a) => windowStarts(Math.max(volume[a], window[a]), window[a], overlap));
  return axes[0].flatMap((z) => axes[1].flatMap((y) => axes[2].map((x): Shape3 => [z, y, x])));
}

/** Both kernels over the same random logits, `batch` windows per call; their probabilities and weight sums. */
function blendBoth(volume: Shape3, window: Shape3, factor: number, C: number, batch: number, blend: 'gaussian' | 'uniform', seed: number) {
  const rng = mulberry32(seed);
  const starts = startsOf(volume, window, 0.5);
  const coarse = (window[0] * window[1] * window[2]) / factor ** 3;
  const weight = blendWeights(window, blend);
  const out = [jsWindowBlend, nativeBlend()].map(() => blendSums(volume, window, C, weight));
  for (let first = 0; first < starts.length; first += batch) {
    const group = starts.slice(first, first + batch);
    // Logits up to ±12: saturated probabilities as well as middling ones.
    const logits = Float32Array.from({ length: group.length * coarse * C }, () => 24 * rng() - 12);
    jsWindowBlend.addLogits({ logits, factor }, group, out[0]);
    nativeBlend().addLogits({ logits, factor }, group, out[1]);
  }
  return { windows: starts.length, js: jsWindowBlend.normalise(out[0]), native: nativeBlend().normalise(out[1]), wsum: out.map((s) => s.wsum) };
}

describe('native window blending against the JS path', () => {
  const cases: [string, Shape3, Shape3, number, number, number, 'gaussian' | 'uniform'][] = [
    ['2 classes, ×4, odd volume, edge windows, 2 per batch', [37, 29, 45], [16, 24, 16], 4, 2, 2, 'gaussian'],
    ['2 classes, ×4, one side shorter than the window (padded)', [13, 40, 33], [16, 16, 24], 4, 2, 3, 'gaussian'],
    ['3 classes, ×4, odd volume', [27, 35, 22], [16, 16, 16], 4, 3, 2, 'gaussian'],
    ['2 classes, ×1 (a full-resolution head), uniform', [19, 21, 30], [8, 16, 16], 1, 2, 1, 'uniform'],
    ['4 classes, ×1, threaded window', [48, 56, 40], [40, 48, 40], 1, 4, 2, 'gaussian'],
    ['2 classes, ×4, the benchmark’s window (threaded)', [100, 96, 88], [80, 96, 80], 4, 2, 2, 'gaussian'],
  ];
  for (const [name, volume, window, factor, C, batch, blend] of cases) {
    it(name, () => {
      const r = blendBoth(volume, window, factor, C, batch, blend, volume[0] * 31 + C);
      expect(r.windows).toBeGreaterThan(1);
      expect(maxAbsDiff(r.native, r.js)).toBeLessThan(1e-6);
      // The weight sums are the same float additions in the same order.
      expect(maxAbsDiff(r.wsum[1], r.wsum[0])).toBe(0);
      let worstRow = 0;
      for (let v = 0; v < r.native.length / C; v++) {
        let s = 0;
        for (let c = 0; c < C; c++) s += r.native[v * C + c];
        worstRow = Math.max(worstRow, Math.abs(s - 1));
      }
      expect(worstRow).toBeLessThan(2e-6);
    });
  }

  it('through sliding-window inference: a logits network blended natively matches the same network blended in JS', async () => {
    const volume: Shape3 = [30, 26, 41];
    const rng = mulberry32(3);
    const image = Float32Array.from({ length: 30 * 26 * 41 }, () => 2 * rng() - 1);
    // A "network" whose ×4 coarse logits depend on the window's content: the mean of each 4³ cell, two classes.
    const logits = (input: Float32Array, n: number, [d, h, w]: Shape3) => {
      const out = new Float32Array((n * d * h * w * 2) / 64);
      for (let b = 0; b < n; b++)
        for (let z = 0; z < d; z++)
          for (let y = 0; y < h; y++)
            for (let x = 0; x < w; x++) {
              const cell = ((b * (d / 4) + (z >> 2)) * (h / 4) + (y >> 2)) * (w / 4) + (x >> 2);
              out[2 * cell + 1] += (8 * input[((b * d + z) * h + y) * w + x]) / 64;
            }
      return { logits: out, factor: 4 };
    };
    const o = { window: [16, 16, 24] as Shape3, overlap: 0.5, blend: 'gaussian' as const, batch: 2, numClasses: 2 };
    const js = await slidingWindowProbs(image, volume, o, { logits, blend: jsWindowBlend });
    const native = await slidingWindowProbs(image, volume, o, { logits, blend: nativeBlend() });
    expect(maxAbsDiff(native, js)).toBeLessThan(1e-6);
    expect(maxAbsDiff(native, new Float32Array(native.length))).toBeGreaterThan(0.1);
  });

  it('refuses logits of the wrong size and windows outside the volume', () => {
    const k = nativeBlend();
    const sums = blendSums([20, 20, 20], [8, 8, 8], 2, blendWeights([8, 8, 8], 'gaussian'));
    expect(() => k.addLogits({ logits: new Float32Array(15), factor: 4 }, [[0, 0, 0]], sums)).toThrow(/16/);
    expect(() => k.addLogits({ logits: new Float32Array(16), factor: 3 }, [[0, 0, 0]], sums)).toThrow(/factor/);
    expect(() => k.addLogits({ logits: new Float32Array(16), factor: 4 }, [[0, 13, 0]], sums)).toThrow(/outside the volume/);
    expect(() => k.addLogits({ logits: new Float32Array(16), factor: 4 }, [[-1, 0, 0]], sums)).toThrow(/outside the volume/);
    // Nothing was added by the refused calls.
    expect(sums.wsum.every((v) => v === 0)).toBe(true);
  });

  it('the Med3D trainer scores windows alike with the addon’s blending and with the JS fallback (an addon without it)', async () => {
    const r = loadOneDnnKernels();
    if (!r.kernels) throw new Error(`native kernels unavailable: ${r.reason}`);
    const ew = r.kernels.elementwise;
    if (!ew) throw new Error('the oneDNN addon has no elementwise functions: rebuild it (npm run build:native)');
    // The same kernels as an addon built before windowBlend would present them.
    const older: ElementwiseKernels = { ...ew, native: <F extends (...args: never[]) => unknown>(name: string) => (name.startsWith('window') ? undefined : ew.native<F>(name)) };
    const withoutBlend = { ...r.kernels, elementwise: older };
    expect(windowBlendOf(withoutBlend).name).toBe('js');
    const settings = InferenceSettingsSchema.parse({ mode: 'window', window: [16, 16, 24], overlap: 0.5, batch: 2 });
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [8, 8, 8], inference: settings });
    const w = arch.init(3);
    const rng = mulberry32(8);
    const vc = { id: 'v', shape: [29, 22, 37] as Shape3, image: Float32Array.from({ length: 29 * 22 * 37 }, () => 2 * rng() - 1) };
    const native = await createMed3dTrainer(arch, r.kernels).predictProbs(w, vc);
    const js = await createMed3dTrainer(arch, withoutBlend).predictProbs(w, vc);
    expect(maxAbsDiff(native, js)).toBeLessThan(1e-6);
  });
});
