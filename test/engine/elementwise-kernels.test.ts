/**
 * ElementwiseKernels (BatchNorm, ReLU, max-pool, add): the JS and the native (addon) implementations
 * against a float64 reference written here as plainly as possible, on random NDHWC tensors of odd sizes and
 * C = 1, 3, 16, 64 (large enough ones to run on several OpenMP threads), max-pool with ties (after a ReLU
 * and on integer values), and the BatchNorm gradients against central finite differences of the float64
 * forward. The native kernels come with the oneDNN addon; when it is not built they fail with the loader's
 * reason, like test/engine/onednn-kernels.test.ts (scripts/test.sh builds it).
 */
import { describe, expect, it } from 'vitest';
import { jsElementwiseKernels, poolOut, type ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { batchNormKernels } from '../../shared/model/layers/batch-norm.ts';

const EPS = 1e-5;

// A small deterministic PRNG (mulberry32), so failures reproduce.
const rng = mulberry32;

function randn(n: number, r: () => number, scale = 1, offset = 0): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = offset + scale * Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r());
  return a;
}

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

/** max|got − want| / max(max|want|, 1e-12). */
function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
  return d / Math.max(maxAbs(want), 1e-12);
}

// ---- float64 reference ----

function bnStatsRef(x: ArrayLike<number>, C: number) {
  const nv = x.length / C;
  const mean = new Float64Array(C);
  const sq = new Float64Array(C);
  for (let i = 0; i < x.length; i++) mean[i % C] += x[i];
  for (let c = 0; c < C; c++) mean[c] /= nv;
  for (let i = 0; i < x.length; i++) sq[i % C] += (x[i] - mean[i % C]) ** 2;
  const invStd = Float64Array.from(sq, (s) => 1 / Math.sqrt(s / nv + EPS));
  return { mean, invStd, sq, nv };
}

function bnForwardRef(x: ArrayLike<number>, C: number, gamma: ArrayLike<number>, beta: ArrayLike<number>, relu: boolean): Float64Array {
  const { mean, invStd } = bnStatsRef(x, C);
  const y = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const c = i % C;
    const v = (x[i] - mean[c]) * invStd[c] * gamma[c] + beta[c];
    y[i] = relu ? Math.max(v, 0) : v;
  }
  return y;
}

/** Analytic train-mode backward in float64 (the textbook formula, separately from the kernels' algebra). */
function bnBackwardRef(x: ArrayLike<number>, dyIn: ArrayLike<number>, C: number, gamma: ArrayLike<number>, beta: ArrayLike<number>, relu: boolean) {
  const { mean, invStd, nv } = bnStatsRef(x, C);
  const y = bnForwardRef(x, C, gamma, beta, relu);
  const g = Float64Array.from(dyIn, (v, i) => (relu && !(y[i] > 0) ? 0 : v));
  const sumG = new Float64Array(C);
  const sumGXhat = new Float64Array(C);
  for (let i = 0; i < x.length; i++) {
    const c = i % C;
    sumG[c] += g[i];
    sumGXhat[c] += g[i] * (x[i] - mean[c]) * invStd[c];
  }
  const dx = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const c = i % C;
    const xhat = (x[i] - mean[c]) * invStd[c];
    dx[i] = gamma[c] * invStd[c] * (g[i] - sumG[c] / nv - (xhat * sumGXhat[c]) / nv);
  }
  return { dx, dgamma: sumGXhat, dbeta: sumG };
}

function maxPoolRef(x: ArrayLike<number>, [n, D, H, W, C]: readonly number[]) {
  const [oD, oH, oW] = [poolOut(D), poolOut(H), poolOut(W)];
  const y: number[] = [];
  const argmax: number[] = [];
  for (let b = 0; b < n; b++)
    for (let oz = 0; oz < oD; oz++)
      for (let oy = 0; oy < oH; oy++)
        for (let ox = 0; ox < oW; ox++)
          for (let c = 0; c < C; c++) {
            let best = -Infinity;
            let at = -1;
            for (let z = 2 * oz - 1; z <= 2 * oz + 1; z++)
              for (let yy = 2 * oy - 1; yy <= 2 * oy + 1; yy++)
                for (let xx = 2 * ox - 1; xx <= 2 * ox + 1; xx++) {
                  if (z < 0 || z >= D || yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
                  const j = (((b * D + z) * H + yy) * W + xx) * C + c;
                  if (at < 0 || x[j] > best) [best, at] = [x[j], j];
                }
            y.push(best);
            argmax.push(at);
          }
  return { y, argmax, shape: [n, oD, oH, oW, C] };
}

// ---- the implementations under test ----

function nativeKernels(): ElementwiseKernels {
  const r = loadOneDnnKernels();
  if (!r.kernels) throw new Error(`native elementwise kernels unavailable: ${r.reason}`);
  if (!r.kernels.elementwise) throw new Error('the oneDNN addon has no elementwise functions: rebuild it (npm run build:native)');
  return r.kernels.elementwise;
}

const SHAPES: readonly (readonly [number, number, number, number])[] = [
  [2, 5, 7, 3],
  [1, 9, 4, 6],
  [2, 17, 11, 9], // with C ≥ 16 past the addon's threshold for threads
];
const CHANNELS = [1, 3, 16, 64];

const impls: [string, () => ElementwiseKernels][] = [
  ['js', () => jsElementwiseKernels],
  ['native', nativeKernels],
];

describe.each(impls)('%s elementwise kernels against float64', (_name, get) => {
  for (const [n, D, H, W] of SHAPES) {
    for (const C of CHANNELS) {
      const shape = [n, D, H, W, C];
      const len = n * D * H * W * C;
      it(`BatchNorm train forward, backward, eval on [${shape.join(',')}]`, () => {
        const k = get();
        const r = rng(len + C);
        const x = randn(len, r, 2, 0.5);
        const gamma = randn(C, r, 0.5, 1);
        const beta = randn(C, r, 0.3);
        const dy = randn(len, r);
        const ref = bnStatsRef(x, C);
        for (const relu of [false, true]) {
          const runMean = randn(C, r);
          const runVar = Float32Array.from(randn(C, r), (v) => 1 + v * v);
          const [rm0, rv0] = [runMean.slice(), runVar.slice()];
          const out = batchNormKernels(k).batchNormTrain(x, C, gamma, beta, runMean, runVar, 0.1, EPS, relu);
          expect(relErr(out.y, bnForwardRef(x, C, gamma, beta, relu))).toBeLessThan(2e-6);
          expect(relErr(out.mean, ref.mean)).toBeLessThan(1e-6);
          expect(relErr(out.invStd, ref.invStd)).toBeLessThan(1e-6);
          const wantRm = Float64Array.from(rm0, (v, c) => 0.9 * v + 0.1 * ref.mean[c]);
          const wantRv = Float64Array.from(rv0, (v, c) => 0.9 * v + 0.1 * (ref.nv > 1 ? ref.sq[c] / (ref.nv - 1) : ref.sq[c] / ref.nv));
          expect(relErr(runMean, wantRm)).toBeLessThan(1e-6);
          expect(relErr(runVar, wantRv)).toBeLessThan(1e-6);

          const g = batchNormKernels(k).batchNormBackward(x, dy, C, out.mean, out.invStd, gamma, relu ? out.y : undefined, true, true);
          const want = bnBackwardRef(x, dy, C, gamma, beta, relu);
          expect(relErr(g.dx!, want.dx)).toBeLessThan(1e-4);
          expect(relErr(g.dgamma, want.dgamma)).toBeLessThan(1e-5);
          expect(relErr(g.dbeta, want.dbeta)).toBeLessThan(1e-5);
          expect(batchNormKernels(k).batchNormBackward(x, dy, C, out.mean, out.invStd, gamma, undefined, true, false).dx).toBeUndefined();

          // Eval mode: running statistics, dx = dy·γσ⁻¹ (masked by the ReLU).
          const invStd = Float32Array.from(runVar, (v) => 1 / Math.sqrt(v + EPS));
          const scale = Float32Array.from(gamma, (v, c) => v * invStd[c]);
          const shift = Float32Array.from(beta, (v, c) => v - runMean[c] * scale[c]);
          const ye = batchNormKernels(k).scaleShift(x, C, scale, shift, relu);
          const yeRef = Float64Array.from(x, (v, i) => {
            const c = i % C;
            const t = ((v - runMean[c]) * gamma[c]) / Math.sqrt(runVar[c] + EPS) + beta[c];
            return relu ? Math.max(t, 0) : t;
          });
          expect(relErr(ye, yeRef)).toBeLessThan(2e-6);
          const ge = batchNormKernels(k).batchNormBackward(x, dy, C, runMean, invStd, gamma, relu ? ye : undefined, false, true);
          const dxRef = Float64Array.from(dy, (v, i) => (relu && !(ye[i] > 0) ? 0 : v * gamma[i % C] * invStd[i % C]));
          expect(relErr(ge.dx!, dxRef)).toBeLessThan(1e-6);
        }
      });

      it(`ReLU, add, max-pool with ties on [${shape.join(',')}]`, () => {
        const k = get();
        const r = rng(3 * len + C);
        const a = randn(len, r);
        const b = randn(len, r);
        const dy = randn(len, r);
        const y = k.relu(a);
        expect(Array.from(y)).toEqual(Array.from(a, (v) => Math.max(v, 0)));
        expect(Array.from(k.reluBackward(y, dy))).toEqual(Array.from(dy, (v, i) => (a[i] > 0 ? v : 0)));
        expect(Array.from(k.add(a, b, false))).toEqual(Array.from(a, (v, i) => Math.fround(v + b[i])));
        expect(Array.from(k.add(a, b, true))).toEqual(Array.from(a, (v, i) => Math.max(Math.fround(v + b[i]), 0)));
        const acc = a.slice();
        k.addInto(acc, b);
        expect(Array.from(acc)).toEqual(Array.from(a, (v, i) => Math.fround(v + b[i])));

        // After a ReLU most windows hold several zeros; integer values tie among positives too.
        const ints = Float32Array.from(a, (v) => Math.round(v * 1.5));
        for (const x of [y, ints]) {
          const got = k.maxPool(x, shape);
          const want = maxPoolRef(x, shape);
          expect(got.shape).toEqual(want.shape);
          expect(Array.from(got.y)).toEqual(want.y);
          expect(Array.from(got.argmax)).toEqual(want.argmax);
          const gy = randn(got.y.length, r);
          const dx = k.maxPoolBackward(gy, got.argmax, shape);
          const dxRef = new Float64Array(len);
          want.argmax.forEach((j, i) => (dxRef[j] += gy[i]));
          expect(relErr(dx, dxRef)).toBeLessThan(1e-6);
        }
      });
    }
  }

  it('BatchNorm statistics stay accurate with a large mean (|μ|/σ = 1000)', () => {
    const k = get();
    const C = 16;
    const len = 2 * 9 * 8 * 7 * C;
    const r = rng(7);
    const x = randn(len, r, 0.01, 10);
    const gamma = new Float32Array(C).fill(1);
    const beta = new Float32Array(C);
    const out = batchNormKernels(k).batchNormTrain(x, C, gamma, beta, new Float32Array(C), new Float32Array(C).fill(1), 0.1, EPS, false);
    const ref = bnStatsRef(x, C);
    expect(relErr(out.invStd, ref.invStd)).toBeLessThan(1e-4);
    expect(relErr(out.y, bnForwardRef(x, C, gamma, beta, false))).toBeLessThan(1e-3);
  });

  it('BatchNorm gradients match central finite differences of the float64 forward', () => {
    const k = get();
    for (const [C, relu] of [[3, false], [3, true], [16, true]] as const) {
      const len = 2 * 3 * 4 * 5 * C;
      const r = rng(11 + C);
      const x = randn(len, r, 1.5, 0.2);
      const gamma = randn(C, r, 0.5, 1);
      const beta = randn(C, r, 0.5);
      const w = randn(len, r); // L = Σ w·y, so dL/dy = w
      const loss = (xx: ArrayLike<number>, gg: ArrayLike<number>, bb: ArrayLike<number>) =>
        bnForwardRef(xx, C, gg, bb, relu).reduce((s, v, i) => s + v * w[i], 0);
      // The ReLU's sign pattern, to drop the rare difference quotient that straddles a kink.
      const signs = (xx: ArrayLike<number>, gg: ArrayLike<number>, bb: ArrayLike<number>) =>
        bnForwardRef(xx, C, gg, bb, false).reduce((s, v, i) => s + (v > 0 ? i + 1 : 0), 0);
      const out = batchNormKernels(k).batchNormTrain(x, C, gamma, beta, new Float32Array(C), new Float32Array(C), 0.1, EPS, relu);
      const g = batchNormKernels(k).batchNormBackward(x, w, C, out.mean, out.invStd, gamma, relu ? out.y : undefined, true, true);
      const h = 1e-5;
      let straddles = 0;
      const fd = (vec: ArrayLike<number>, i: number, f: (v: Float64Array) => number, sig: (v: Float64Array) => number, got: number) => {
        const p = Float64Array.from(vec);
        p[i] += h;
        const [up, upSig] = [f(p), sig(p)];
        p[i] -= 2 * h;
        if (relu && sig(p) !== upSig) {
          straddles++;
          return got;
        }
        return (up - f(p)) / (2 * h);
      };
      const dxFd = Array.from({ length: len }, (_, i) => fd(x, i, (v) => loss(v, gamma, beta), (v) => signs(v, gamma, beta), g.dx![i]));
      const dgFd = Array.from({ length: C }, (_, c) => fd(gamma, c, (v) => loss(x, v, beta), (v) => signs(x, v, beta), g.dgamma[c]));
      const dbFd = Array.from({ length: C }, (_, c) => fd(beta, c, (v) => loss(x, gamma, v), (v) => signs(x, gamma, v), g.dbeta[c]));
      expect(straddles).toBeLessThan(len / 50);
      expect(relErr(g.dx!, dxFd), `C ${C} relu ${relu}`).toBeLessThan(1e-3);
      expect(relErr(g.dgamma, dgFd)).toBeLessThan(1e-4);
      expect(relErr(g.dbeta, dbFd)).toBeLessThan(1e-4);
    }
  });
});

describe('native against js elementwise kernels', () => {
  it('agree on a MedicalNet-sized BatchNorm + ReLU and max-pool (2×16³×64)', () => {
    const nat = nativeKernels();
    const js = jsElementwiseKernels;
    const C = 64;
    const shape = [2, 16, 16, 16, C];
    const len = 2 * 16 ** 3 * C;
    const r = rng(99);
    const x = randn(len, r, 3, -1);
    const gamma = randn(C, r, 0.2, 1);
    const beta = randn(C, r, 0.2);
    const dy = randn(len, r);
    const [rmJ, rvJ, rmN, rvN] = [new Float32Array(C), new Float32Array(C).fill(1), new Float32Array(C), new Float32Array(C).fill(1)];
    const a = batchNormKernels(js).batchNormTrain(x, C, gamma, beta, rmJ, rvJ, 0.1, EPS, true);
    const b = batchNormKernels(nat).batchNormTrain(x, C, gamma, beta, rmN, rvN, 0.1, EPS, true);
    expect(relErr(b.y, a.y)).toBeLessThan(1e-6);
    expect(relErr(rmN, rmJ)).toBeLessThan(1e-6);
    expect(relErr(rvN, rvJ)).toBeLessThan(1e-6);
    const ga = batchNormKernels(js).batchNormBackward(x, dy, C, a.mean, a.invStd, gamma, a.y, true, true);
    const gb = batchNormKernels(nat).batchNormBackward(x, dy, C, b.mean, b.invStd, gamma, b.y, true, true);
    expect(relErr(gb.dx!, ga.dx!)).toBeLessThan(1e-5);
    expect(relErr(gb.dgamma, ga.dgamma)).toBeLessThan(1e-5);
    const pa = js.maxPool(a.y, shape);
    const pb = nat.maxPool(b.y, shape);
    expect(Array.from(pb.argmax)).toEqual(Array.from(pa.argmax));
  });

  it('the addon checks lengths and ignores argmax values that name no voxel of the window', () => {
    const nat = nativeKernels();
    // [1, 3, 1, 1, 1] pools to 2 outputs; 99 and -5 name nothing, so nothing is written from them.
    expect(Array.from(nat.maxPoolBackward(Float32Array.from([1, 2]), Int32Array.from([99, -5]), [1, 3, 1, 1, 1]))).toEqual([0, 0, 0]);
    expect(() => nat.maxPoolBackward(new Float32Array(3), new Int32Array(3), [1, 3, 1, 1, 1])).toThrow(/expected 2/);
    expect(() => nat.add(new Float32Array(3), new Float32Array(4), false)).toThrow();
    expect(() => batchNormKernels(nat).scaleShift(new Float32Array(6), 4, new Float32Array(4), new Float32Array(4), false)).toThrow();
  });
});
