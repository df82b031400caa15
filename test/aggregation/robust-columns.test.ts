/**
 * The block reduction behind median and trimmed mean (robust.ts): the native addon's (a sorting network over a
 * tile of columns, or nth_element past 32 rows) and the JS one (quickselect) against a reference written as
 * plainly as possible — sort each column, take the middle or sum the kept values in increasing order — with
 * identical results required, for 1…50 rows, ties, weights and deltas mixed, a block wider than the columns
 * used; and rows sharing one scale and coef (the native float32 tile), values over many exponents and signed zeros. When the addon is not built, the native half fails with the loader's reason.
 */
import { describe, expect, it } from 'vitest';
import { robustColumnsJs, robustColumnsNative, trimCount, type RobustColumns } from '../../coordinator/aggregation/robust.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { mulberry32 } from '../../shared/util/random.ts';

function reference(rows: Float32Array, n: number, ld: number, len: number, base: Float32Array, scale: Float64Array, coef: Float64Array, trim: number): Float32Array {
  const out = new Float32Array(len);
  for (let j = 0; j < len; j++) {
    const b = base[j];
    const col: number[] = [];
    for (let i = 0; i < n; i++) col.push(scale[i] * (rows[i * ld + j] - coef[i] * b));
    col.sort((x, y) => x - y);
    let stat: number;
    if (trim < 0) stat = n % 2 ? col[n >> 1] : (col[(n >> 1) - 1] + col[n >> 1]) / 2;
    else {
      let s = 0;
      for (let i = trim; i < n - trim; i++) s += col[i];
      stat = s / (n - 2 * trim);
    }
    out[j] = b + stat;
  }
  return out;
}

function native(): RobustColumns {
  const f = robustColumnsNative();
  if (!f) {
    const r = loadOneDnnKernels();
    throw new Error(`native robustColumns unavailable: ${r.kernels ? 'the addon predates it: npm run build:native' : r.reason}`);
  }
  return f;
}

const impls: [string, () => RobustColumns][] = [
  ['js', () => robustColumnsJs],
  ['native', native],
];

describe.each(impls)('%s robust column reduction', (_name, get) => {
  for (const n of [1, 2, 3, 5, 10, 17, 32, 33, 50]) {
    it(`median and trimmed means of ${n} rows equal sorting each column`, () => {
      const rng = mulberry32(n);
      const ld = 1100;
      const len = 1037; // not a multiple of the native tile, and less than a row
      // Coarse values so ties are common.
      const rows = Float32Array.from({ length: n * ld }, () => Math.round(rng() * 16 - 8) / 4 + (rng() < 0.1 ? 1e-3 * rng() : 0));
      const base = Float32Array.from({ length: len }, () => rng() - 0.5);
      const scale = Float64Array.from({ length: n }, () => (rng() < 0.5 ? 1 : 0.3 + rng()));
      const coef = Float64Array.from({ length: n }, () => (rng() < 0.5 ? 1 : 0));
      for (const trim of [-1, 0, trimCount(n, 0.1), trimCount(n, 0.2), trimCount(n, 0.45)]) {
        const want = reference(rows, n, ld, len, base, scale, coef, trim);
        const out = new Float32Array(len).fill(Number.NaN);
        get()(rows, n, ld, len, base, scale, coef, trim, out);
        expect(out).toEqual(want);
      }
    });

    // Every row with one scale and one coef (no clipping; all weights or all deltas): the native path sorts the stored
    // float32 values themselves, since v = s·(x − c·b) is then non-decreasing in x.
    it(`median and trimmed means of ${n} rows sharing one scale and coef equal sorting each column`, () => {
      const rng = mulberry32(1000 + n);
      const ld = 300;
      const len = 261;
      const base = Float32Array.from({ length: len }, () => (rng() - 0.5) * 4);
      for (const [s, c, values] of [
        [1, 1, 'coarse'], [1, 0, 'wide'], [0.37, 1, 'wide'], [2.5, 0, 'coarse'], [1, 1, 'wide'],
      ] as const) {
        // Coarse values tie often; wide ones span many exponents, both signs, zeros of both signs.
        const draw = values === 'coarse'
          ? () => Math.round(rng() * 8 - 4) / 2
          : () => (rng() < 0.05 ? (rng() < 0.5 ? -0 : 0) : (rng() - 0.5) * 2 ** Math.floor(rng() * 60 - 30));
        const rows = Float32Array.from({ length: n * ld }, draw);
        const scale = new Float64Array(n).fill(s);
        const coef = new Float64Array(n).fill(c);
        for (const trim of [-1, 0, trimCount(n, 0.1), trimCount(n, 0.3)]) {
          const want = reference(rows, n, ld, len, base, scale, coef, trim);
          const out = new Float32Array(len).fill(Number.NaN);
          get()(rows, n, ld, len, base, scale, coef, trim, out);
          expect(out).toEqual(want);
        }
      }
    });
  }
});

describe('native and JS robust column reductions agree', () => {
  it('on random float32 rows, one scale and mixed ones, odd and even n', () => {
    const rng = mulberry32(77);
    for (const n of [4, 7, 10, 16, 31]) {
      const ld = 1024 + 13;
      const len = 1024 + 5;
      const rows = Float32Array.from({ length: n * ld }, () => (rng() - 0.5) * 10);
      const base = Float32Array.from({ length: len }, () => rng() - 0.5);
      for (const mixed of [false, true]) {
        const scale = Float64Array.from({ length: n }, () => (mixed && rng() < 0.5 ? 0.5 + rng() : 1));
        const coef = Float64Array.from({ length: n }, () => (mixed && rng() < 0.5 ? 0 : 1));
        for (const trim of [-1, trimCount(n, 0.1), trimCount(n, 0.25)]) {
          const a = new Float32Array(len);
          const b = new Float32Array(len);
          robustColumnsJs(rows, n, ld, len, base, scale, coef, trim, a);
          native()(rows, n, ld, len, base, scale, coef, trim, b);
          expect(b).toEqual(a);
        }
      }
    }
  });
});

describe('native robust column reduction, bad input', () => {
  it('refuses mismatched lengths and impossible trims', () => {
    const f = native();
    const rows = new Float32Array(3 * 8);
    const base = new Float32Array(8);
    const v = new Float64Array(3);
    expect(() => f(rows, 3, 8, 9, base, v, v, -1, new Float32Array(9))).toThrow(/len/);
    expect(() => f(rows, 3, 8, 8, base, v, v, 2, new Float32Array(8))).toThrow(/trim/);
    expect(() => f(rows, 3, 8, 8, base, new Float64Array(2), v, -1, new Float32Array(8))).toThrow(/scale/);
  });
});
