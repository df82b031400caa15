/**
 * Convolution kernels on MedicalNet ResNet-10 layer shapes (batch 2, width 1 and ¼): median ms and GFLOP/s
 * of forward, backward-data and backward-filter for the "onednn" kernels, next to the same convolution in
 * PyTorch (same oneDNN underneath on Debian) when `/usr/bin/python3 -c 'import torch'` works.
 *
 *   npm run bench:conv                      # ~1–2 min on the 2-core VM
 *   npm run bench:conv -- --quick           # width ¼ only
 *   npm run bench:conv -- --layouts         # also: each memory-format choice (plain / any-weights / any / ncsp)
 *   npm run bench:conv -- --threads=1       # both sides on one thread (steadier when another process is busy)
 *   npm run bench:conv -- --min             # fastest repetition instead of the median (a loaded machine)
 *   BENCH_TORCH_LAYOUT=channels_last_3d npm run bench:conv   # PyTorch layout (default: contiguous NCDHW)
 *
 * Both sides use 2 threads (--threads=N). PyTorch calls aten::convolution_backward with an output mask, so each gradient
 * is timed alone. The machine is shared: compare rows of one run only.
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { loadavg } from 'node:os';
import { createInterface } from 'node:readline';
import { convMacs, inputLength, outputLength, torchConvGeom, weightLength, type Conv3dGeom } from '../shared/engine/conv-kernels.ts';
import { loadOneDnnKernels, type OneDnnKernels, type OneDnnLayout } from '../shared/engine/onednn-kernels.ts';

const args = new Set(process.argv.slice(2));
const QUICK = args.has('--quick');
const LAYOUTS = args.has('--layouts');
/** --min: report the fastest repetition instead of the median (closer to the uncontended figure on a loaded machine). */
const STAT = args.has('--min') ? 'min' : 'median';
/** --threads=N: threads for both oneDNN and PyTorch (default 2, the machine's cores). With another busy
 * process on the machine, 2 OpenMP threads wait on each other at every barrier (ms-long stalls) while 1
 * thread runs steadily on the free core: --threads=1 then gives the cleaner comparison. */
const THREADS = Number([...args].find((a) => a.startsWith('--threads='))?.slice('--threads='.length) ?? 2);
const TORCH_LAYOUT = process.env.BENCH_TORCH_LAYOUT === 'channels_last_3d' ? 'channels_last_3d' : 'contiguous';
const MAX_REPS = 7;
const BUDGET_MS = 700; // per (shape, op, engine): stop repeating once this much time was spent (at least 3 reps)

interface Shape {
  readonly name: string;
  readonly g: Conv3dGeom;
  readonly pad: number;
}

function shapes(width: number): Shape[] {
  const c = Math.round(64 * width);
  const s = (name: string, size: number, cin: number, cout: number, k: number, stride: number, dilation: number, pad: number): Shape => ({
    name: `w${width === 1 ? '1' : '¼'} ${name}`,
    g: torchConvGeom([2, size, size, size, cin], cout, { k, stride, dilation, pad }),
    pad,
  });
  return [
    s(`conv1 1→${c} k7s2 32³`, 32, 1, c, 7, 2, 1, 3),
    s(`conv1 1→${c} k7s2 64³`, 64, 1, c, 7, 2, 1, 3),
    s(`layer1 ${c}→${c} k3 16³`, 16, c, c, 3, 1, 1, 1),
    s(`layer2 ${c}→${2 * c} k3s2 16³`, 16, c, 2 * c, 3, 2, 1, 1),
    s(`layer2 down ${c}→${2 * c} k1s2 16³`, 16, c, 2 * c, 1, 2, 1, 0),
    s(`layer3 ${4 * c}→${4 * c} k3d2 8³`, 8, 4 * c, 4 * c, 3, 1, 2, 2),
    s(`layer4 ${8 * c}→${8 * c} k3d4 4³`, 4, 8 * c, 8 * c, 3, 1, 4, 4),
    s(`layer4 ${8 * c}→${8 * c} k3d4 8³`, 8, 8 * c, 8 * c, 3, 1, 4, 4),
  ];
}

const OPS = ['fwd', 'bwdData', 'bwdFilter'] as const;
type OpName = (typeof OPS)[number];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function timeIt(fn: () => unknown): number {
  fn(); // warm-up: builds and caches the primitive
  const times: number[] = [];
  let spent = 0;
  while (times.length < MAX_REPS && (times.length < 3 || spent < BUDGET_MS)) {
    const t0 = performance.now();
    fn();
    const ms = performance.now() - t0;
    times.push(ms);
    spent += ms;
  }
  return STAT === 'min' ? Math.min(...times) : median(times);
}

function randomArray(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() * 2 - 1;
  return a;
}

function benchOneDnn(k: OneDnnKernels, g: Conv3dGeom): Record<OpName, number> {
  const x = randomArray(inputLength(g));
  const w = randomArray(weightLength(g));
  const dy = randomArray(outputLength(g));
  return {
    fwd: timeIt(() => k.conv3d(x, w, g)),
    bwdData: timeIt(() => k.conv3dBackwardData(dy, w, g)),
    bwdFilter: timeIt(() => k.conv3dBackwardFilter(x, dy, g)),
  };
}

// A persistent PyTorch process: one JSON request per line on stdin, one JSON answer per line on stdout,
// so that each shape runs in PyTorch right after it ran here (the machine's load drifts).
const PY = `
import json, sys, time, statistics
import torch
torch.set_num_threads(int(sys.argv[2]))
def timeit(fn, max_reps, budget_ms):
    fn()
    times, spent = [], 0.0
    while len(times) < max_reps and (len(times) < 3 or spent < budget_ms):
        t0 = time.perf_counter(); fn(); ms = (time.perf_counter() - t0) * 1e3
        times.append(ms); spent += ms
    return min(times) if sys.argv[1] == "min" else statistics.median(times)
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    layout = torch.channels_last_3d if req["layout"] == "channels_last_3d" else torch.contiguous_format
    n, d, h, w_, cin, cout, k, st, dil, pad, od, oh, ow = req["shape"]
    with torch.no_grad():
        x = torch.randn(n, cin, d, h, w_).contiguous(memory_format=layout)
        w = torch.randn(cout, cin, k, k, k).contiguous(memory_format=layout)
        dy = torch.randn(n, cout, od, oh, ow).contiguous(memory_format=layout)
        S, P, D = [st] * 3, [pad] * 3, [dil] * 3
        fwd = lambda: torch.nn.functional.conv3d(x, w, None, S, P, D)
        bd = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, S, P, D, False, [0, 0, 0], 1, [True, False, False])
        bf = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, S, P, D, False, [0, 0, 0], 1, [False, True, False])
        r = {op: timeit(fn, req["maxReps"], req["budgetMs"]) for op, fn in (("fwd", fwd), ("bwdData", bd), ("bwdFilter", bf))}
    print(json.dumps(r), flush=True)
`;

interface TorchInfo {
  torch: string;
  threads: number;
  mkldnn: boolean;
}

class TorchBench {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly lines: AsyncIterator<string>;
  private constructor(child: ChildProcessWithoutNullStreams) {
    this.child = child;
    this.lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }
  static async start(): Promise<{ bench: TorchBench; info: TorchInfo } | string> {
    const probe = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' });
    if (probe.status !== 0) return 'PyTorch not available (/usr/bin/python3 -c "import torch" failed)';
    const bench = new TorchBench(spawn('/usr/bin/python3', ['-c', PY, STAT, String(THREADS)]));
    const first = await bench.lines.next();
    if (first.done) return 'PyTorch bench process exited at start';
    return { bench, info: JSON.parse(first.value) as TorchInfo };
  }
  async run({ g, pad }: Shape): Promise<Record<OpName, number>> {
    const shape = [g.n, ...g.in, g.cin, g.cout, g.k[0], g.stride[0], g.dilation[0], pad, ...g.out];
    this.child.stdin.write(JSON.stringify({ layout: TORCH_LAYOUT, maxReps: MAX_REPS, budgetMs: BUDGET_MS, shape }) + '\n');
    const line = await this.lines.next();
    if (line.done) throw new Error('PyTorch bench process exited');
    return JSON.parse(line.value) as Record<OpName, number>;
  }
  stop(): void {
    this.child.stdin.end();
  }
}

const gflops = (g: Conv3dGeom, ms: number): number => (2 * convMacs(g)) / (ms * 1e6);
const pad = (s: string, n: number): string => s.padStart(n);
const fmt = (ms: number): string => (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2));

async function main(): Promise<void> {
  const loaded = loadOneDnnKernels({ layout: 'default', threads: THREADS });
  if (!loaded.kernels) {
    console.error(`onednn kernels unavailable: ${loaded.reason}`);
    process.exit(1);
  }
  const k = loaded.kernels;
  const list = QUICK ? shapes(0.25) : [...shapes(0.25), ...shapes(1)];
  console.log(
    `conv-kernels bench: ${list.length} MedicalNet ResNet-10 shapes, batch 2; loadavg ${loadavg().map((l) => l.toFixed(2)).join(' ')}; ` +
      `oneDNN ${loaded.info.version} (${loaded.info.runtime}, ${loaded.info.isa}, ${loaded.info.threads} threads), default layout, outputs allocated in JS; ${STAT} of up to ${MAX_REPS} runs`,
  );
  const t0 = performance.now();
  const torch = await TorchBench.start();
  const ours: Record<OpName, number>[] = [];
  const theirs: (Record<OpName, number> | undefined)[] = [];
  let tOurs = 0;
  for (const s of list) {
    const t = performance.now();
    ours.push(benchOneDnn(k, s.g));
    tOurs += performance.now() - t;
    theirs.push(typeof torch === 'string' ? undefined : await torch.bench.run(s));
  }
  if (typeof torch !== 'string') torch.bench.stop();
  const tTorch = performance.now() - t0 - tOurs;
  const torchNote =
    typeof torch === 'string' ? torch : `PyTorch ${torch.info.torch} (${torch.info.threads} threads, mkldnn ${torch.info.mkldnn}, ${TORCH_LAYOUT} layout)`;
  console.log(`comparison: ${torchNote}, each shape right after ours; ratio = PyTorch ms / onednn ms (> 1: onednn faster)\n`);

  const header = [pad('shape', 36), pad('GFLOP', 6)];
  for (const op of OPS) header.push(pad(`${op} ms`, 12), pad('GF/s', 5), pad('torch ms', 9), pad('ratio', 5));
  console.log(header.join(' '));
  list.forEach((s, i) => {
    const row = [pad(s.name, 36), pad(((2 * convMacs(s.g)) / 1e9).toFixed(2), 6)];
    for (const op of OPS) {
      const ms = ours[i][op];
      const t = theirs[i]?.[op];
      row.push(pad(fmt(ms), 12), pad(gflops(s.g, ms).toFixed(0), 5), pad(t === undefined ? '-' : fmt(t), 9), pad(t === undefined ? '-' : (t / ms).toFixed(2), 5));
    }
    console.log(row.join(' '));
  });
  console.log(`\nimplementations (default layout):`);
  for (const s of list) console.log(`  ${s.name}: ${OPS.map((op, j) => `${op} ${k.impl((['forward', 'backwardData', 'backwardFilter'] as const)[j], s.g)}`).join('; ')}`);

  // Outputs allocated in JS (new Float32Array, written by the addon) vs by the addon (external ArrayBuffer).
  const small = list.filter((s) => outputLength(s.g) * 4 >= 1 << 20).slice(0, 3);
  console.log(`\noutput allocation, forward median ms (new Float32Array in JS / external ArrayBuffer from the addon):`);
  const js = loadOneDnnKernels({ output: 'js' });
  const ext = loadOneDnnKernels({ output: 'external' });
  if (js.kernels && ext.kernels) {
    for (const s of small) {
      const x = randomArray(inputLength(s.g));
      const w = randomArray(weightLength(s.g));
      const a = timeIt(() => js.kernels.conv3d(x, w, s.g));
      const b = timeIt(() => ext.kernels.conv3d(x, w, s.g));
      console.log(`  ${s.name} (${((outputLength(s.g) * 4) / 2 ** 20).toFixed(1)} MiB out): ${fmt(a)} / ${fmt(b)}`);
    }
  }

  if (LAYOUTS) {
    console.log(`\nmemory formats, ms per op (fwd / bwdData / bwdFilter):`);
    const layouts: OneDnnLayout[] = ['plain', 'any-weights', 'any', 'ncsp'];
    const ks = layouts.map((layout) => loadOneDnnKernels({ layout }).kernels!);
    console.log(`${pad('shape', 36)} ${layouts.map((l) => pad(l, 24)).join(' ')}`);
    for (const s of list) {
      const cols = ks.map((kk) => {
        const r = benchOneDnn(kk, s.g);
        return pad(OPS.map((op) => fmt(r[op])).join(' / '), 24);
      });
      console.log(`${pad(s.name, 36)} ${cols.join(' ')}`);
    }
  }
  console.log(`\nonednn ${(tOurs / 1000).toFixed(1)} s, PyTorch ${(tTorch / 1000).toFixed(1)} s, total ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

await main();
