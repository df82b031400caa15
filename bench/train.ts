/**
 * `npm run bench:train`: ms per Med3D training step (ResNet-10, batch 2, Adam, Dice + cross-entropy, through
 * Trainer.train() so batch sampling and the loss are included), median of several steps after warm-up, samples/s,
 * achieved GFLOP/s against this CPU's FP32 peak, the kernels used. Configurations:
 *   - MedicalNet's segmentation head with BatchNorm at ¼ and full width, inputs 1×32³ and 1×64³ ("seg"),
 *   - the recommended federated plan's network: ¼ width, GroupNorm (8 groups), the full-resolution U-Net head,
 *     inputs 1×32³ and 1×64³ ("unet").
 * When /usr/bin/python3 has torch (Debian python3-torch), the same network, batch and optimiser are timed in
 * PyTorch in the same run (bench/py/med3d_train_step.py, 2 threads), config by config right after ours, and the
 * ratio is printed.
 *
 *   npm run bench:train
 *   BENCH_CONFIGS=seg|unet|quarter|full|all BENCH_STEPS=5 npm run bench:train
 *   MEDFL_KERNELS=js npm run bench:train     # the pure-JS kernels (slow at full width: BENCH_CONFIGS=quarter)
 *   BENCH_ELEMENTWISE=js npm run bench:train  # oneDNN convolutions with the JS norms/ReLU/pool/add/concat
 *   BENCH_LOSS=both npm run bench:train       # also each config with the JS Dice + CE loss (A/B in the same run)
 *   BENCH_PYTORCH=0 npm run bench:train       # skip PyTorch
 *   BENCH_FMA_UNITS=1 npm run bench:train     # FMA units per core for the peak (default 2, see cpuPeak)
 *   npm run bench:train -- --breakdown        # instead: ms per op (forward / backward) per pass, no PyTorch
 *   npm run bench:train -- --breakdown --layers   # the same per layer (op and its parameter name), slowest first
 *
 * GFLOP/s counts the convolutions only (transposed ones included): 2 FLOPs per multiply-add, for the forward, the
 * weight gradient and the data gradient where the input needs one (never for the image). Norms, pooling, the
 * loss and the optimiser do well under 1 % of a step's FLOPs and are left out.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import Table from 'cli-table3';
import { loadavg } from 'node:os';
import { convMacs, torchConvGeom, type ConvKernels } from '../shared/engine/conv-kernels.ts';
import { selectConvKernels } from '../shared/engine/conv-select.ts';
import { elementwiseOf, jsElementwiseKernels, type ElementwiseKernels } from '../shared/engine/elementwise-kernels.ts';
import { createMed3dTrainOps, type Med3dTrainOps, type ParamStore } from '../shared/model/graph/med3d-ops.ts';
import { BufferPool } from '../shared/model/graph/pool.ts';
import { act, Tape } from '../shared/model/graph/tape.ts';
import { createMed3d, type Med3dArchitecture } from '../shared/model/med3d.ts';
import { med3dForward, type Med3dConvOptions, type Med3dGraphOps } from '../shared/model/med3d-forward.ts';
import { createMed3dTrainer } from '../shared/model/med3d-trainer.ts';
import type { VolumeCase } from '../shared/model/types.ts';
import { gaussian, mulberry32 } from '../shared/util/random.ts';
import type { NormLayer } from '../shared/model/layers/norm-layer.ts';

interface Config {
  name: string;
  depth: 10;
  shortcut: 'B';
  width: number;
  size: number;
  batch: number;
  warmup: number;
  steps: number;
  head: 'segmentation' | 'unet';
  norm: 'batch' | 'group';
}

const STEPS = Number(process.env.BENCH_STEPS ?? 5);
const which = process.env.BENCH_CONFIGS ?? 'all';
const configs: Config[] = [];
for (const width of [0.25, 1]) {
  if (which === 'unet' || (which === 'quarter' && width !== 0.25) || (which === 'full' && width !== 1)) continue;
  for (const size of [32, 64]) {
    const full = width === 1;
    configs.push({
      name: `R10 ${full ? 'full' : '¼'} ${size}³`, depth: 10, shortcut: 'B', width, size, batch: 2, warmup: full ? 1 : 2,
      steps: full && size === 64 ? Math.min(STEPS, 3) : STEPS, head: 'segmentation', norm: 'batch',
    });
  }
}
if (which === 'all' || which === 'unet' || which === 'quarter') {
  for (const size of [32, 64]) {
    configs.push({ name: `R10 ¼ unet GN ${size}³`, depth: 10, shortcut: 'B', width: 0.25, size, batch: 2, warmup: 2, steps: STEPS, head: 'unet', norm: 'group' });
  }
}

const archOf = (c: Config): Med3dArchitecture =>
  createMed3d({ depth: c.depth, shortcut: c.shortcut, widthMultiplier: c.width, head: { kind: c.head, numClasses: 2 }, norm: c.norm, patch: [c.size, c.size, c.size] });

function cases(size: number): VolumeCase[] {
  const rng = mulberry32(size);
  return Array.from({ length: 2 }, (_, k) => {
    const n = size ** 3;
    const image = new Float32Array(n);
    const label = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      label[i] = rng() > 0.8 ? 1 : 0;
      image[i] = label[i] + 0.7 * gaussian(rng);
    }
    return { id: `case-${k}`, shape: [size, size, size], image, label };
  });
}

const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];

/**
 * Convolution FLOPs of one training step (see the header), counted by running the graph on shapes only: the
 * same graph code as training, so every convolution the step runs is counted once with its real geometry.
 */
function stepConvFlops(arch: Med3dArchitecture, batch: number): number {
  type S = { readonly shape: readonly number[]; readonly grad: boolean };
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  let flops = 0;
  const count = (macs: number, inputGrad: boolean) => {
    flops += 2 * macs * (inputGrad ? 3 : 2);
  };
  const same = (x: S): S => ({ shape: x.shape, grad: true });
  const ops: Med3dGraphOps<S, string> = {
    shape: (x) => x.shape,
    conv3d(x, w, o: Med3dConvOptions) {
      const ws = shapes.get(w)!;
      const g = torchConvGeom(x.shape, ws[4], { k: [ws[0], ws[1], ws[2]], stride: o.stride ?? 1, dilation: o.dilation ?? 1, pad: o.pad ?? 0 });
      count(convMacs(g), x.grad);
      return { shape: [g.n, ...g.out, g.cout], grad: true };
    },
    convTranspose2x(x, w) {
      const [n, d, h, wd, cin] = x.shape;
      const cout = shapes.get(w)![3];
      count(n * d * h * wd * cin * cout * 8, x.grad);
      return { shape: [n, 2 * d, 2 * h, 2 * wd, cout], grad: true };
    },
    norm: same,
    relu: same,
    concat: (a, b) => ({ shape: [...a.shape.slice(0, 4), a.shape[4] + b.shape[4]], grad: true }),
    maxPool: (x) => ({ shape: [x.shape[0], ...x.shape.slice(1, 4).map((s) => Math.floor((s - 1) / 2) + 1), x.shape[4]], grad: true }),
    shortcutA: (x, outChannels, stride) => ({ shape: [x.shape[0], ...x.shape.slice(1, 4).map((s) => Math.floor((s - 1) / stride) + 1), outChannels], grad: true }),
    add: same,
    classifier: (x) => ({ shape: [x.shape[0], arch.numClasses], grad: true }),
  };
  med3dForward(arch, new Map(arch.params().map((p) => [p.name, p.name])), { shape: [batch, ...arch.patchShape, 1], grad: false }, ops);
  return flops;
}

/**
 * FP32 peak of this machine from /proc/cpuinfo: logical processors × "cpu MHz" × FP32 lanes per vector (16 with
 * avx512f, 8 with avx/avx2, 4 with SSE) × 2 FLOPs per lane when the fma flag is there × FMA units per core. The
 * unit count is not in /proc/cpuinfo: 2 (Intel Xeon Scalable since Skylake-SP, AMD Zen 4 issues two 256-bit
 * halves) unless BENCH_FMA_UNITS says otherwise. "cpu MHz" is what the kernel reports (the nominal clock in
 * a VM); turbo clocks above it would make the real peak higher.
 */
function cpuPeak(cpuinfo: string, fmaUnits: number): { gflops: number; how: string } | undefined {
  const procs = (cpuinfo.match(/^processor\s*:/gm) ?? []).length;
  const mhz = Number(/^cpu MHz\s*:\s*([\d.]+)/m.exec(cpuinfo)?.[1]);
  const flagLine = /^flags\s*:(.*)$/m.exec(cpuinfo);
  if (!procs || !Number.isFinite(mhz) || !flagLine) return undefined;
  const flags = new Set(flagLine[1].trim().split(/\s+/));
  const [lanes, isa] = flags.has('avx512f') ? [16, 'avx512f'] : flags.has('avx2') || flags.has('avx') ? [8, flags.has('avx2') ? 'avx2' : 'avx'] : [4, 'sse'];
  const perLane = flags.has('fma') ? 2 : 1;
  const gflops = (procs * mhz * lanes * perLane * fmaUnits) / 1000;
  return { gflops, how: `${procs} cores × ${mhz.toFixed(0)} MHz × ${lanes} FP32 lanes (${isa}) × ${perLane} (${perLane === 2 ? 'fma' : 'no fma'}) × ${fmaUnits} FMA units` };
}

async function ours(c: Config, kernels: ConvKernels): Promise<{ median: number; min: number; cpu: number }> {
  const arch = archOf(c);
  const trainer = createMed3dTrainer(arch, kernels);
  const times: number[] = [];
  const cpus: number[] = [];
  let last = performance.now();
  let lastCpu = process.cpuUsage();
  await trainer.train({
    weights: arch.init(1),
    cases: cases(c.size),
    steps: c.warmup + c.steps,
    batchSize: c.batch,
    learningRate: 1e-3,
    seed: 1,
    onStep: (step) => {
      const now = performance.now();
      const cpu = process.cpuUsage();
      if (step >= c.warmup) {
        times.push(now - last);
        cpus.push((cpu.user - lastCpu.user + cpu.system - lastCpu.system) / 1000);
      }
      last = now;
      lastCpu = cpu;
    },
  });
  return { median: median(times), min: Math.min(...times), cpu: median(cpus) };
}

interface TorchResult {
  median_ms: number;
  cpu_ms: number;
  threads: number;
}

function pytorch(list: Config[]): Map<string, TorchResult> | string {
  if (process.env.BENCH_PYTORCH === '0') return 'PyTorch skipped (BENCH_PYTORCH=0)';
  const probe = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'PyTorch not timed: /usr/bin/python3 has no torch (apt-get install python3-torch)';
  const script = fileURLToPath(new URL('./py/med3d_train_step.py', import.meta.url));
  const r = spawnSync('/usr/bin/python3', [script], { input: JSON.stringify(list), encoding: 'utf8', maxBuffer: 1 << 24 });
  if (r.status !== 0) return `PyTorch run failed: ${r.stderr.trim().split('\n').pop()}`;
  return new Map(r.stdout.trim().split('\n').map((l) => JSON.parse(l) as TorchResult & { name: string }).map((o) => [o.name, o]));
}

/**
 * ms per pass spent in each graph op, forward and backward (the backward closures the op recorded), over
 * `steps` forward + backward passes after one warm-up (no loss, no optimiser), with a buffer pool as in training.
 */
/** The breakdown's column of a norm op: BatchNorm with and without its fused ReLU, group/instance norm together. */
const normColumn = (layer: NormLayer, relu: boolean): string => (layer.runningStatistics ? (relu ? 'batchNormRelu' : 'batchNorm') : 'groupNorm');

function breakdown(c: Config, kernels: ConvKernels, steps: number, byLayer = false): { fwd: Map<string, number>; bwd: Map<string, number>; total: number } {
  const arch = archOf(c);
  const w = arch.init(1);
  const values = new Map(arch.params().map((p) => [p.name, new Float32Array(w.get(p.name)!.data)]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: (n) => shapes.get(n)!, grad: (n) => grads.get(n) };
  const params = new Map(arch.params().map((p) => [p.name, p.name]));
  const image = cases(c.size);
  const x = act(new Float32Array(c.batch * c.size ** 3).map((_, i) => image[i % 2].image[i % c.size ** 3]), [c.batch, c.size, c.size, c.size, 1], false);
  const fwd = new Map<string, number>();
  const bwd = new Map<string, number>();
  const add = (m: Map<string, number>, k: string, v: number) => m.set(k, (m.get(k) ?? 0) + v);
  let total = 0;
  const pool = new BufferPool();
  for (let it = 0; it <= steps; it++) {
    const timed = it > 0;
    const t0 = performance.now();
    pool.recycle();
    const tape = new Tape();
    let current = '';
    const record = tape.record.bind(tape);
    tape.record = (fn) => {
      const name = current;
      record(() => {
        const t = performance.now();
        fn();
        if (timed) add(bwd, name, performance.now() - t);
      });
    };
    const ops = createMed3dTrainOps({ kernels, store, tape, training: true, pool }) as unknown as Record<string, unknown>;
    for (const [k, f] of Object.entries(ops)) {
      if (k === 'shape' || typeof f !== 'function') continue;
      ops[k] = (...a: unknown[]) => {
        const t = performance.now();
        // Set per call, right before the op records its backward step.
        const op = k === 'norm' ? normColumn(a[1] as NormLayer, a[4] === true) : k;
        const layer = typeof a[1] === 'string' ? a[1].replace(/\.weight$/, '') : k === 'norm' ? String((a[2] as (s: string) => string)('weight')).replace(/\.weight$/, '') : '';
        current = byLayer ? `${op} ${layer}` : op;
        const r = (f as (...a: unknown[]) => unknown)(...a);
        if (timed) add(fwd, current, performance.now() - t);
        return r;
      };
    }
    const typed = ops as unknown as Med3dTrainOps;
    const out = med3dForward(arch, params, x, typed);
    tape.backward(out, Float32Array.from(out.data, (_, i) => ((i * 7919) % 1000) / 1000 - 0.5));
    if (timed) total += performance.now() - t0;
  }
  const per = (m: Map<string, number>) => new Map([...m].map(([k, v]) => [k, v / steps]));
  return { fwd: per(fwd), bwd: per(bwd), total: total / steps };
}

const sel = await selectConvKernels();
const kernels: ConvKernels = process.env.BENCH_ELEMENTWISE === 'js' ? ({ ...sel.kernels, elementwise: jsElementwiseKernels } as ConvKernels) : sel.kernels;
let cpuinfo = '';
try {
  cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
} catch {
  // no /proc: no peak figure
}
/** The same element-wise kernels with the JS segmentation loss (the loss before it moved into the addon). */
function withJsLoss(ew: ElementwiseKernels): ElementwiseKernels {
  return { ...ew, segmentationLoss: (z, t, C, w) => jsElementwiseKernels.segmentationLoss(z, t, C, w), withAlloc: (a) => withJsLossAlloc(ew, a) };
}
function withJsLossAlloc(ew: ElementwiseKernels, a: (n: number) => Float32Array): ElementwiseKernels {
  const js = jsElementwiseKernels.withAlloc(a);
  return { ...ew.withAlloc(a), segmentationLoss: (z, t, C, w) => js.segmentationLoss(z, t, C, w), withAlloc: (b) => withJsLossAlloc(ew, b) };
}
const jsLossKernels = { ...kernels, elementwise: withJsLoss(elementwiseOf(kernels)) } as ConvKernels;
const lossAB = process.env.BENCH_LOSS === 'both';

const peak = cpuPeak(cpuinfo, Number(process.env.BENCH_FMA_UNITS ?? 2));
const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? 'unknown CPU';
process.stdout.write(
  `kernels: ${sel.kernels.name} (${sel.tried.map((t) => `${t.name}: ${t.ok ? 'ok' : t.reason}`).join('; ')}), elementwise: ${elementwiseOf(kernels).name}; ` +
    `load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}\n` +
    `CPU: ${model}; FP32 peak ${peak ? `${peak.gflops.toFixed(1)} GFLOP/s = ${peak.how}` : 'unknown (no /proc/cpuinfo)'}\n`,
);
const flopsOf = new Map(configs.map((c) => [c.name, stepConvFlops(archOf(c), c.batch)]));
const gf = (c: Config, ms: number) => {
  const g = flopsOf.get(c.name)! / ms / 1e6;
  return `${g.toFixed(1)}${peak ? ` (${((100 * g) / peak.gflops).toFixed(0)} %)` : ''}`;
};

if (process.argv.includes('--breakdown') && process.argv.includes('--layers')) {
  for (const c of configs) {
    const r = breakdown(c, kernels, c.steps, true);
    const rows = [...new Set([...r.fwd.keys(), ...r.bwd.keys()])].map((k) => [k, r.fwd.get(k) ?? 0, r.bwd.get(k) ?? 0] as const);
    rows.sort((a, b) => b[1] + b[2] - (a[1] + a[2]));
    const lt = new Table({ head: [`${c.name} (fwd+bwd ${r.total.toFixed(1)} ms)`, 'fwd ms', 'bwd ms'] });
    for (const [k, f, b] of rows) lt.push([k, f.toFixed(2), b.toFixed(2)]);
    process.stdout.write(`${lt.toString()}\n`);
  }
  process.exit(0);
}
if (process.argv.includes('--breakdown')) {
  const COLS: [string, string][] = [
    ['conv3d', 'conv'], ['convTranspose2x', 'convT'], ['batchNorm', 'bn'], ['batchNormRelu', 'bn+relu'], ['groupNorm', 'gn(+relu)'],
    ['concat', 'concat'], ['relu', 'relu'], ['maxPool', 'pool'], ['add', 'add'], ['addRelu', 'add+relu'],
  ];
  const rows = configs.map((c) => ({ c, r: breakdown(c, kernels, c.steps) }));
  const cols = COLS.filter(([k]) => rows.some(({ r }) => r.fwd.has(k) || r.bwd.has(k)));
  const bt = new Table({ head: ['config', 'fwd+bwd', 'conv GFLOP/s', ...cols.map(([, h]) => h)] });
  for (const { c, r } of rows) {
    const cell = (k: string) => (r.fwd.has(k) || r.bwd.has(k) ? `${(r.fwd.get(k) ?? 0).toFixed(1)} / ${(r.bwd.get(k) ?? 0).toFixed(1)}` : '—');
    bt.push([c.name, r.total.toFixed(1), gf(c, r.total), ...cols.map(([k]) => cell(k))]);
  }
  process.stdout.write(
    `${bt.toString()}\nms per forward + backward pass (no loss, no optimiser): total, then forward / backward per op; mean of ` +
      `${STEPS} passes (3 at full width 64³) after one warm-up; backward includes the gradient sums into shared inputs; ` +
      'GFLOP/s: the step\'s convolution FLOPs over the pass (% of the FP32 peak).\n',
  );
  process.exit(0);
}
const table = new Table({
  head: ['config', 'MedFL ms/step', 'samples/s', 'GFLOP/s (% peak)', 'PyTorch ms/step', 'PyTorch GFLOP/s', 'MedFL / PyTorch', 'CPU ms/step MedFL / PyTorch'],
});
// Interleaved per config: ours, then PyTorch on the same config, so machine noise hits both alike.
for (const c of configs) {
  const o = await ours(c, kernels);
  const pt = pytorch([c]);
  const p = typeof pt === 'string' ? undefined : pt.get(c.name);
  table.push([
    c.name, o.median.toFixed(1), ((c.batch * 1000) / o.median).toFixed(2), gf(c, o.median),
    p ? p.median_ms.toFixed(1) : '—', p ? gf(c, p.median_ms) : '—', p ? `${(o.median / p.median_ms).toFixed(2)}×` : typeof pt === 'string' ? pt : '—',
    p ? `${o.cpu.toFixed(0)} / ${p.cpu_ms.toFixed(0)} = ${(o.cpu / p.cpu_ms).toFixed(2)}×` : o.cpu.toFixed(0),
  ]);
  if (lossAB) {
    const j = await ours(c, jsLossKernels);
    table.push([`${c.name}, JS loss`, j.median.toFixed(1), ((c.batch * 1000) / j.median).toFixed(2), gf(c, j.median), '', '', `${(o.median / j.median).toFixed(2)}× (addon / JS loss)`, `${o.cpu.toFixed(0)} / ${j.cpu.toFixed(0)} = ${(o.cpu / j.cpu).toFixed(2)}×`]);
    process.stdout.write(`${c.name} with the JS loss: ${j.median.toFixed(1)} ms (CPU ${j.cpu.toFixed(0)} ms); load ${loadavg()[0].toFixed(2)}\n`);
  }
  process.stdout.write(`${c.name}: ${o.median.toFixed(1)} ms (min ${o.min.toFixed(1)}, CPU ${o.cpu.toFixed(0)} ms)${p ? `, PyTorch ${p.median_ms.toFixed(1)} ms (CPU ${p.cpu_ms.toFixed(0)} ms)` : ''}; load ${loadavg()[0].toFixed(2)}\n`);
}
process.stdout.write(
  `${table.toString()}\nbatch 2, Adam, medians of ${STEPS} steps after warm-up (3 at full width 64³); PyTorch with ${process.env.BENCH_THREADS ?? 2} threads; ` +
    'CPU ms/step: the process\'s CPU time (all threads) per step, which moves much less than wall time when other work shares the cores; ' +
    `conv GFLOP/s per step: ${configs.map((c) => `${c.name} ${(flopsOf.get(c.name)! / 1e9).toFixed(2)} GFLOP`).join(', ')}.\n`,
);
