/**
 * `npm run bench:train`: ms per Med3D training step (ResNet-10 + MedicalNet's segmentation head, batch 2,
 * Adam, Dice + cross-entropy, through Trainer.train() so batch sampling is included), at full and ¼ width,
 * inputs 1×32³ and 1×64³: median of several steps after warm-up, samples/s, the kernels used. When
 * /usr/bin/python3 has torch (Debian python3-torch), the same network, batch and optimiser are timed in
 * PyTorch in the same run (bench/py/med3d_train_step.py, 2 threads) and the ratio is printed.
 *
 *   npm run bench:train
 *   MEDFL_KERNELS=js npm run bench:train     # the pure-JS kernels (slow at full width: BENCH_CONFIGS=quarter)
 *   BENCH_CONFIGS=quarter|full|all BENCH_STEPS=5 npm run bench:train
 *   BENCH_ELEMENTWISE=js npm run bench:train  # oneDNN convolutions with the JS BatchNorm/ReLU/pool/add
 *   npm run bench:train -- --breakdown        # also ms per op (forward / backward) per step, no PyTorch
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import Table from 'cli-table3';
import { loadavg } from 'node:os';
import type { ConvKernels } from '../shared/engine/conv-kernels.ts';
import { selectConvKernels } from '../shared/engine/conv-select.ts';
import { elementwiseOf, jsElementwiseKernels } from '../shared/engine/elementwise-kernels.ts';
import { createMed3dTrainOps, type Med3dTrainOps, type ParamStore } from '../shared/model/graph/med3d-ops.ts';
import { act, Tape } from '../shared/model/graph/tape.ts';
import { createMed3d } from '../shared/model/med3d.ts';
import { med3dEncoderForward, med3dHeadForward } from '../shared/model/med3d-forward.ts';
import { createMed3dTrainer } from '../shared/model/med3d-trainer.ts';
import type { VolumeCase } from '../shared/model/types.ts';
import { gaussian, mulberry32 } from '../shared/util/random.ts';

interface Config {
  name: string;
  depth: 10;
  shortcut: 'B';
  width: number;
  size: number;
  batch: number;
  warmup: number;
  steps: number;
}

const STEPS = Number(process.env.BENCH_STEPS ?? 5);
const which = process.env.BENCH_CONFIGS ?? 'all';
const configs: Config[] = [];
for (const width of [0.25, 1]) {
  if (which === 'quarter' && width !== 0.25) continue;
  if (which === 'full' && width !== 1) continue;
  for (const size of [32, 64]) {
    const full = width === 1;
    configs.push({ name: `R10 ${full ? 'full' : '¼'} ${size}³`, depth: 10, shortcut: 'B', width, size, batch: 2, warmup: full ? 1 : 2, steps: full && size === 64 ? Math.min(STEPS, 3) : STEPS });
  }
}

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

async function ours(c: Config, kernels: Awaited<ReturnType<typeof selectConvKernels>>['kernels']): Promise<{ median: number; min: number }> {
  const arch = createMed3d({ depth: c.depth, shortcut: c.shortcut, widthMultiplier: c.width, head: { kind: 'segmentation', numClasses: 2 }, patch: [c.size, c.size, c.size] });
  const trainer = createMed3dTrainer(arch, kernels);
  const times: number[] = [];
  let last = performance.now();
  await trainer.train({
    weights: arch.init(1),
    cases: cases(c.size),
    steps: c.warmup + c.steps,
    batchSize: c.batch,
    learningRate: 1e-3,
    seed: 1,
    onStep: (step) => {
      const now = performance.now();
      if (step >= c.warmup) times.push(now - last);
      last = now;
    },
  });
  return { median: median(times), min: Math.min(...times) };
}

function pytorch(list: Config[]): Map<string, { median_ms: number; threads: number }> | string {
  const probe = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'PyTorch not timed: /usr/bin/python3 has no torch (apt-get install python3-torch)';
  const script = fileURLToPath(new URL('./py/med3d_train_step.py', import.meta.url));
  const r = spawnSync('/usr/bin/python3', [script], { input: JSON.stringify(list), encoding: 'utf8', maxBuffer: 1 << 24 });
  if (r.status !== 0) return `PyTorch run failed: ${r.stderr.trim().split('\n').pop()}`;
  return new Map(r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { name: string; median_ms: number; threads: number }).map((o) => [o.name, o]));
}

/**
 * ms per step spent in each graph op, forward and backward (the backward closures the op recorded), over
 * `steps` forward + backward passes of the segmentation net after one warm-up (no loss, no optimiser).
 */
function breakdown(c: Config, kernels: ConvKernels, steps: number): { fwd: Map<string, number>; bwd: Map<string, number>; total: number } {
  const arch = createMed3d({ depth: c.depth, shortcut: c.shortcut, widthMultiplier: c.width, head: { kind: 'segmentation', numClasses: 2 }, patch: [c.size, c.size, c.size] });
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
  for (let it = 0; it <= steps; it++) {
    const timed = it > 0;
    const t0 = performance.now();
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
    const ops = createMed3dTrainOps({ kernels, store, tape, training: true }) as unknown as Record<string, unknown>;
    for (const [k, f] of Object.entries(ops)) {
      if (k === 'shape' || typeof f !== 'function') continue;
      ops[k] = (...a: unknown[]) => {
        current = k;
        const t = performance.now();
        const r = (f as (...a: unknown[]) => unknown)(...a);
        if (timed) add(fwd, k, performance.now() - t);
        return r;
      };
    }
    const typed = ops as unknown as Med3dTrainOps;
    const out = med3dHeadForward(arch, params, med3dEncoderForward(arch, params, x, typed), typed);
    tape.backward(out, Float32Array.from(out.data, (_, i) => ((i * 7919) % 1000) / 1000 - 0.5));
    if (timed) total += performance.now() - t0;
  }
  const per = (m: Map<string, number>) => new Map([...m].map(([k, v]) => [k, v / steps]));
  return { fwd: per(fwd), bwd: per(bwd), total: total / steps };
}

const sel = await selectConvKernels();
const kernels: ConvKernels = process.env.BENCH_ELEMENTWISE === 'js' ? { ...sel.kernels, elementwise: jsElementwiseKernels } as ConvKernels : sel.kernels;
process.stdout.write(
  `kernels: ${sel.kernels.name} (${sel.tried.map((t) => `${t.name}: ${t.ok ? 'ok' : t.reason}`).join('; ')}), elementwise: ${elementwiseOf(kernels).name}; ` +
    `load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}\n`,
);
if (process.argv.includes('--breakdown')) {
  const COLS: [string, string][] = [['conv3d', 'conv'], ['convTranspose2x', 'convT'], ['batchNorm', 'bn'], ['batchNormRelu', 'bn+relu'], ['relu', 'relu'], ['maxPool', 'pool'], ['add', 'add'], ['addRelu', 'add+relu']];
  const bt = new Table({ head: ['config', 'fwd+bwd', ...COLS.map(([, h]) => h)] });
  for (const c of configs) {
    const r = breakdown(c, kernels, c.steps);
    const cell = (k: string) => (r.fwd.has(k) || r.bwd.has(k) ? `${(r.fwd.get(k) ?? 0).toFixed(1)} / ${(r.bwd.get(k) ?? 0).toFixed(1)}` : '—');
    bt.push([c.name, r.total.toFixed(1), ...COLS.map(([k]) => cell(k))]);
  }
  process.stdout.write(
    `${bt.toString()}\nms per forward + backward pass (no loss, no optimiser): total, then forward / backward per op; mean of ` +
      `${STEPS} passes (3 at full width 64³) after one warm-up; backward includes the gradient sums into shared inputs.\n`,
  );
  process.exit(0);
}
const table = new Table({ head: ['config', 'MedFL ms/step', 'samples/s', 'PyTorch ms/step', 'MedFL / PyTorch'] });
// Interleaved per config: ours, then PyTorch on the same config, so machine noise hits both alike.
for (const c of configs) {
  const o = await ours(c, kernels);
  const pt = pytorch([c]);
  const p = typeof pt === 'string' ? undefined : pt.get(c.name);
  table.push([c.name, o.median.toFixed(1), ((c.batch * 1000) / o.median).toFixed(2), p ? p.median_ms.toFixed(1) : '—', p ? `${(o.median / p.median_ms).toFixed(2)}×` : typeof pt === 'string' ? pt : '—']);
  process.stdout.write(`${c.name}: ${o.median.toFixed(1)} ms (min ${o.min.toFixed(1)})${p ? `, PyTorch ${p.median_ms.toFixed(1)} ms` : ''}\n`);
}
process.stdout.write(`${table.toString()}\nbatch 2, Adam, medians of ${STEPS} steps after warm-up; PyTorch with ${process.env.BENCH_THREADS ?? 2} threads.\n`);
