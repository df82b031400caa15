/**
 * The oneDNN convolution kernels against tfjs's pure-JS `cpu` backend (forward) and against the adjoint
 * identities ⟨conv(x,w), dy⟩ = ⟨x, bwdData(dy,w)⟩ = ⟨w, bwdFilter(x,dy)⟩ (both gradients), on geometries
 * covering MedicalNet's. The addon is required: when it is not built these tests fail with the loader's
 * reason (scripts/test.sh installs libdnnl-dev so `npm ci` builds it). tfjs's wasm backend is never a
 * reference here: its conv3d gradients are wrong.
 */
import type * as TfModule from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  inputLength,
  outputLength,
  padAfter,
  tfSameGeom,
  torchConvGeom,
  weightLength,
  type Conv3dGeom,
  type Triple,
} from '../../shared/engine/conv-kernels.ts';
import { loadOneDnnKernels, type OneDnnKernels, type OneDnnLayout } from '../../shared/engine/onednn-kernels.ts';
import { mulberry32 } from '../../shared/util/random.ts';

type Tf = typeof TfModule;
let tf: Tf;

function kernelsOrFail(opts: Parameters<typeof loadOneDnnKernels>[0] = {}): OneDnnKernels {
  const r = loadOneDnnKernels(opts);
  if (!r.kernels) throw new Error(`onednn kernels unavailable: ${r.reason}`);
  return r.kernels;
}

beforeAll(async () => {
  tf = await import('@tensorflow/tfjs');
  await tf.setBackend('cpu');
  await tf.ready();
});

// A small deterministic PRNG (mulberry32), so failures reproduce.
const rng = mulberry32;

function randomArray(n: number, rand: () => number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rand() * 2 - 1;
  return a;
}

const dot = (a: Float32Array, b: Float32Array): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};
const absDot = (a: Float32Array, b: Float32Array): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] * b[i]);
  return s;
};

function maxRelError(actual: Float32Array, expected: Float32Array): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) {
    diff = Math.max(diff, Math.abs(actual[i] - expected[i]));
    scale = Math.max(scale, Math.abs(expected[i]));
  }
  return diff / (scale || 1);
}

/** Forward reference: crop (negative padding after), tf.pad, then tf.conv3d 'valid' on the cpu backend. */
function referenceConv(x: Float32Array, w: Float32Array, g: Conv3dGeom): Float32Array {
  const pa = padAfter(g);
  return tf.tidy(() => {
    let xt = tf.tensor5d(x, [g.n, ...g.in, g.cin]);
    if (pa.some((p) => p < 0)) {
      const size = g.in.map((s, i) => s + Math.min(pa[i], 0));
      xt = tf.slice(xt, [0, 0, 0, 0, 0], [g.n, size[0], size[1], size[2], g.cin]);
    }
    const padded = tf.pad(xt, [[0, 0], ...g.in.map((_, i) => [g.padBefore[i], Math.max(pa[i], 0)] as [number, number]), [0, 0]]);
    const wt = tf.tensor5d(w, [...g.k, g.cin, g.cout]);
    const y = tf.conv3d(padded, wt, g.stride as [number, number, number], 'valid', 'NDHWC', g.dilation as [number, number, number]);
    expect(y.shape).toEqual([g.n, ...g.out, g.cout]);
    return y.dataSync() as Float32Array;
  });
}

interface Case {
  readonly name: string;
  readonly geom: (rand: () => number) => Conv3dGeom;
}

const pick = (rand: () => number, lo: number, hi: number): number => lo + Math.floor(rand() * (hi - lo + 1));
const odd = (rand: () => number, lo: number, hi: number): number => pick(rand, lo, hi) | 1;
const oddShape = (rand: () => number, lo: number, hi: number): number[] => [2, odd(rand, lo, hi), odd(rand, lo, hi), odd(rand, lo, hi), pick(rand, 1, 5)];

const CASES: Case[] = [
  { name: 'conv1: k7 s2 p3, 1 channel in', geom: (r) => torchConvGeom([2, odd(r, 7, 13), odd(r, 7, 13), odd(r, 7, 13), 1], pick(r, 3, 8), { k: 7, stride: 2, pad: 3 }) },
  { name: 'conv1: k7 s2 p3, several channels in', geom: (r) => torchConvGeom(oddShape(r, 7, 13), pick(r, 3, 8), { k: 7, stride: 2, pad: 3 }) },
  { name: 'k3 s1 p1', geom: (r) => torchConvGeom(oddShape(r, 3, 9), pick(r, 2, 9), { k: 3, stride: 1, pad: 1 }) },
  { name: 'k3 s2 p1', geom: (r) => torchConvGeom(oddShape(r, 5, 11), pick(r, 2, 9), { k: 3, stride: 2, pad: 1 }) },
  { name: 'k3 dilation 2 pad 2', geom: (r) => torchConvGeom(oddShape(r, 3, 9), pick(r, 2, 9), { k: 3, dilation: 2, pad: 2 }) },
  { name: 'k3 dilation 4 pad 4', geom: (r) => torchConvGeom(oddShape(r, 3, 9), pick(r, 2, 9), { k: 3, dilation: 4, pad: 4 }) },
  { name: 'shortcut B: k1 s2 p0 (odd input)', geom: (r) => torchConvGeom(oddShape(r, 3, 9), pick(r, 2, 9), { k: 1, stride: 2 }) },
  // Even input: one trailing row is never read (padding after = −1, within oneDNN's rounding slack).
  { name: 'shortcut B: k1 s2 p0 (even input)', geom: (r) => torchConvGeom([2, 6, 8, 4, pick(r, 1, 5)], pick(r, 2, 9), { k: 1, stride: 2 }) },
  { name: 'k2 s2 (transposed-conv shapes)', geom: (r) => torchConvGeom(oddShape(r, 3, 9), pick(r, 2, 9), { k: 2, stride: 2 }) },
  { name: "TF 'same' k3 s2 (asymmetric padding)", geom: (r) => tfSameGeom([2, 8, 7, 6, pick(r, 1, 4)], pick(r, 2, 6), 3, 2) },
  { name: "TF 'same' k4 s1 (more padding after)", geom: (r) => tfSameGeom(oddShape(r, 3, 7), pick(r, 2, 6), 4, 1) },
  // tfjs takes per-axis strides or per-axis dilations, not both at once.
  {
    name: 'per-axis kernel and stride',
    geom: (r) => torchConvGeom([2, 9, 7, 11, pick(r, 1, 4)], pick(r, 2, 6), { k: [3, 1, 5] as Triple, stride: [1, 2, 3] as Triple, pad: [2, 0, 1] as Triple }),
  },
  {
    name: 'per-axis kernel and dilation',
    geom: (r) => torchConvGeom([2, 9, 7, 11, pick(r, 1, 4)], pick(r, 2, 6), { k: [3, 2, 3] as Triple, dilation: [2, 1, 3] as Triple, pad: [2, 0, 1] as Triple }),
  },
  {
    // oneDNN 2.6.3's jit backward-weights kernel is wrong (and corrupts the heap) when the kernel reaches
    // the input size along an axis; the addon keeps those on the gemm path.
    name: 'kernel as large as the input (k7 on 7, k5 on 3)',
    geom: (r) => torchConvGeom([2, 7, 9, 3, pick(r, 1, 17)], pick(r, 3, 16), { k: [7, 3, 5] as Triple, stride: [2, 1, 2] as Triple, pad: [3, 1, 3] as Triple }),
  },
  {
    // Output smaller than the input allows: padding after −5 is below oneDNN's −(stride−1) limit, so the
    // kernels convolve a cropped copy (and scatter the data gradient back into zeros).
    name: 'cropped input (padding after < 1 − stride)',
    geom: (r) => ({ n: 2, in: [11, 9, 7], cin: pick(r, 1, 4), cout: pick(r, 2, 5), k: [1, 3, 1], stride: [2, 2, 1], dilation: [1, 1, 1], padBefore: [0, 1, 0], out: [3, 2, 7] }),
  },
];

describe('onednn conv kernels', () => {
  it('loads (the addon must be built: apt-get install -y libdnnl-dev g++ make && npm run build:native)', () => {
    const r = loadOneDnnKernels();
    if (!r.kernels) throw new Error(`onednn kernels unavailable: ${r.reason}`);
    expect(r.kernels.name).toBe('onednn');
    expect(r.info.version).toMatch(/^\d+\.\d+/);
    expect(r.info.threads).toBeGreaterThanOrEqual(1);
  });

  for (const [ci, c] of CASES.entries()) {
    it(`${c.name}: forward matches tfjs cpu; gradients satisfy the adjoint identities`, () => {
      const k = kernelsOrFail();
      const rand = rng(1000 + ci);
      const g = c.geom(rand);
      const x = randomArray(inputLength(g), rand);
      const w = randomArray(weightLength(g), rand);
      const dy = randomArray(outputLength(g), rand);

      const y = k.conv3d(x, w, g);
      expect(y.length).toBe(outputLength(g));
      expect(maxRelError(y, referenceConv(x, w, g))).toBeLessThanOrEqual(1e-4);

      const dx = k.conv3dBackwardData(dy, w, g);
      const dw = k.conv3dBackwardFilter(x, dy, g);
      expect(dx.length).toBe(inputLength(g));
      expect(dw.length).toBe(weightLength(g));
      const lhs = dot(y, dy);
      const scale = absDot(y, dy);
      expect(Math.abs(dot(x, dx) - lhs) / scale).toBeLessThanOrEqual(1e-4);
      expect(Math.abs(dot(w, dw) - lhs) / scale).toBeLessThanOrEqual(1e-4);
    });
  }

  it('finite differences agree with both gradients of L = ⟨conv(x, w), dy⟩', () => {
    const k = kernelsOrFail();
    const rand = rng(7);
    const g = torchConvGeom([2, 5, 7, 5, 3], 4, { k: 3, stride: 2, pad: 1 });
    const x = randomArray(inputLength(g), rand);
    const w = randomArray(weightLength(g), rand);
    const dy = randomArray(outputLength(g), rand);
    const loss = (xx: Float32Array, ww: Float32Array): number => dot(k.conv3d(xx, ww, g), dy);
    const dx = k.conv3dBackwardData(dy, w, g);
    const dw = k.conv3dBackwardFilter(x, dy, g);
    // L is linear in x and in w, so a large step loses nothing to curvature and little to rounding.
    const eps = 0.5;
    for (const i of [0, 17, Math.floor(x.length / 2), x.length - 1]) {
      const xp = x.slice();
      const xm = x.slice();
      xp[i] += eps;
      xm[i] -= eps;
      const fd = (loss(xp, w) - loss(xm, w)) / (2 * eps);
      expect(Math.abs(fd - dx[i])).toBeLessThanOrEqual(1e-3 * Math.max(1, Math.abs(dx[i])));
    }
    for (const i of [0, 5, Math.floor(w.length / 2), w.length - 1]) {
      const wp = w.slice();
      const wm = w.slice();
      wp[i] += eps;
      wm[i] -= eps;
      const fd = (loss(x, wp) - loss(x, wm)) / (2 * eps);
      expect(Math.abs(fd - dw[i])).toBeLessThanOrEqual(1e-3 * Math.max(1, Math.abs(dw[i])));
    }
  });

  for (const [gi, shape] of [[2, 7, 5, 9, 16], [2, 9, 7, 5, 1]].entries())
    it(`every layout and output mode gives the same results (${shape[4]} channels in)`, () => {
      const rand = rng(11 + gi);
      const g = torchConvGeom(shape, 16, { k: 3, stride: 1 + gi, pad: 1 });
      const x = randomArray(inputLength(g), rand);
      const w = randomArray(weightLength(g), rand);
      const dy = randomArray(outputLength(g), rand);
      const base = kernelsOrFail({ layout: 'plain' });
      const y0 = base.conv3d(x, w, g);
      const dx0 = base.conv3dBackwardData(dy, w, g);
      const dw0 = base.conv3dBackwardFilter(x, dy, g);
      for (const layout of ['any-weights', 'any', 'ncsp', 'default', 'auto'] as OneDnnLayout[])
        for (const output of ['js', 'external'] as const) {
          const k = kernelsOrFail({ layout, output });
          for (let rep = 0; rep < 2; rep++) {
            // The second round reuses the cached primitives (and, for auto, the chosen layout).
            expect(maxRelError(k.conv3d(x, w, g), y0)).toBeLessThanOrEqual(1e-5);
            expect(maxRelError(k.conv3dBackwardData(dy, w, g), dx0)).toBeLessThanOrEqual(1e-5);
            expect(maxRelError(k.conv3dBackwardFilter(x, dy, g), dw0)).toBeLessThanOrEqual(1e-5);
          }
          expect(k.impl('forward', g)).toMatch(/\S/);
        }
    });

  it('backward-filter with a kernel as large as the input is right in every layout', () => {
    const rand = rng(21);
    const g = torchConvGeom([1, 7, 7, 5, 17], 16, { k: 7, stride: 2, pad: 3 });
    const x = randomArray(inputLength(g), rand);
    const dy = randomArray(outputLength(g), rand);
    const dw0 = kernelsOrFail({ layout: 'plain' }).conv3dBackwardFilter(x, dy, g);
    for (const layout of ['any-weights', 'any', 'ncsp', 'default', 'auto'] as OneDnnLayout[])
      expect(maxRelError(kernelsOrFail({ layout }).conv3dBackwardFilter(x, dy, g), dw0)).toBeLessThanOrEqual(1e-5);
    expect(kernelsOrFail({ layout: 'any-weights' }).impl('backwardFilter', g)).toMatch(/gemm/);
  });

  it('keeps at most 192 cached primitives', () => {
    const k = kernelsOrFail({ layout: 'any-weights' });
    for (let i = 0; i < 200; i++) {
      const g = torchConvGeom([1, 2, 2, 1 + i, 1], 1, { k: 1 });
      const y = k.conv3d(new Float32Array(inputLength(g)).fill(2), new Float32Array([3]), g);
      expect(y[i]).toBe(6);
    }
    const r = loadOneDnnKernels();
    expect(r.kernels && r.info.cachedPrimitives).toBeLessThanOrEqual(192);
  });

  it('threads: OMP_NUM_THREADS or every core by default; the threads option sets them', () => {
    const before = kernelsOrFail().addon.info().threads;
    const env = Number(process.env.OMP_NUM_THREADS);
    if (env > 0) expect(before).toBe(env);
    else expect(before).toBe(kernelsOrFail().addon.info().procs);
    // Waiting threads sleep unless the user chose otherwise (spinning stalls every call on a busy machine).
    expect(process.env.OMP_WAIT_POLICY).toBeDefined();
    const one = loadOneDnnKernels({ threads: 1 });
    try {
      expect(one.kernels && one.info.threads).toBe(1);
    } finally {
      kernelsOrFail().addon.setThreads(before);
    }
    expect(kernelsOrFail().addon.info().threads).toBe(before);
  });

  it('accepts subarray views and rejects arrays of the wrong length with a clear error', () => {
    const k = kernelsOrFail();
    const rand = rng(3);
    const g = torchConvGeom([2, 5, 5, 5, 2], 3, { k: 3, pad: 1 });
    const x = randomArray(inputLength(g), rand);
    const w = randomArray(weightLength(g), rand);
    const backing = new Float32Array(x.length + 8);
    backing.set(x, 5);
    const view = backing.subarray(5, 5 + x.length);
    expect(maxRelError(k.conv3d(view, w, g), k.conv3d(x, w, g))).toBe(0);
    expect(() => k.conv3d(x.subarray(1), w, g)).toThrow(/x has \d+ elements, the geometry needs \d+/);
    expect(() => k.conv3dBackwardFilter(x, new Float32Array(3), g)).toThrow(/dy has 3 elements/);
  });
});
