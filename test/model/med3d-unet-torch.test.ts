/**
 * The recommended federated network (ResNet-10 at ¼ width, GroupNorm, the full-resolution U-Net head) against
 * PyTorch: one forward + backward of loss = Σ logits · probe through the training ops on the oneDNN kernels with
 * their native GroupNorm / concat / bias kernels and a buffer pool (a second pass, so on reused buffers), and on
 * the JS reference kernels, each compared with the same network in float64 PyTorch (bench/py/med3d_unet_grads.py,
 * Debian's /usr/bin/python3 with python3-torch; scripts/test.sh installs it, and the test FAILS without it).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { jsElementwiseKernels, type ElementwiseKernels } from '../../shared/engine/elementwise-kernels.ts';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { BufferPool } from '../../shared/model/graph/pool.ts';
import { act, Tape } from '../../shared/model/graph/tape.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { med3dForward } from '../../shared/model/med3d-forward.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

const REPO = join(import.meta.dirname, '..', '..');
const PYTHON = '/usr/bin/python3'; // Debian's, where python3-torch installs
const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: { kind: 'unet', numClasses: 2 }, norm: 'group', patch: [16, 16, 16] });
const INPUT = [2, 16, 16, 24] as const;

const randn = (n: number, seed: number, mean = 0, std = 1) => {
  const r = mulberry32(seed);
  return Float32Array.from({ length: n }, () => mean + std * gaussian(r));
};
const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};
function relErr(got: ArrayLike<number>, want: ArrayLike<number>, floor: number): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
  return d / Math.max(maxAbs(want), floor);
}

// Weights with GroupNorm γ, β away from 1, 0 so a layout or affine slip shows.
const weights = new Map(
  [...arch.init(5).values()].map((t) => {
    const data = new Float32Array(t.data);
    if (t.name.endsWith('.weight') && t.shape.length === 1) data.set(randn(data.length, data.length + 1, 1, 0.3));
    if (t.name.endsWith('.bias') && t.shape.length === 1 && !t.name.includes('.up')) data.set(randn(data.length, data.length + 2, 0, 0.3));
    return [t.name, data] as const;
  }),
);
const voxels = INPUT.reduce((a, b) => a * b, 1);
const image = randn(voxels, 7, 0.5, 1);
const probe = randn(voxels * 2, 8);

let dir: string;
let torchOut: Float64Array;
let torchGrads: Map<string, Float64Array>;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-unet-torch-'));
  const params = arch.params().map((p) => ({ name: p.name, shape: [...p.shape] }));
  for (const p of params) writeFileSync(join(dir, `${p.name}.f32`), weights.get(p.name)!);
  writeFileSync(join(dir, 'input.f32'), image);
  writeFileSync(join(dir, 'probe.f32'), probe);
  const c = arch.config;
  const head = c.head as { channels: number };
  writeFileSync(
    join(dir, 'manifest.json'),
    JSON.stringify({ depth: 10, shortcut: 'B', base: c.basePlanes, channels: head.channels, classes: 2, groups: c.normGroups, input: INPUT, params }),
  );
  const r = spawnSync(PYTHON, [join(REPO, 'bench', 'py', 'med3d_unet_grads.py'), dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`PyTorch reference failed (needs Debian python3-torch at ${PYTHON}): ${(r.stderr || r.error?.message || '').trim().split('\n').slice(-3).join(' | ')}`);
  const f64 = (p: string) => {
    const b = readFileSync(p);
    return new Float64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  };
  torchOut = f64(join(dir, 'out.f64'));
  torchGrads = new Map(params.map((p) => [p.name, f64(join(dir, 'grad', `${p.name}.f64`))]));
}, 120_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function pass(kernels: ConvKernels, elementwise: ElementwiseKernels, pool?: BufferPool) {
  const values = new Map([...weights].map(([k, v]) => [k, v.slice()]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: (n) => arch.params().find((p) => p.name === n)!.shape, grad: (n) => grads.get(n) };
  const tape = new Tape();
  const ops = createMed3dTrainOps({ kernels, store, tape, training: true, elementwise, pool });
  const out = med3dForward(arch, new Map(arch.params().map((p) => [p.name, p.name])), act(image, [...INPUT, 1], false), ops);
  const logits = out.data.slice();
  tape.backward(out, probe.slice());
  return { logits, grads };
}

function onednn(): ConvKernels & { elementwise?: ElementwiseKernels } {
  const r = loadOneDnnKernels();
  if (!r.kernels) throw new Error(`oneDNN kernels unavailable: ${r.reason}`);
  return r.kernels;
}

describe('Med3D ¼ width, GroupNorm, U-Net head: one training pass against float64 PyTorch', () => {
  const cases: [string, () => { kernels: ConvKernels; ew: ElementwiseKernels; pool?: BufferPool }][] = [
    ['oneDNN + native kernels + buffer pool', () => ({ kernels: onednn(), ew: onednn().elementwise!, pool: new BufferPool() })],
    ['oneDNN + JS reference kernels', () => ({ kernels: onednn(), ew: jsElementwiseKernels })],
  ];
  it.each(cases)('%s', (_name, make) => {
    const { kernels, ew, pool } = make();
    expect(ew).toBeDefined();
    if (pool) {
      pass(kernels, ew, pool);
      pool.recycle();
    }
    const { logits, grads } = pass(kernels, ew, pool);
    expect(relErr(logits, torchOut, 1e-30)).toBeLessThan(1e-5);
    // Relative to each tensor's largest gradient. up1's bias has a gradient of exactly 0 in exact arithmetic (the 1³
    // fusion conv and its instance norm remove any per-channel constant; PyTorch's float64 gives ~1e-17): there
    // float32 rounding noise is all there is, and it must stay at that level.
    const scale = Math.max(...[...torchGrads.values()].map(maxAbs));
    let worst = { err: 0, name: '' };
    let zeros = 0;
    for (const [name, want] of torchGrads) {
      const got = grads.get(name)!;
      if (maxAbs(want) < 1e-9 * scale) {
        zeros++;
        expect(maxAbs(got), `${name} should have a zero gradient`).toBeLessThan(1e-5 * scale);
        continue;
      }
      const err = relErr(got, want, 1e-30);
      if (err > worst.err) worst = { err, name };
    }
    expect(zeros).toBeLessThanOrEqual(1);
    expect(worst.err, `worst gradient ${worst.name}`).toBeLessThan(1e-4);
    expect(maxAbs(torchGrads.get('head.dec.in_norm.weight')!)).toBeGreaterThan(1e-3);
  });
});
