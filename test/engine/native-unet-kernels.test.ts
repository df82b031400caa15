/**
 * The kernels behind the GroupNorm + U-Net head training step:
 *   - the addon's GroupNorm forward/backward (with and without the fused ReLU), channel concat/split, bias add and
 *     channel sums against the JS reference kernels and a float64 GroupNorm, on shapes that exercise the tiled
 *     inner loops, their scalar remainders, several OpenMP threads and a large common offset;
 *   - every ElementwiseKernels function of both implementations writing all of each output when its allocator
 *     hands out NaN-filled memory (what the training step's BufferPool does with stale buffers);
 *   - oneDNN's convolutions writing every value of a caller's NaN-filled `out`;
 *   - BufferPool reuse, and a whole forward + loss + backward with a pool equal, bit for bit, to one without;
 *   - one Med3D training step (ResNet-10 encoder, GroupNorm, U-Net head, Dice + CE) on the native kernels
 *     against the JS reference kernels: logits and every parameter gradient.
 * The native kernels come with the oneDNN addon; when it is not built these fail with the loader's reason
 * (scripts/test.sh builds it), like test/engine/elementwise-kernels.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { inputLength, outputLength, torchConvGeom, weightLength, type ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { jsElementwiseKernels, type ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels, type OneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { BufferPool } from '../../shared/model/graph/pool.ts';
import { act, Tape } from '../../shared/model/graph/tape.ts';
import { createMed3d, type Med3dArchitecture } from '../../shared/model/med3d.ts';
import { med3dForward } from '../../shared/model/med3d-forward.ts';
import { segmentationLossJs } from '../../shared/model/tfjs-trainer.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';
import { batchNormKernels } from '../../shared/model/layers/batch-norm.ts';
import { groupNormKernels } from '../../shared/model/layers/group-norm.ts';

function onednn(): OneDnnKernels {
  const r = loadOneDnnKernels();
  if (!r.kernels) throw new Error(`oneDNN kernels unavailable: ${r.reason}`);
  return r.kernels;
}

function native(): ElementwiseKernels {
  const ew = onednn().elementwise;
  if (!ew) throw new Error('the oneDNN addon has no elementwise functions: rebuild it (npm run build:native)');
  if (!('groupNormForward' in onednn().addon)) throw new Error('the oneDNN addon has no GroupNorm functions: rebuild it (npm run build:native)');
  return ew;
}

const randn = (n: number, seed: number, mean = 0, std = 1) => {
  const r = mulberry32(seed);
  return Float32Array.from({ length: n }, () => mean + std * gaussian(r));
};

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

/** Exact equality, counted (toEqual on million-element arrays takes seconds). */
function identical(got: ArrayLike<number>, want: ArrayLike<number>): void {
  expect(got.length).toBe(want.length);
  let diff = 0;
  for (let i = 0; i < want.length; i++) if (!Object.is(got[i], want[i])) diff++;
  expect(diff).toBe(0);
}

/** max|got − want| / max(max|want|, floor). */
function relErr(got: ArrayLike<number>, want: ArrayLike<number>, floor = 1e-30): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
  return d / Math.max(maxAbs(want), floor);
}

/** nn.GroupNorm in float64 (forward only): per sample and group, biased variance over voxels × group channels. */
function groupNormRef(x: ArrayLike<number>, n: number, C: number, G: number, gamma: ArrayLike<number>, beta: ArrayLike<number>, relu: boolean): Float64Array {
  const V = x.length / n / C;
  const cg = C / G;
  const y = new Float64Array(x.length);
  for (let b = 0; b < n; b++) {
    for (let g = 0; g < G; g++) {
      let s = 0;
      for (let v = 0; v < V; v++) for (let c = g * cg; c < (g + 1) * cg; c++) s += x[(b * V + v) * C + c];
      const mean = s / (V * cg);
      let q = 0;
      for (let v = 0; v < V; v++) for (let c = g * cg; c < (g + 1) * cg; c++) q += (x[(b * V + v) * C + c] - mean) ** 2;
      const inv = 1 / Math.sqrt(q / (V * cg) + 1e-5);
      for (let v = 0; v < V; v++) {
        for (let c = g * cg; c < (g + 1) * cg; c++) {
          const i = (b * V + v) * C + c;
          const t = (x[i] - mean) * inv * gamma[c] + beta[c];
          y[i] = relu ? Math.max(t, 0) : t;
        }
      }
    }
  }
  return y;
}

// [n, V, C, G]: C = 8 (the U-Net head, 8 voxels per 64-value tile), 16, 24 (64 is no multiple of it), 6, 128
// (one voxel per tile); V not a multiple of the tile (scalar remainder); large V × C for several threads.
const GN_SHAPES: readonly (readonly [number, number, number, number])[] = [
  [2, 13, 8, 8],
  [2, 4099, 8, 8],
  [1, 9, 24, 3],
  [3, 7, 6, 2],
  [2, 2731, 16, 8],
  [2, 65, 128, 8],
  [1, 40000, 8, 2],
];

describe('native GroupNorm against the JS reference and float64', () => {
  for (const [n, V, C, G] of GN_SHAPES) {
    for (const relu of [false, true]) {
      it(`[n ${n}, V ${V}, C ${C}, G ${G}]${relu ? ' + ReLU' : ''}`, () => {
        const nat = native();
        const len = n * V * C;
        // A common offset of 3 (std 0.7): the statistics must not cancel.
        const x = randn(len, len + C, 3, 0.7);
        const dy = randn(len, len + 1);
        const gamma = randn(C, C, 1, 0.3);
        const beta = randn(C, C + 1, 0, 0.3);
        const js = groupNormKernels(jsElementwiseKernels).groupNormForward(x, n, C, G, gamma, beta, 1e-5, relu);
        const got = groupNormKernels(nat).groupNormForward(x, n, C, G, gamma, beta, 1e-5, relu);
        expect(relErr(got.y, groupNormRef(x, n, C, G, gamma, beta, relu))).toBeLessThan(1e-6);
        expect(relErr(got.y, js.y)).toBeLessThan(1e-6);
        expect(relErr(got.mean, js.mean)).toBeLessThan(1e-7);
        expect(relErr(got.invStd, js.invStd)).toBeLessThan(1e-6);

        const gj = groupNormKernels(jsElementwiseKernels).groupNormBackward(x, dy, n, C, G, js, gamma, relu ? js.y : undefined, true);
        const gn = groupNormKernels(nat).groupNormBackward(x, dy, n, C, G, got, gamma, relu ? got.y : undefined, true);
        expect(relErr(gn.dx!, gj.dx!)).toBeLessThan(2e-6);
        expect(relErr(gn.dgamma, gj.dgamma)).toBeLessThan(2e-6);
        expect(relErr(gn.dbeta, gj.dbeta)).toBeLessThan(2e-6);
        const noDx = groupNormKernels(nat).groupNormBackward(x, dy, n, C, G, got, gamma, relu ? got.y : undefined, false);
        expect(noDx.dx).toBeUndefined();
        expect(Array.from(noDx.dgamma)).toEqual(Array.from(gn.dgamma));
      });
    }
  }

  it('keeps its precision with |mean| / std = 1000 and refuses a group count that does not divide C', () => {
    const nat = native();
    const [n, V, C, G] = [2, 3001, 8, 4];
    const x = randn(n * V * C, 5, 1000, 1);
    const gamma = new Float32Array(C).fill(1);
    const beta = new Float32Array(C);
    const got = groupNormKernels(nat).groupNormForward(x, n, C, G, gamma, beta, 1e-5, false);
    // float32 inputs of magnitude 1000 carry ±3e-5 each; the normalised values are O(1).
    expect(relErr(got.y, groupNormRef(x, n, C, G, gamma, beta, false))).toBeLessThan(1e-5);
    expect(() => groupNormKernels(nat).groupNormForward(x, n, C, 3, new Float32Array(C), beta, 1e-5, false)).toThrow(/cannot be split into 3 groups/);
    expect(() => groupNormKernels(nat).groupNormForward(x.subarray(1), n, C, G, gamma, beta, 1e-5, false)).toThrow(/do not form 2 samples/);
  });
});

describe('norm layers and the addon', () => {
  it('run the addon kernels they find by name; the JS kernels offer none', () => {
    const nat = native();
    const calls: string[] = [];
    const spied: ElementwiseKernels = {
      ...nat,
      native<F extends (...args: never[]) => unknown>(name: string): F | undefined {
        const f = nat.native<(...args: never[]) => unknown>(name);
        return f && (((...args: never[]) => {
          calls.push(name);
          return f(...args);
        }) as F);
      },
    };
    const [n, C] = [2, 8];
    const x = randn(n * 27 * C, 3);
    const dy = randn(x.length, 4);
    const gamma = randn(C, 5, 1, 0.3);
    const beta = randn(C, 6, 0, 0.3);
    const gn = groupNormKernels(spied);
    const fwd = gn.groupNormForward(x, n, C, 4, gamma, beta, 1e-5, true);
    gn.groupNormBackward(x, dy, n, C, 4, fwd, gamma, fwd.y, true);
    const bn = batchNormKernels(spied);
    const t = bn.batchNormTrain(x, C, gamma, beta, new Float32Array(C), new Float32Array(C).fill(1), 0.1, 1e-5, false);
    bn.batchNormBackward(x, dy, C, t.mean, t.invStd, gamma, undefined, true, true);
    expect(calls).toEqual(['groupNormForward', 'groupNormBackward', 'bnStats', 'scaleShift', 'bnBackward']);
    for (const name of ['bnStats', 'groupNormForward', 'concat']) expect(jsElementwiseKernels.native(name)).toBeUndefined();
    expect(nat.native('noSuchKernel')).toBeUndefined();
  });
});

describe('native concat, split, bias add and channel sums against the JS reference', () => {
  for (const [voxels, Ca, Cb] of [[7, 8, 8], [70001, 8, 16], [33, 3, 5], [9000, 32, 64], [5, 1, 1]] as const) {
    it(`${voxels} voxels, ${Ca} + ${Cb} channels`, () => {
      const nat = native();
      const a = randn(voxels * Ca, voxels + Ca);
      const b = randn(voxels * Cb, voxels + Cb);
      const y = nat.concat(a, Ca, b, Cb);
      identical(y, jsElementwiseKernels.concat(a, Ca, b, Cb));
      identical(y.subarray(0, Ca), a.subarray(0, Ca));
      identical(y.subarray(Ca, Ca + Cb), b.subarray(0, Cb));
      const parts = nat.split(y, Ca, Cb, true, true);
      identical(parts.a!, a);
      identical(parts.b!, b);
      const onlyB = nat.split(y, Ca, Cb, false, true);
      expect(onlyB.a).toBeUndefined();
      identical(onlyB.b!, b);

      const bias = randn(Ca, 3);
      const [yn, yj] = [a.slice(), a.slice()];
      nat.biasAdd(yn, Ca, bias);
      jsElementwiseKernels.biasAdd(yj, Ca, bias);
      identical(yn, yj);
      expect(yn[Ca]).toBe(Math.fround(a[Ca] + bias[0]));

      const sn = new Float64Array(Cb).fill(1);
      const sj = new Float64Array(Cb).fill(1);
      nat.channelSum(b, Cb, sn);
      jsElementwiseKernels.channelSum(b, Cb, sj);
      // Both accumulate from the 1 already there; float partials of ≤ 32 voxels in the addon.
      expect(relErr(sn, sj)).toBeLessThan(1e-6);
    });
  }
});

describe('kernels write every value of outputs from a dirty allocator', () => {
  const dirty = (n: number) => new Float32Array(n).fill(Number.NaN);
  const impls: [string, () => ElementwiseKernels][] = [
    ['js', () => jsElementwiseKernels],
    ['native', native],
  ];
  it.each(impls)('%s elementwise kernels', (_name, get) => {
    const clean = get();
    const k = clean.withAlloc(dirty);
    const [n, D, H, W, C] = [2, 5, 6, 7, 8];
    const len = n * D * H * W * C;
    const x = randn(len, 1);
    const x2 = randn(len, 2);
    const dy = randn(len, 3);
    const gamma = randn(C, 4, 1, 0.2);
    const beta = randn(C, 5);
    const same = (a: ArrayLike<number> | undefined, b: ArrayLike<number> | undefined) => identical(a!, b!);
    const stats = () => [new Float32Array(C), new Float32Array(C).fill(1)] as const;
    for (const relu of [false, true]) {
      const [m1, v1] = stats();
      const [m2, v2] = stats();
      const bnC = batchNormKernels(clean).batchNormTrain(x, C, gamma, beta, m1, v1, 0.1, 1e-5, relu);
      const bnD = batchNormKernels(k).batchNormTrain(x, C, gamma, beta, m2, v2, 0.1, 1e-5, relu);
      same(bnD.y, bnC.y);
      same(batchNormKernels(k).scaleShift(x, C, gamma, beta, relu), batchNormKernels(clean).scaleShift(x, C, gamma, beta, relu));
      same(
        batchNormKernels(k).batchNormBackward(x, dy, C, bnC.mean, bnC.invStd, gamma, relu ? bnC.y : undefined, true, true).dx,
        batchNormKernels(clean).batchNormBackward(x, dy, C, bnC.mean, bnC.invStd, gamma, relu ? bnC.y : undefined, true, true).dx,
      );
      same(k.add(x, x2, relu), clean.add(x, x2, relu));
      const gnC = groupNormKernels(clean).groupNormForward(x, n, C, 4, gamma, beta, 1e-5, relu);
      same(groupNormKernels(k).groupNormForward(x, n, C, 4, gamma, beta, 1e-5, relu).y, gnC.y);
      same(
        groupNormKernels(k).groupNormBackward(x, dy, n, C, 4, gnC, gamma, relu ? gnC.y : undefined, true).dx,
        groupNormKernels(clean).groupNormBackward(x, dy, n, C, 4, gnC, gamma, relu ? gnC.y : undefined, true).dx,
      );
    }
    const r = clean.relu(x);
    same(k.relu(x), r);
    same(k.reluBackward(r, dy), clean.reluBackward(r, dy));
    const shape = [n, D, H, W, C];
    const pool = clean.maxPool(x, shape);
    same(k.maxPool(x, shape).y, pool.y);
    const gy = randn(pool.y.length, 6);
    same(k.maxPoolBackward(gy, pool.argmax, shape), clean.maxPoolBackward(gy, pool.argmax, shape));
    same(k.concat(x, C, x2, C), clean.concat(x, C, x2, C));
    const cat = clean.concat(x, C, x2, C);
    same(k.split(cat, C, C, true, true).a, x);
    same(k.split(cat, C, C, true, true).b, x2);
  });

  it('oneDNN convolutions: forward and both gradients into NaN-filled `out` equal fresh results', () => {
    const k = onednn();
    const geoms = [
      torchConvGeom([2, 9, 8, 7, 8], 16, { k: 3, pad: 1 }),
      torchConvGeom([2, 9, 8, 7, 16], 24, { k: 1, stride: 2 }), // the data gradient is 0 at every skipped voxel
      torchConvGeom([2, 12, 10, 8, 1], 8, { k: 7, stride: 2, pad: 3 }), // 1-channel data gradient: the plain gemm
      torchConvGeom([2, 8, 8, 8, 8], 8, { k: 2, stride: 2 }), // the transposed conv's geometry
      torchConvGeom([2, 6, 6, 6, 16], 16, { k: 3, dilation: 2, pad: 2 }),
    ];
    for (const g of geoms) {
      const x = randn(inputLength(g), 1);
      const w = randn(weightLength(g), 2);
      const dy = randn(outputLength(g), 3);
      const nan = (len: number) => new Float32Array(len).fill(Number.NaN);
      const y = nan(outputLength(g));
      expect(k.conv3d(x, w, g, y)).toBe(y);
      identical(y, k.conv3d(x, w, g));
      const dx = nan(inputLength(g));
      expect(k.conv3dBackwardData(dy, w, g, dx)).toBe(dx);
      identical(dx, k.conv3dBackwardData(dy, w, g));
      const dw = nan(weightLength(g));
      expect(k.conv3dBackwardFilter(x, dy, g, dw)).toBe(dw);
      identical(dw, k.conv3dBackwardFilter(x, dy, g));
    }
    expect(() => k.conv3d(randn(inputLength(geoms[0]), 1), randn(weightLength(geoms[0]), 2), geoms[0], new Float32Array(3))).toThrow(/out has 3 elements/);
  });
});

describe('BufferPool', () => {
  it('serves a step the buffers of the step before, by size, and takes back unused ones', () => {
    const pool = new BufferPool();
    const a = pool.take(10);
    const b = pool.take(10);
    const c = pool.take(3);
    expect(pool.bytes).toBe(4 * 23);
    pool.untake(c);
    expect(pool.take(3)).toBe(c);
    expect(() => pool.untake(new Float32Array(3))).toThrow(/not in use/);
    pool.recycle();
    const again = [pool.take(10), pool.take(10), pool.take(3)];
    expect(new Set(again)).toEqual(new Set([a, b, c]));
    expect(pool.take(10)).not.toBe(a); // a third 10-value buffer is new
    expect(pool.bytes).toBe(4 * 33);
  });
});

// ---- one training step of the recommended network, small ----

function unetArch(): Med3dArchitecture {
  // Width ¼ as the recommended plan (16 base planes, 8 head channels, GroupNorm 8), on a 16³ patch.
  return createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: { kind: 'unet', numClasses: 2 }, norm: 'group', patch: [16, 16, 16] });
}

interface StepResult {
  logits: Float32Array;
  loss: number;
  grads: Map<string, Float32Array>;
}

/** Forward, Dice + CE loss against a fixed label patch, backward: what one trainer step computes before Adam. */
function step(arch: Med3dArchitecture, kernels: ConvKernels, elementwise: ElementwiseKernels, pool?: BufferPool): StepResult {
  const w = arch.init(3);
  const values = new Map(arch.params().map((p) => [p.name, new Float32Array(w.get(p.name)!.data)]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: (n) => arch.params().find((p) => p.name === n)!.shape, grad: (n) => grads.get(n) };
  const [d, h, wd] = arch.patchShape;
  const voxels = 2 * d * h * wd;
  const image = randn(voxels, 9);
  const oneHot = new Float32Array(voxels * 2);
  for (let v = 0; v < voxels; v++) oneHot[2 * v + (image[v] > 0.8 ? 1 : 0)] = 1;
  const tape = new Tape();
  const ops = createMed3dTrainOps({ kernels, store, tape, training: true, elementwise, pool });
  const out = med3dForward(arch, new Map(arch.params().map((p) => [p.name, p.name])), act(image, [2, d, h, wd, 1], false), ops);
  const { loss, grad } = segmentationLossJs(out.data, oneHot, 2);
  const logits = out.data.slice();
  tape.backward(out, grad);
  return { logits, loss, grads };
}

describe('a GroupNorm + U-Net training step', () => {
  it('with a buffer pool (second step on reused, stale buffers) equals the step without one, bit for bit', () => {
    const arch = unetArch();
    const k = onednn();
    const fresh = step(arch, k, native());
    const pool = new BufferPool();
    step(arch, k, native(), pool);
    const bytes = pool.bytes;
    pool.recycle();
    const reused = step(arch, k, native(), pool);
    expect(pool.bytes).toBe(bytes); // the second step allocated nothing
    identical(reused.logits, fresh.logits);
    for (const [name, g] of fresh.grads) identical(reused.grads.get(name)!, g);
  });

  it('on the native kernels matches the JS reference kernels to float32 rounding (logits, loss, every gradient)', () => {
    const arch = unetArch();
    const k = onednn();
    const nat = step(arch, k, native(), new BufferPool());
    const js = step(arch, k, jsElementwiseKernels);
    expect(relErr(nat.logits, js.logits)).toBeLessThan(1e-5);
    expect(Math.abs(nat.loss - js.loss)).toBeLessThan(1e-6 * Math.abs(js.loss));
    // Relative to the tensor's largest gradient. The bias of up1 (the transposed conv that feeds the 1³ fusion
    // conv and its instance norm) has a gradient of exactly 0 in exact arithmetic (the norm removes any per-channel
    // constant): both sides hold float32 rounding noise there, which must stay at that level.
    const scale = Math.max(...[...js.grads.values()].map(maxAbs));
    let worst = 0;
    for (const [name, g] of js.grads) {
      const got = nat.grads.get(name)!;
      if (name === 'head.dec.up1.bias') {
        expect(Math.max(maxAbs(got), maxAbs(g))).toBeLessThan(1e-5 * scale);
        continue;
      }
      const e = relErr(got, g);
      worst = Math.max(worst, e);
      expect(e, name).toBeLessThan(1e-4);
    }
    // The gradients are not all zero (a test that compares zeros with zeros proves nothing).
    expect(maxAbs(js.grads.get('head.dec.in_norm.weight')!)).toBeGreaterThan(1e-6);
    expect(worst).toBeGreaterThan(0);
  });
});
