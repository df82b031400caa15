/**
 * DP noise (cryptoGaussian): N(0, 1) from fresh CSPRNG words on every call, although the word buffer is reused
 * between calls (a DP close asks for one block at a time), at even and odd lengths, short after long — through the
 * native Box–Muller (gaussianFromWords) and its JS twin alike; the two agree on the same words. When the addon is
 * not built, the native cases fail with the loader's reason.
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { cryptoGaussian, cryptoGaussianWith, gaussianFromWordsJs, gaussianFromWordsNative, type GaussianFromWords } from '../../coordinator/aggregation/gaussian.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';

function native(): GaussianFromWords {
  const f = gaussianFromWordsNative();
  if (!f) {
    const r = loadOneDnnKernels();
    throw new Error(`native gaussianFromWords unavailable: ${r.kernels ? 'the addon predates it: npm run build:native' : r.reason}`);
  }
  return f;
}

function moments(x: Float32Array): { mean: number; variance: number; kurtosis: number; beyond2: number } {
  let m = 0;
  for (const y of x) m += y;
  m /= x.length;
  let v = 0;
  let q = 0;
  let beyond2 = 0;
  for (const y of x) {
    const d = (y - m) ** 2;
    v += d;
    q += d * d;
    if (Math.abs(y) > 2) beyond2++;
  }
  v /= x.length;
  return { mean: m, variance: v, kurtosis: q / x.length / (v * v), beyond2: beyond2 / x.length };
}

const sources: [string, () => (out: Float32Array) => void][] = [
  ['default (cryptoGaussian)', () => cryptoGaussian],
  ['JS transform', () => cryptoGaussianWith(gaussianFromWordsJs)],
  ['native transform', () => cryptoGaussianWith(native())],
];

describe.each(sources)('%s', (_name, get) => {
  it('gives standard normal values, fresh on every call, with its word buffer reused', () => {
    const gaussian = get();
    const a = new Float32Array(200_001);
    const b = new Float32Array(200_001);
    gaussian(a);
    gaussian(b);
    let same = 0;
    for (let i = 0; i < a.length; i++) if (a[i] === b[i]) same++;
    expect(same).toBeLessThan(5);
    for (const x of [a, b]) {
      const m = moments(x);
      // 200,001 samples: the mean's sd is 0.0022, the variance's 0.0032, the kurtosis's ≈ 0.011, the 2σ share's 0.00047.
      expect(Math.abs(m.mean)).toBeLessThan(0.015);
      expect(Math.abs(m.variance - 1)).toBeLessThan(0.02);
      expect(Math.abs(m.kurtosis - 3)).toBeLessThan(0.08);
      expect(Math.abs(m.beyond2 - 0.0455)).toBeLessThan(0.004);
      expect(x.every(Number.isFinite)).toBe(true);
    }
    // A shorter call after a longer one uses the front of the buffer, still fresh.
    const c = new Float32Array(7);
    const d = new Float32Array(7);
    gaussian(c);
    gaussian(d);
    expect(Array.from(c)).not.toEqual(Array.from(d));
    expect(Array.from(c)).not.toEqual(Array.from(a.subarray(0, 7)));
  });
});

describe('native and JS Box–Muller', () => {
  it('turn the same words into the same samples, to the last float32 bit but where two libms round apart', () => {
    for (const n of [1, 2, 7, 70_000, 300_001]) {
      const words = new Uint32Array(n + (n % 2));
      randomFillSync(words);
      // The extremes of both words: u1 at its smallest and largest, u2 at 0 and just below 1.
      words.set([0, 0, 0xffffffff, 0xffffffff].slice(0, words.length));
      const js = new Float32Array(n);
      const nat = new Float32Array(n).fill(Number.NaN);
      gaussianFromWordsJs(words, js);
      native()(words, nat);
      let apart = 0;
      for (let i = 0; i < n; i++) {
        if (nat[i] === js[i]) continue;
        apart++;
        expect(Math.abs(nat[i] - js[i])).toBeLessThanOrEqual(2 ** -23 * Math.max(Math.abs(js[i]), 2 ** -10));
      }
      expect(apart).toBeLessThanOrEqual(Math.ceil(n / 1000));
    }
  });

  it('refuses a word buffer of the wrong length or type', () => {
    expect(() => native()(new Uint32Array(2), new Float32Array(3))).toThrow(/words has 2 elements, expected 4/);
    expect(() => native()(new Int32Array(4) as unknown as Uint32Array, new Float32Array(3))).toThrow(/Uint32Array/);
    expect(() => gaussianFromWordsJs(new Uint32Array(2), new Float32Array(3))).toThrow(/expected 4/);
  });
});
