/**
 * Every norm layer a plan can name (shared/model/layers/norm-layers.ts) against its PyTorch module in float64:
 * BatchNorm against nn.BatchNorm3d (train and eval, running statistics too), GroupNorm against nn.GroupNorm and
 * InstanceNorm against nn.InstanceNorm3d(affine=True) — forward, input and γ/β gradients, with and without the fused
 * ReLU, through the layer's tape op on the JS kernels and on the addon's (found by name), and its tfjs eval forward.
 * The reference runs bench/py/norm_layer_grads.py under Debian's /usr/bin/python3 with python3-torch (scripts/test.sh
 * installs it; the test FAILS without it). A new layer needs an entry in TORCH below, or this file does not compile.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { jsElementwiseKernels, type ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import type { OpContext, ParamStore } from '../../shared/model/graph/op-context.ts';
import { accumulate, act, Tape } from '../../shared/model/graph/tape.ts';
import type { NormLayer, NormParamSuffix } from '../../shared/model/layers/norm-layer.ts';
import { NORM_LAYERS, type NormKind } from '../../shared/model/layers/norm-layers.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

const REPO = join(import.meta.dirname, '..', '..');
const PYTHON = '/usr/bin/python3'; // Debian's, where python3-torch installs
const SHAPE = [2, 3, 4, 5, 8] as const; // N, D, H, W, C: D ≠ H ≠ W, two samples
const C = SHAPE[4];
const NORM_GROUPS = 4;

/** The PyTorch module each layer must match (bench/py/norm_layer_grads.py). */
const TORCH: Record<NormKind, 'batch_norm' | 'group_norm' | 'instance_norm'> = {
  batch: 'batch_norm',
  group: 'group_norm',
  instance: 'instance_norm',
};

const randn = (n: number, seed: number, mean = 0, std = 1) => {
  const r = mulberry32(seed);
  return Float32Array.from({ length: n }, () => mean + std * gaussian(r));
};
const voxels = SHAPE.reduce((a, b) => a * b, 1);
// An offset of 2 (std 0.8): the statistics must not cancel; γ, β away from 1, 0 so an affine slip shows.
const input = randn(voxels, 1, 2, 0.8);
const probe = randn(voxels, 2);
const tensors: Record<NormParamSuffix, Float32Array> = {
  weight: randn(C, 3, 1, 0.3),
  bias: randn(C, 4, 0, 0.3),
  running_mean: randn(C, 5, 1.5, 0.3),
  running_var: Float32Array.from(randn(C, 6, 0.6, 0.2), Math.abs),
};

interface Case {
  readonly name: string;
  readonly layer: NormLayer;
  readonly training: boolean;
  readonly relu: boolean;
}
const cases: Case[] = NORM_LAYERS.flatMap((layer) =>
  [true, false].flatMap((training) => [false, true].map((relu) => ({ name: `${layer.kind} ${training ? 'train' : 'eval'}${relu ? ' + ReLU' : ''}`, layer, training, relu }))),
);

interface Reference {
  readonly y: number[];
  readonly dx: number[];
  readonly dweight: number[];
  readonly dbias: number[];
  readonly running_mean?: number[];
  readonly running_var?: number[];
}
let reference: Record<string, Reference>;
let tf: typeof TfModule;

beforeAll(async () => {
  const request = {
    cases: cases.map((c) => ({
      name: c.name,
      module: TORCH[c.layer.kind as NormKind],
      groups: c.layer.groups(C, NORM_GROUPS) ?? null,
      training: c.training,
      relu: c.relu,
      shape: SHAPE,
      x: Array.from(input),
      probe: Array.from(probe),
      weight: Array.from(tensors.weight),
      bias: Array.from(tensors.bias),
      running_mean: Array.from(tensors.running_mean),
      running_var: Array.from(tensors.running_var),
    })),
  };
  const r = spawnSync(PYTHON, [join(REPO, 'bench', 'py', 'norm_layer_grads.py')], { input: JSON.stringify(request), encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`PyTorch reference failed (needs Debian python3-torch at ${PYTHON}): ${(r.stderr || r.error?.message || '').trim().split('\n').slice(-3).join(' | ')}`);
  reference = JSON.parse(r.stdout) as Record<string, Reference>;
  tf = (await selectEngine({ force: 'cpu' })).tf;
}, 120_000);

function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  let m = 0;
  for (let i = 0; i < want.length; i++) {
    d = Math.max(d, Math.abs(got[i] - want[i]));
    m = Math.max(m, Math.abs(want[i]));
  }
  return d / Math.max(m, 1e-3);
}

/** One forward + backward of loss = Σ out · probe through the layer's tape op. */
function runOnTape(c: Case, kernels: ElementwiseKernels) {
  const values = new Map(c.layer.params.map((p) => [`l.${p.suffix}`, Float32Array.from(tensors[p.suffix])]));
  const grads = new Map(c.layer.params.filter((p) => p.trainable).map((p) => [`l.${p.suffix}`, new Float32Array(C)]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: () => [C], grad: (n) => grads.get(n) };
  const tape = new Tape();
  const ctx: OpContext = { store, training: c.training, bnMomentum: 0.1, kernels, record: (f) => tape.record(f), accumulate };
  const x = act(Float32Array.from(input), SHAPE, true);
  const out = c.layer.train(ctx, x, (s) => `l.${s}`, c.layer.groups(C, NORM_GROUPS), c.relu);
  tape.backward(out, Float32Array.from(probe));
  return { y: out.data, dx: x.grad!, dweight: grads.get('l.weight')!, dbias: grads.get('l.bias')!, values };
}

const nativeKernels = loadOneDnnKernels().kernels?.elementwise;
const engines: [string, ElementwiseKernels][] = [['js', jsElementwiseKernels], ...(nativeKernels ? [['native', nativeKernels] as [string, ElementwiseKernels]] : [])];

describe('norm layers against PyTorch (float64)', () => {
  it('covers every registered layer, and the addon kernels where the addon is built', () => {
    expect(cases.map((c) => c.layer.kind)).toEqual(expect.arrayContaining(['batch', 'group', 'instance']));
    expect(Object.keys(reference).sort()).toEqual(cases.map((c) => c.name).sort());
  });

  for (const c of cases) {
    for (const [engine, kernels] of engines) {
      it(`${c.name} on the tape (${engine} kernels): output, input and γ/β gradients${c.layer.runningStatistics && c.training ? ', running statistics' : ''}`, () => {
        const want = reference[c.name];
        const got = runOnTape(c, kernels);
        expect(relErr(got.y, want.y)).toBeLessThan(2e-6);
        expect(relErr(got.dx, want.dx)).toBeLessThan(2e-5);
        expect(relErr(got.dweight, want.dweight)).toBeLessThan(2e-5);
        expect(relErr(got.dbias, want.dbias)).toBeLessThan(2e-5);
        if (want.running_mean && want.running_var) {
          expect(relErr(got.values.get('l.running_mean')!, want.running_mean)).toBeLessThan(2e-6);
          expect(relErr(got.values.get('l.running_var')!, want.running_var)).toBeLessThan(2e-6);
        }
      });
    }
    if (!c.training) {
      it(`${c.name} on tfjs (eval forward)`, () => {
        const param = (s: NormParamSuffix) => tf.tensor1d(tensors[s]);
        const y = tf.tidy(() => c.layer.evalTfjs(tf, tf.tensor5d(input, [...SHAPE]), param, c.layer.groups(C, NORM_GROUPS), c.relu).dataSync());
        expect(relErr(y, reference[c.name].y)).toBeLessThan(2e-6);
      });
    }
  }
});
