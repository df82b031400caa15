/**
 * `npm run bench:infer`: sliding-window whole-volume inference (shared/model/sliding-window.ts) of Med3D ResNet-10 +
 * MedicalNet's segmentation head through Trainer.predictProbs, on an 80×96×80 volume (one window: the window is the
 * patch [40, 48, 40] × 2) and a 192×192×160 one (36 windows of 80×96×80, overlap 0.5, Gaussian blending, 2 windows
 * per pass), at ¼ and full width. When /usr/bin/python3 has torch, PyTorch runs the same windows (their starts
 * are passed) with the same blending and the same weights (exported by `medfl model export`'s code) in the same
 * run (bench/py/med3d_infer.py, 2 threads): the ratio and the largest probability difference are printed.
 *
 *   npm run bench:infer
 *   BENCH_WIDTHS=0.25 BENCH_REPS=2 npm run bench:infer
 *   BENCH_POOL=both npm run bench:infer     # also the same windows on fresh arrays (inference before its buffer pool)
 *   BENCH_WIDTHS=0.0625 BENCH_PATCH=16x16x16 BENCH_VOLUMES=32x32x32,56x48x40 BENCH_REPS=1 npm run bench:infer   # a smoke check
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Table from 'cli-table3';
import { med3dTorchStateDict } from '../cli/model-export.ts';
import { encodeTorchStateDict } from '../shared/checkpoints/pth-write.ts';
import { selectConvKernels } from '../shared/engine/conv-select.ts';
import { createMed3d } from '../shared/model/med3d.ts';
import { createMed3dTrainOps } from '../shared/model/graph/med3d-ops.ts';
import { createMed3dTrainer, med3dWindowForward } from '../shared/model/med3d-trainer.ts';
import { InferenceSettingsSchema, slidingWindowProbs, windowSize, windowStarts, type Shape3 } from '../shared/model/sliding-window.ts';
import { makeBundle, type TensorBundle } from '../shared/tensors/bundle.ts';
import { gaussian, mulberry32 } from '../shared/util/random.ts';

const shapeOf = (s: string) => s.split('x').map(Number) as unknown as Shape3;
const PATCH: Shape3 = shapeOf(process.env.BENCH_PATCH ?? '40x48x40');
const VOLUMES: Shape3[] = (process.env.BENCH_VOLUMES ?? '80x96x80,192x192x160').split(',').map(shapeOf);
const WIDTHS = (process.env.BENCH_WIDTHS ?? '0.25,1').split(',').map(Number);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const poolAB = process.env.BENCH_POOL === 'both';
const settings = InferenceSettingsSchema.parse({ mode: 'window', overlap: 0.5, blend: 'gaussian', batch: 2 });

const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];

/** A ball in noise: probabilities that are not all alike. */
function volume(shape: Shape3): Float32Array {
  const [D, H, W] = shape;
  const rng = mulberry32(D * H * W);
  const r = Math.min(D, H, W) / 4;
  const image = new Float32Array(D * H * W);
  for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const inside = (z - D / 2) ** 2 + (y - H / 2) ** 2 + (x - W / 2) ** 2 <= r * r;
    image[(z * H + y) * W + x] = (inside ? 1 : 0) + 0.5 * gaussian(rng);
  }
  return image;
}

/** Init weights with BatchNorm running statistics moved off 0/1, so a wrong eval-mode BatchNorm would show. */
function weights(arch: ReturnType<typeof createMed3d>): TensorBundle {
  const rng = mulberry32(7);
  return makeBundle(
    [...arch.init(1).values()].map((t) => {
      if (t.name.endsWith('.running_mean')) return { ...t, data: t.data.map(() => 0.2 * gaussian(rng)) };
      if (t.name.endsWith('.running_var')) return { ...t, data: t.data.map(() => 0.5 + rng()) };
      return t;
    }),
  );
}

function pytorch(config: Record<string, unknown>): { median_ms: number; min_ms: number; threads: number } | string {
  const probe = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'PyTorch not timed: /usr/bin/python3 has no torch (apt-get install python3-torch)';
  const script = fileURLToPath(new URL('./py/med3d_infer.py', import.meta.url));
  const r = spawnSync('/usr/bin/python3', [script], { input: JSON.stringify(config), encoding: 'utf8', maxBuffer: 1 << 24 });
  if (r.status !== 0) return `PyTorch run failed: ${r.stderr.trim().split('\n').pop()}`;
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as { median_ms: number; min_ms: number; threads: number };
}

const sel = await selectConvKernels();
process.stdout.write(`kernels: ${sel.kernels.name}; load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}\n`);
const work = mkdtempSync(join(tmpdir(), 'medfl-bench-infer-'));
const table = new Table({ head: ['config', 'windows', 'MedFL ms', ...(poolAB ? ['fresh arrays ms', 'pool / fresh'] : []), 'PyTorch ms', 'MedFL / PyTorch', 'max |Δp|'] });
try {
  for (const width of WIDTHS) {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: width, head: { kind: 'segmentation', numClasses: 2 }, patch: PATCH, inference: settings });
    const w = weights(arch);
    const pth = join(work, `r10-${width}.pth`);
    writeFileSync(pth, encodeTorchStateDict(med3dTorchStateDict(arch, w)));
    const trainer = createMed3dTrainer(arch, sel.kernels);
    for (const shape of VOLUMES) {
      const name = `R10 ${width === 1 ? 'full' : `×${width}`} ${shape.join('×')}`;
      const image = volume(shape);
      const win = windowSize(settings.window, PATCH, shape);
      const perAxis = [0, 1, 2].map((a) => windowStarts(Math.max(shape[a], win[a]), win[a], settings.overlap));
      const starts = perAxis[0].flatMap((z) => perAxis[1].flatMap((y) => perAxis[2].map((x) => [z, y, x])));
      const reps = width === 1 && shape[0] > 100 ? Math.min(REPS, 2) : REPS;
      const times: number[] = [];
      let ours: Float32Array = new Float32Array(0);
      for (let i = 0; i <= reps; i++) {
        const t0 = performance.now();
        ours = await trainer.predictProbs(w, { id: 'bench', shape, image });
        if (i > 0) times.push(performance.now() - t0); // the first run warms up
      }
      // The same windows through eval-mode ops on fresh arrays (no pool), alternating with nothing else in between.
      const fresh: number[] = [];
      if (poolAB) {
        const values = new Map(arch.params().map((p) => [p.name, w.get(p.name)!.data]));
        const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
        const store = { value: (n: string) => values.get(n)!, shape: (n: string) => shapes.get(n)!, grad: () => undefined };
        const forward = med3dWindowForward(arch, { beginPass: () => createMed3dTrainOps({ kernels: sel.kernels, store, training: false }), take: (n) => new Float32Array(n) });
        const options = { window: win, overlap: settings.overlap, blend: settings.blend, batch: settings.batch, numClasses: 2 };
        for (let i = 0; i <= reps; i++) {
          const t0 = performance.now();
          await slidingWindowProbs(image, shape, options, forward);
          if (i > 0) fresh.push(performance.now() - t0);
        }
      }
      const imagePath = join(work, 'image.f32');
      const outPath = join(work, 'probs.f32');
      writeFileSync(imagePath, image);
      const pt = pytorch({
        name,
        depth: 10,
        shortcut: 'B',
        base: arch.config.basePlanes,
        head_channels: arch.config.head.kind === 'segmentation' ? arch.config.head.channels : 0,
        classes: 2,
        weights: pth,
        image: imagePath,
        shape,
        window: win,
        starts,
        batch: settings.batch,
        warmup: 1,
        reps,
        out: outPath,
      });
      const m = median(times);
      let diff = '—';
      if (typeof pt !== 'string') {
        const buf = readFileSync(outPath);
        const theirs = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
        let max = 0;
        for (let i = 0; i < theirs.length; i++) max = Math.max(max, Math.abs(theirs[i] - ours[i]));
        diff = max.toExponential(1);
      }
      const f = poolAB ? median(fresh) : 0;
      table.push([name, String(starts.length), m.toFixed(0), ...(poolAB ? [f.toFixed(0), `${(m / f).toFixed(2)}×`] : []), typeof pt === 'string' ? '—' : pt.median_ms.toFixed(0), typeof pt === 'string' ? pt : `${(m / pt.median_ms).toFixed(2)}×`, diff]);
      process.stdout.write(`${name}: ${starts.length} window(s), ${m.toFixed(0)} ms (min ${Math.min(...times).toFixed(0)})${poolAB ? `, fresh arrays ${f.toFixed(0)} ms` : ''}${typeof pt === 'string' ? '' : `, PyTorch ${pt.median_ms.toFixed(0)} ms`}\n`);
    }
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
process.stdout.write(
  `${table.toString()}\nwindow ${PATCH.map((s) => s * 2).join('×')} (patch × 2), overlap ${settings.overlap}, ${settings.blend} blending, ${settings.batch} windows per pass; ` +
    `medians of ${REPS} runs (2 at full width 192×192×160) after one warm-up, each side; PyTorch with ${process.env.BENCH_THREADS ?? 2} threads; load average at the end ${loadavg().map((l) => l.toFixed(2)).join(' ')}\n`,
);
