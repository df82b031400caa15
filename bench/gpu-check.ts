/**
 * The GPU check of the CUDA device (scripts/gpu-check.sh runs it on a lent GPU machine; docs/gpu.md):
 *   1. parity: the PyTorch training-step fixtures (test/fixtures/med3d-train: output, every parameter gradient,
 *      the running statistics; the float64 PyTorch references and the tolerances of test/model/med3d-train.test.ts)
 *      on the CUDA device with TF32 off; then one training step of GroupNorm / U-Net / 3-class and BatchNorm /
 *      MedicalNet-head networks on the CUDA device against the host device (loss, every gradient through an SGD
 *      step), and the Adam and SGD kernels against the host's;
 *   2. timing: ms per training step (batch in, forward, loss, backward, Adam, loss out) of R10 and R18 at 64³ and
 *      128³, batch 4, full width, MedicalNet's segmentation head, fp32 (cuDNN with TF32, as PyTorch's default),
 *      against PyTorch on the same GPU in the same run (bench/py/med3d_gpu_step.py; fp32 and bf16 autocast).
 * Prints one table per part and a last line "N passed, N failed" for the parity checks.
 *
 *   node --import tsx bench/gpu-check.ts [--addon native/build/Release/medfl_cuda.node] [--parity-only] [--steps 10] [--sizes 64,128]
 *   node --import tsx bench/gpu-check.ts --host --sizes 16 --steps 2    # a dry run of the script on the CPU
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { permute } from '../shared/checkpoints/torch-mapping.ts';
import { createHostDevice } from '../shared/engine/host-device.ts';
import { loadCudaDevice, type CudaDevice } from '../shared/engine/cuda-device.ts';
import { jsConvKernels } from '../shared/model/conv3d-cpu.ts';
import { decodeNpy } from '../shared/io/npy.ts';
import { createMed3dDeviceOps, deviceAct, DeviceTape } from '../shared/model/graph/device-ops.ts';
import { createMed3d, med3dFromTorch, med3dOptionsFromMetadata, med3dOutputFactor, type Med3dArchitecture, type Med3dOptions } from '../shared/model/med3d.ts';
import { med3dEncoderForward, med3dHeadForward } from '../shared/model/med3d-forward.ts';
import { DeviceTraining } from '../shared/model/device-training.ts';
import { OptimizerSpecSchema } from '../shared/model/optim.ts';
import { decodeSafetensors } from '../shared/tensors/safetensors.ts';
import { mulberry32 } from '../shared/util/random.ts';

const arg = (name: string) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const ROOT = process.cwd();
const addonPath = resolve(arg('--addon') ?? join(ROOT, 'native', 'build', 'Release', 'medfl_cuda.node'));
const STEPS = Number(arg('--steps') ?? 10);
const out = (line: string) => process.stdout.write(`${line}\n`);

function table(rows: (string | number)[][]): void {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => String(r[c]).length)));
  for (const [i, r] of rows.entries()) {
    out(`| ${r.map((v, c) => String(v).padEnd(widths[c])).join(' | ')} |`);
    if (i === 0) out(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  }
}

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};
function relErr(got: ArrayLike<number>, want: ArrayLike<number>, floor = 0): number {
  if (got.length !== want.length) return Number.POSITIVE_INFINITY;
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
  return d / Math.max(maxAbs(want), floor);
}

// --host: the same run on the host device (JS kernels), to try this script where there is no GPU (--sizes 16 keeps
// the timing part short there).
const HOST = process.argv.includes('--host');

function open(tf32: boolean): CudaDevice {
  if (HOST) {
    const info = { device: 'host (dry run)', computeCapability: '-', memoryBytes: 0, cudnn: '-', cudaRuntime: 0, cudaDriver: 0 };
    return { ...createHostDevice(jsConvKernels), info, synchronize: () => {} } as unknown as CudaDevice;
  }
  const r = loadCudaDevice({ tf32, addonPath });
  if ('reason' in r) {
    out(`cuda: ${r.reason}`);
    process.exit(2);
  }
  return r.device;
}

// ---------------------------------------------------------------- parity
const FIX = join(ROOT, 'test', 'fixtures', 'med3d-train');
const npy = (f: string) => decodeNpy(readFileSync(join(FIX, f)), f);
const toNdhwc = (a: { shape: readonly number[]; data: Float32Array }) => permute(a.data, a.shape, [0, 2, 3, 4, 1]).data;

function loadFixture(name: string) {
  const before = decodeSafetensors(readFileSync(join(FIX, `${name}.before.safetensors`)));
  const o = med3dOptionsFromMetadata(before.metadata)! as Med3dOptions;
  const input = npy('input.npy');
  const [, , D, H, W] = input.shape;
  const arch = createMed3d({ ...o, patch: [D, H, W] });
  const weights = med3dFromTorch(arch, before.bundle.values());
  const merge = (file: string) => {
    const m = new Map(before.bundle);
    for (const [k, t] of decodeSafetensors(readFileSync(join(FIX, file))).bundle) m.set(k, t);
    return med3dFromTorch(arch, m.values());
  };
  return { arch, weights, grads: merge(`${name}.grad.safetensors`), after: merge(`${name}.after.safetensors`), input, seg: npy(`${name}.seg.npy`), probe: npy(`${name}.probe.npy`) };
}

interface Check {
  name: string;
  worst: string;
  err: number;
  limit: number;
  ok: boolean;
}

function fixtureParity(dev: CudaDevice, name: string): Check[] {
  const fx = loadFixture(name);
  const arch = fx.arch;
  const values = new Map(arch.params().map((p) => [p.name, dev.upload(new Float32Array(fx.weights.get(p.name)!.data), true)]));
  const grads = new Map(
    arch
      .params()
      .filter((p) => p.trainable)
      .map((p) => {
        const g = dev.alloc(fx.weights.get(p.name)!.data.length, true);
        dev.fill(g, 0);
        return [p.name, g] as const;
      }),
  );
  const store = { value: (n: string) => values.get(n)!, shape: (n: string) => arch.params().find((p) => p.name === n)!.shape, grad: (n: string) => grads.get(n) };
  const tape = new DeviceTape<ReturnType<CudaDevice['alloc']>>();
  const ops = createMed3dDeviceOps({ device: dev, store, tape, training: true });
  const names = new Map(arch.params().map((p) => [p.name, p.name]));
  const [n, , D, H, W] = fx.input.shape;
  const x = deviceAct(dev.upload(fx.input.data), [n, D, H, W, 1], false);
  const o = med3dHeadForward(arch, names, med3dEncoderForward(arch, names, x, ops), ops);
  const checks: Check[] = [];
  const outErr = relErr(dev.download(o.buf), toNdhwc(fx.seg));
  checks.push({ name: `${name} output`, worst: 'seg', err: outErr, limit: 1e-4, ok: outErr < 1e-4 });
  tape.backward(o, dev.upload(toNdhwc(fx.probe)));
  const scale = Math.max(...[...fx.grads.values()].map((t) => maxAbs(t.data)));
  let worst = { name: '', err: 0 };
  let zeroFail = '';
  for (const p of arch.params()) {
    if (!p.trainable) continue;
    const got = dev.download(grads.get(p.name)!);
    const want = fx.grads.get(p.name)!.data;
    if (maxAbs(want) < 1e-5 * scale) {
      if (maxAbs(got) >= 1e-5 * scale) zeroFail = p.name;
      continue;
    }
    const err = relErr(got, want, 1e-4 * scale);
    if (err > worst.err) worst = { name: p.name, err };
  }
  checks.push({ name: `${name} every gradient`, worst: zeroFail ? `${zeroFail} (should be ~0)` : worst.name, err: worst.err, limit: 1e-3, ok: worst.err < 1e-3 && !zeroFail });
  let stats = { name: '', err: 0 };
  for (const p of arch.params()) {
    if (p.trainable) continue;
    const err = relErr(dev.download(values.get(p.name)!), fx.after.get(p.name)!.data);
    if (err > stats.err) stats = { name: p.name, err };
  }
  checks.push({ name: `${name} running statistics`, worst: stats.name, err: stats.err, limit: 1e-5, ok: stats.err < 1e-5 });
  dev.recycle();
  for (const b of [...values.values(), ...grads.values()]) dev.free(b);
  return checks;
}

function batchFor(arch: Med3dArchitecture, n: number, seed: number) {
  const rng = mulberry32(seed);
  const [d, h, w] = arch.patchShape;
  const image = Float32Array.from({ length: n * d * h * w * arch.config.inChannels }, () => 2 * rng() - 1);
  const voxels = (n * d * h * w) / med3dOutputFactor(arch.config.head) ** 3;
  const K = arch.numClasses;
  const target = new Float32Array(voxels * K);
  for (let v = 0; v < voxels; v++) target[v * K + Math.floor(rng() * K)] = 1;
  return { image, target, batchSize: n };
}

function stepParity(dev: CudaDevice, label: string, opts: Med3dOptions): Check[] {
  const arch = createMed3d(opts);
  const w0 = arch.init(4);
  // Plain SGD with lr 1: each weight moves by −g, so the moves compare the gradients (loss and backward included).
  const sgd = { optimizer: OptimizerSpecSchema.parse({ kind: 'sgd', momentum: 0 }), learningRate: 1 };
  const gpu = new DeviceTraining(dev, arch, w0, sgd);
  const cpu = new DeviceTraining(createHostDevice(jsConvKernels), arch, w0, sgd);
  const b = batchFor(arch, 2, 9);
  const lg = gpu.step(b);
  const lc = cpu.step(b);
  const wg = gpu.weights();
  const wc = cpu.weights();
  const moves = (t: typeof wg) => new Map(arch.params().map((p) => [p.name, t.get(p.name)!.data.map((v, i) => v - w0.get(p.name)!.data[i])]));
  const mg = moves(wg);
  const mc = moves(wc);
  const scale = Math.max(...[...mc.values()].map(maxAbs));
  let worst = { name: '', err: 0 };
  for (const p of arch.params()) {
    const err = relErr(mg.get(p.name)!, mc.get(p.name)!, 1e-3 * scale);
    if (err > worst.err) worst = { name: p.name, err };
  }
  gpu.close();
  cpu.close();
  const lossErr = Math.abs(lg - lc) / Math.abs(lc);
  return [
    { name: `${label}: loss`, worst: `${lg.toFixed(6)} vs ${lc.toFixed(6)}`, err: lossErr, limit: 1e-5, ok: lossErr < 1e-5 },
    { name: `${label}: every gradient (SGD move)`, worst: worst.name, err: worst.err, limit: 1e-3, ok: worst.err < 1e-3 },
  ];
}

/** The optimiser kernels against the host's on random tensors (Adam with decay, SGD with momentum, two steps each). */
function optimizerParity(dev: CudaDevice): Check[] {
  const host = createHostDevice(jsConvKernels);
  const rng = mulberry32(5);
  const n = 10_000;
  const rand = (s: number) => Float32Array.from({ length: n }, () => (2 * rng() - 1) * s);
  const [w, g1, g2] = [rand(0.1), rand(1e-2), rand(1e-3)];
  const res: Check[] = [];
  for (const kind of ['adam', 'sgd'] as const) {
    const hw = new Float32Array(w);
    const hm = new Float32Array(n);
    const hv = new Float32Array(n);
    const dw = dev.upload(w, true);
    const dm = dev.alloc(n, true);
    const dv = dev.alloc(n, true);
    dev.fill(dm, 0);
    dev.fill(dv, 0);
    for (const [t, g] of [g1, g2].entries()) {
      const dg = dev.upload(g);
      if (kind === 'adam') {
        const c1 = 1 - 0.9 ** (t + 1);
        const sqrtC2 = Math.sqrt(1 - 0.999 ** (t + 1));
        host.adamStep(hw, g, hm, hv, 1e-3 / c1, 0.9, 0.999, 1e-8, sqrtC2, 1e-4);
        dev.adamStep(dw, dg, dm, dv, 1e-3 / c1, 0.9, 0.999, 1e-8, sqrtC2, 1e-4);
      } else {
        host.sgdStep(hw, g, hm, 0.1, 0.9, 1e-4, t === 0 ? 1 : 0);
        dev.sgdStep(dw, dg, dm, 0.1, 0.9, 1e-4, t === 0 ? 1 : 0);
      }
    }
    const err = relErr(dev.download(dw), hw);
    res.push({ name: `${kind} kernel, 2 steps`, worst: 'w', err, limit: 1e-6, ok: err < 1e-6 });
    dev.recycle();
    for (const b of [dw, dm, dv]) dev.free(b);
  }
  return res;
}

// ---------------------------------------------------------------- timing
interface TimingConfig {
  name: string;
  depth: 10 | 18;
  shortcut: 'A' | 'B';
  size: number;
  batch: number;
}

const SIZES = (arg('--sizes') ?? '64,128').split(',').map(Number);
const TIMING: TimingConfig[] = SIZES.flatMap((size) => [
  { name: `R10 ${size}³`, depth: 10 as const, shortcut: 'B' as const, size, batch: 4 },
  { name: `R18 ${size}³`, depth: 18 as const, shortcut: 'A' as const, size, batch: 4 },
]);

function timeMedfl(dev: CudaDevice, c: TimingConfig): { ms: number; min: number } {
  const arch = createMed3d({ depth: c.depth, shortcut: c.shortcut, head: { kind: 'segmentation', numClasses: 2 }, patch: [c.size, c.size, c.size] } as Med3dOptions);
  const session = new DeviceTraining(dev, arch, arch.init(1), { learningRate: 1e-3 });
  const b = batchFor(arch, c.batch, 1);
  const times: number[] = [];
  for (let i = 0; i < 3 + STEPS; i++) {
    const t0 = performance.now();
    session.step(b);
    dev.synchronize();
    if (i >= 3) times.push(performance.now() - t0);
  }
  session.close();
  times.sort((a, b) => a - b);
  return { ms: times[Math.floor(times.length / 2)], min: times[0] };
}

function timeTorch(configs: TimingConfig[]): Map<string, { fp32: number; bf16: number }> {
  const script = join(ROOT, 'bench', 'py', 'med3d_gpu_step.py');
  const py = process.env.PYTHON ?? 'python3';
  const r = spawnSync(py, [script], { input: JSON.stringify(configs.map((c) => ({ ...c, steps: STEPS, warmup: 3 }))), encoding: 'utf8', maxBuffer: 1 << 24 });
  const res = new Map<string, { fp32: number; bf16: number }>();
  if (r.status !== 0) {
    out(`PyTorch timing failed: ${(r.stderr || r.stdout || `exit ${r.status}`).trim().split('\n').slice(-3).join(' / ')}`);
    return res;
  }
  for (const line of r.stdout.trim().split('\n')) {
    const j = JSON.parse(line) as { name: string; fp32_ms: number; bf16_ms: number };
    res.set(j.name, { fp32: j.fp32_ms, bf16: j.bf16_ms });
  }
  return res;
}

// ---------------------------------------------------------------- main
const exact = open(false);
const i = exact.info;
out(`device: ${i.device} (compute ${i.computeCapability}, ${(i.memoryBytes / 1024 ** 3).toFixed(0)} GiB), cuDNN ${i.cudnn}, CUDA runtime ${i.cudaRuntime}, driver ${i.cudaDriver}`);
out('\n## Parity (TF32 off): PyTorch float64 fixtures, then one training step and the optimiser kernels against the host engine\n');
const checks: Check[] = [];
for (const name of ['r10-A', 'r10-B', 'r18-A', 'r50-B']) {
  try {
    checks.push(...fixtureParity(exact, name));
  } catch (e) {
    checks.push({ name, worst: (e as Error).message.slice(0, 120), err: Number.NaN, limit: 0, ok: false });
  }
}
checks.push(...optimizerParity(exact));
const small = { widthMultiplier: 0.125, patch: [32, 32, 32] as const };
for (const [label, opts] of [
  ['R10-B BatchNorm seg head', { depth: 10, shortcut: 'B', head: { kind: 'segmentation', numClasses: 2 }, ...small }],
  ['R18-A GroupNorm U-Net 3 classes', { depth: 18, shortcut: 'A', norm: 'group', normGroups: 4, head: { kind: 'unet', numClasses: 3 }, ...small }],
] as const) {
  try {
    checks.push(...stepParity(exact, label, opts as unknown as Med3dOptions));
  } catch (e) {
    checks.push({ name: label, worst: (e as Error).message.slice(0, 120), err: Number.NaN, limit: 0, ok: false });
  }
}
table([['check', 'worst', 'rel. error', 'limit', 'result'], ...checks.map((c) => [c.name, c.worst, c.err.toExponential(2), c.limit.toExponential(0), c.ok ? 'pass' : 'FAIL'])]);

if (!process.argv.includes('--parity-only')) {
  out('\n## Step time, batch 4, full width, MedicalNet seg head, BatchNorm, Adam (median ms; TF32 convolutions on both sides)\n');
  const fast = open(true);
  const ours = new Map<string, { ms: number; min: number }>();
  for (const c of TIMING) {
    try {
      ours.set(c.name, timeMedfl(fast, c));
    } catch (e) {
      out(`${c.name}: MedFL failed: ${(e as Error).message}`);
    }
  }
  const torch = timeTorch(TIMING);
  const rows: (string | number)[][] = [['config', 'MedFL cuda fp32', 'PyTorch fp32', 'MedFL speed / PyTorch', 'PyTorch bf16 autocast']];
  for (const c of TIMING) {
    const m = ours.get(c.name);
    const t = torch.get(c.name);
    rows.push([c.name, m ? m.ms.toFixed(1) : '—', t ? t.fp32.toFixed(1) : '—', m && t ? (t.fp32 / m.ms).toFixed(2) : '—', t ? t.bf16.toFixed(1) : '—']);
  }
  table(rows);
}
const failed = checks.filter((c) => !c.ok).length;
out(`\n${checks.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
