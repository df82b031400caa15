/**
 * FedAvg of 10 Med3D-sized updates (tiny3d width 451 encoder = 32.97 M float32 = 131.9 MB each)
 * through the real strategy (coordinator/aggregation/fedavg.ts: begin → add ×10 → finish), against a
 * plain memory copy of the same bytes in the same run, plus candidate axpy loop shapes; then peak RSS
 * for "all updates in memory" (this process) and two streaming scenarios (fresh child processes, so
 * each peak is its own). Then every composed strategy (coordinator/aggregation/composed.ts: fedavg, with a
 * norm bound, FedAdam, DP; median; trimmed mean; trimmed mean + FedYogi + clip) on the same updates against
 * the same memory copy, and the peak RSS of one round of 50 sites (BENCH_SITES) per strategy, each in a
 * fresh process; median / trimmed mean spill to the OS temp dir (6.6 GB at 50 sites).
 *
 *   npm run bench:aggregate                 # = node --expose-gc --import tsx bench/aggregate.ts
 *   BENCH_REPS=3 npm run bench:aggregate    # quicker
 *   BENCH_PARTS=strategies npm run bench:aggregate   # only the memory copy and the composed strategies (no RSS runs)
 *   BENCH_PARTS=rss npm run bench:aggregate          # only the peak RSS of one 50-site round per streaming strategy
 *   BENCH_BEFORE=1 npm run bench:aggregate  # also, same run: the streaming rounds with check() then add() (two passes
 *                                           # over each update, the code before the checked fold) and with the JS delta
 *                                           # norm and JS Box–Muller; median / trimmed mean with the JS column reduction
 *   BENCH_BEFORE=streaming npm run bench:aggregate   # only the two-pass rows of the streaming strategies
 *   BENCH_STRATEGIES='fedavg;median' npm run bench:aggregate   # only these strategies' rows (names as in the tables)
 *   BENCH_FOLD_VARIANTS='sse2;avx2' npm run bench:aggregate    # also fedavg's rows with the addon's fold loop forced to
 *                                                             # these variants, interleaved with the default's
 */
import { fork } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import Table from 'cli-table3';
import { FedAvg, axpy } from '../coordinator/aggregation/fedavg.ts';
import { ComposedStrategy, type ComposedOptions } from '../coordinator/aggregation/composed.ts';
import { robustColumnsJs } from '../coordinator/aggregation/robust.ts';
import { cryptoGaussianWith, gaussianFromWordsJs } from '../coordinator/aggregation/gaussian.ts';
import { checkedFoldLoop, nativeCheckedFoldsWith, type NativeFoldVariant } from '../coordinator/aggregation/checked-fold.ts';
import type { BatchItem, RoundAggregator, UpdateInfo } from '../coordinator/aggregation/strategy.ts';
import type { RoundBase } from '../coordinator/aggregation/base-blocks.ts';
import { deltaNormJs } from '../coordinator/aggregation/validate.ts';
import { PlanSchema } from '../shared/plan/schema.ts';
import { createSimdArena } from '../coordinator/aggregation/simd-axpy.ts';
import { createTiny3d } from '../shared/model/tiny3d.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../shared/tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors } from '../shared/tensors/safetensors.ts';
import { openModelReader } from '../coordinator/models/model-reader.ts';

const WIDTH = 451;
const UPDATES = 10;
const REPS = Number(process.env.BENCH_REPS ?? 3);
const gc = (globalThis as { gc?: () => void }).gc ?? (() => undefined);

const SPECS: TensorSpec[] = createTiny3d({ patch: [16, 16, 16], width: WIDTH })
  .params()
  .filter((p) => p.part === 'encoder')
  .map((p) => ({ name: p.name, dtype: p.dtype, shape: [...p.shape] }));
const sizeOf = (s: TensorSpec) => s.shape.reduce((a, b) => a * b, 1);
const PARAMS = SPECS.reduce((a, s) => a + sizeOf(s), 0);
const MODEL_BYTES = PARAMS * 4;
const MB = (b: number) => b / 1e6;
const fmt = (x: number, d = 0): string => x.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });

function makeUpdate(k: number): TensorBundle {
  return makeBundle(SPECS.map((s) => {
    const data = new Float32Array(sizeOf(s));
    fillUpdate(data, k);
    return { name: s.name, dtype: 'F32' as const, shape: [...s.shape], data };
  }));
}
function fillUpdate(data: Float32Array, k: number): void {
  for (let i = 0; i < data.length; i++) data[i] = ((i * 7 + k * 13) % 1009) * 1e-3 - 0.5;
}
const samplesOf = (k: number) => 10 + 7 * k; // unequal weights, as real sites have

// ── candidate loop shapes (acc += w·x), each its own function so V8 keeps each call site monomorphic ──
function axpySimple(acc: Float32Array, x: Float32Array, w: number): void {
  for (let i = 0; i < x.length; i++) acc[i] += w * x[i];
}
function axpyUnroll8(acc: Float32Array, x: Float32Array, w: number): void {
  const n = x.length;
  const n8 = n - (n % 8);
  let i = 0;
  for (; i < n8; i += 8) {
    acc[i] += w * x[i]; acc[i + 1] += w * x[i + 1]; acc[i + 2] += w * x[i + 2]; acc[i + 3] += w * x[i + 3];
    acc[i + 4] += w * x[i + 4]; acc[i + 5] += w * x[i + 5]; acc[i + 6] += w * x[i + 6]; acc[i + 7] += w * x[i + 7];
  }
  for (; i < n; i++) acc[i] += w * x[i];
}

interface Stat { median: number; min: number; max: number }
function stat(xs: number[]): Stat {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  return { median: m, min: s[0], max: s[s.length - 1] };
}

// ───────────────────── composed strategies (coordinator/aggregation/composed.ts) ─────────────────────

/** Each strategy the plan can name, as plan.aggregation sections. */
const STRATEGIES: Record<string, { cfg: Record<string, unknown>; streaming: boolean }> = {
  fedavg: { cfg: {}, streaming: true },
  'fedavg + norm bound': { cfg: { validation: { maxNorm: 1e12 } }, streaming: true },
  'fedavg + FedAdam': { cfg: { serverOptimizer: { type: 'fedadam' } }, streaming: true },
  'fedavg + DP (clip + noise)': { cfg: { dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } }, streaming: true },
  median: { cfg: { strategy: 'median' }, streaming: false },
  'trimmed-mean β=0.1': { cfg: { strategy: 'trimmed-mean', trimFraction: 0.1 }, streaming: false },
  'trimmed-mean + FedYogi + clip': { cfg: { strategy: 'trimmed-mean', trimFraction: 0.1, clipNorm: 1, serverOptimizer: { type: 'fedyogi' } }, streaming: false },
};
/** BENCH_STRATEGIES=fedavg,median: only these rows of the strategies and RSS tables (with their same-run before/after rows). */
const ONLY_NAMES = process.env.BENCH_STRATEGIES?.split(';').map((n) => n.trim());
/** A streaming round with the waiting updates handed over in batches read straight from their files (checkAndAddBatch). */
const FROM_FILES = ', batches of 10 read from the update files';
const BATCHED_FROM_FILES = `fedavg${FROM_FILES}`;
const DP_FROM_FILES = `fedavg + DP (clip + noise)${FROM_FILES}`;
/** Updates per batch in the batched rows: the ten of a round at once; at 50 sites, five batches. */
const BATCH = 10;
const RSS_STRATEGIES = ['fedavg', BATCHED_FROM_FILES, 'fedavg + norm bound', `fedavg + norm bound${FROM_FILES}`, 'fedavg + DP (clip + noise)', DP_FROM_FILES, 'fedavg + FedAdam', `fedavg + FedAdam${FROM_FILES}`, 'median'].filter((n) => !ONLY_NAMES || ONLY_NAMES.includes(n));
const RSS_SITES = Number(process.env.BENCH_SITES ?? 50);

const BEFORE = process.env.BENCH_BEFORE === '1' || process.env.BENCH_BEFORE === 'streaming';
/** BENCH_BEFORE=streaming: only the two-pass rows of the streaming strategies (the JS robust rows take minutes). */
const BEFORE_JS = process.env.BENCH_BEFORE === '1';
const ONLY_STRATEGIES = process.env.BENCH_PARTS === 'strategies';
/** BENCH_FOLD_VARIANTS='sse2;avx2': fedavg's one-by-one and batched rows again with the addon's fold forced to each (same run, interleaved). */
const FOLD_VARIANTS = (process.env.BENCH_FOLD_VARIANTS ?? '').split(';').map((v) => v.trim()).filter(Boolean) as NativeFoldVariant[];
/** The JS implementations the native kernels replaced, for same-run before/after rows. */
const BEFORE_OPTS: ComposedOptions = { columns: robustColumnsJs, deltaNorm: deltaNormJs, gaussian: cryptoGaussianWith(gaussianFromWordsJs) };

function composed(name: string, extra: ComposedOptions = {}): ComposedStrategy {
  return new ComposedStrategy(PlanSchema.parse({ aggregation: STRATEGIES[name].cfg }).aggregation, { spillDir: join(os.tmpdir(), 'medfl-bench-spill'), ...extra });
}

/** Checks and folds one update as the coordinator does: in one pass where the round can (checkAndAdd), else check() + add(). */
function checkAndFold(agg: RoundAggregator, u: TensorBundle, info: UpdateInfo, fused: boolean): void {
  const fusedVerdict = fused ? agg.checkAndAdd?.(u, info) : undefined;
  if (fusedVerdict) {
    if (fusedVerdict.problem) throw new Error(`bench update refused: ${fusedVerdict.problem}`);
    return;
  }
  const v = agg.check(u, info);
  if (v.problem) throw new Error(`bench update refused: ${v.problem}`);
  agg.add(u, info, v);
}

/** One round as the coordinator runs it: begin, then check + fold per update, then finish. `fused: false`: always check() then add(). */
function composedRound(s: ComposedStrategy, base: () => RoundBase, next: (k: number) => TensorBundle, n: number, fused = true): number {
  const t0 = performance.now();
  const agg = s.begin(base(), SPECS, { expected: n });
  for (let k = 0; k < n; k++) checkAndFold(agg, next(k), { site: `site-${k}`, numSamples: samplesOf(k) }, fused);
  agg.finish();
  return performance.now() - t0;
}

/** One round with the updates handed over in batches of `batch` (checkAndAddBatch: one pass over the sums per batch). */
function batchedRound(s: ComposedStrategy, base: () => RoundBase, item: (k: number) => BatchItem, n: number, batch = BATCH): number {
  const t0 = performance.now();
  const agg = s.begin(base(), SPECS, { expected: n });
  for (let k = 0; k < n; k += batch) {
    const verdicts = agg.checkAndAddBatch!(Array.from({ length: Math.min(batch, n - k) }, (_, j) => item(k + j)));
    if (!verdicts) throw new Error('the fedavg round did not take a batch');
    const refused = verdicts.find((v) => v.problem);
    if (refused) throw new Error(`bench update refused: ${refused.problem}`);
  }
  agg.finish();
  return performance.now() - t0;
}

/** One round as the coordinator runs it today: each update read from its file into one reused buffer (the receiver's scratch), then checkAndAdd. */
function fromFilesRound(s: ComposedStrategy, base: () => RoundBase, files: string[], n: number): number {
  const readBuf = Buffer.allocUnsafe(statSync(files[0]).size);
  const t0 = performance.now();
  const agg = s.begin(base(), SPECS, { expected: n });
  for (let k = 0; k < n; k++) {
    const fd = openSync(files[k % files.length], 'r');
    for (let off = 0; off < readBuf.length; ) off += readSync(fd, readBuf, off, readBuf.length - off, off);
    closeSync(fd);
    checkAndFold(agg, viewSafetensors(readBuf), { site: `site-${k}`, numSamples: samplesOf(k) }, true);
  }
  agg.finish();
  return performance.now() - t0;
}

/**
 * Peak RSS of one round of `sites` updates through a strategy, in a fresh process: the base model as the
 * engine gives it (a reader over its model file, read a block at a time; the file is written by the parent),
 * and one update buffer refilled per site (the upload receiver's reused scratch).
 */
function rssChild(name: string, sites: number, baseFile: string): void {
  const baselineRss = process.memoryUsage().rss;
  if (name.endsWith(FROM_FILES)) return rssBatchedChild(name.slice(0, -FROM_FILES.length), sites, baseFile, baselineRss);
  let peak = baselineRss;
  const s = composed(name);
  const update = makeUpdate(0);
  const t0 = performance.now();
  const agg = s.begin(openModelReader(baseFile), SPECS, { expected: sites });
  for (let k = 0; k < sites; k++) {
    for (const t of update.values()) fillUpdate(t.data, k);
    checkAndFold(agg, update, { site: `site-${k}`, numSamples: samplesOf(k) }, true);
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  const out = agg.finish();
  peak = Math.max(peak, process.memoryUsage().rss);
  const r: StreamResult = { baselineRss, peakSampledRss: peak, hwm: peakRss(), ms: performance.now() - t0, check: out.get(SPECS[0].name)!.data[5] };
  process.send!(r, () => process.disconnect());
}

/** A streaming round at `sites` sites, BATCH update files at a time (the parent wrote them next to the base). */
function rssBatchedChild(strategy: string, sites: number, baseFile: string, baselineRss: number): void {
  let peak = baselineRss;
  const files = updateFiles(baseFile);
  const s = composed(strategy);
  const t0 = performance.now();
  const agg = s.begin(openModelReader(baseFile), SPECS, { expected: sites });
  for (let k = 0; k < sites; k += BATCH) {
    const items: BatchItem[] = Array.from({ length: Math.min(BATCH, sites - k) }, (_, j) => ({ reader: openModelReader(files[(k + j) % files.length]), info: { site: `site-${k + j}`, numSamples: samplesOf(k + j) } }));
    const v = agg.checkAndAddBatch!(items)!;
    if (v.some((x) => x.problem)) throw new Error('bench update refused');
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  const out = agg.finish();
  peak = Math.max(peak, process.memoryUsage().rss);
  const r: StreamResult = { baselineRss, peakSampledRss: peak, hwm: peakRss(), ms: performance.now() - t0, check: out.get(SPECS[0].name)!.data[5] };
  process.send!(r, () => process.disconnect());
}

/** The BATCH update files written next to the base model file (writeUpdateFiles). */
function updateFiles(baseFile: string): string[] {
  return Array.from({ length: BATCH }, (_, k) => join(baseFile, '..', `update-${k}.safetensors`));
}

/** Writes update k as a safetensors file for k < BATCH, next to `baseFile` (as uploads wait on the coordinator's disk). */
function writeUpdateFiles(baseFile: string, updates?: TensorBundle[]): string[] {
  const files = updateFiles(baseFile);
  files.forEach((f, k) => writeFileSync(f, encodeSafetensors(updates?.[k] ?? makeUpdate(k))));
  return files;
}

async function runRssChild(name: string, sites: number, baseFile: string): Promise<StreamResult> {
  const child = fork(fileURLToPath(import.meta.url), ['--rss', name, String(sites), baseFile], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const [msg] = (await Promise.race([once(child, 'message'), once(child, 'exit').then(() => { throw new Error(`rss child (${name}) exited without a result`); })])) as [StreamResult];
  if (child.exitCode === null) await once(child, 'exit');
  return msg;
}

// ───────────────────── streaming scenarios (child processes) ─────────────────────

interface StreamResult { baselineRss: number; peakSampledRss: number; hwm: number; ms: number; check: number }

/**
 * Peak RSS of this process. Linux: VmHWM from /proc (resets at exec). getrusage's maxRSS does not: it
 * is kept across exec, so a child forked while the parent was big would report the parent's size.
 */
function peakRss(): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch { /* not Linux */ }
  return process.resourceUsage().maxRSS * 1024;
}

type StreamMode = 'refill' | 'decode' | 'decode-gc' | 'reuse';
const STREAM_MODES: Record<StreamMode, string> = {
  refill: 'one update buffer, refilled per update',
  decode: 'a fresh readFileSync buffer per update (the coordinator before 2026-11-25), no gc()',
  'decode-gc': 'same, with gc() after each fold (floor of that path)',
  reuse: 'one reused read buffer + Float32Array views (as the coordinator\'s upload receiver)',
};

/** Tensors as views on the file bytes (safetensors data is 8-byte aligned by encodeSafetensors; the buffer starts at offset 0). */
function viewSafetensors(buf: Buffer): TensorBundle {
  const hlen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.toString('utf8', 8, 8 + hlen)) as Record<string, { shape: number[]; data_offsets: [number, number] }>;
  const start = buf.byteOffset + 8 + hlen;
  return makeBundle(SPECS.map((s) => {
    const e = header[s.name];
    return { name: s.name, dtype: 'F32' as const, shape: e.shape, data: new Float32Array(buf.buffer, start + e.data_offsets[0], (e.data_offsets[1] - e.data_offsets[0]) / 4) };
  }));
}

/**
 * One round folded update by update, nothing else alive: `refill` reuses one update buffer (a decoder
 * writing into a reused buffer); `decode` does what the coordinator does per accepted upload: read the
 * file, decode safetensors (fresh arrays), fold, drop — with no explicit gc(); `decode-gc` adds gc();
 * `view` skips the decode copy.
 */
function streamingChild(mode: StreamMode, file: string): void {
  const baselineRss = process.memoryUsage().rss;
  let peak = baselineRss;
  const sample = () => { peak = Math.max(peak, process.memoryUsage().rss); };
  const t0 = performance.now();
  const agg = new FedAvg().begin(new Map(), SPECS);
  const reused = mode === 'refill' ? makeUpdate(0) : undefined;
  const readBuf = mode === 'reuse' ? Buffer.allocUnsafe(statSync(file).size) : undefined;
  for (let k = 0; k < UPDATES; k++) {
    let u: TensorBundle;
    if (reused) {
      for (const t of reused.values()) fillUpdate(t.data, k);
      u = reused;
    } else if (readBuf) {
      const fd = openSync(file, 'r');
      for (let off = 0; off < readBuf.length; ) off += readSync(fd, readBuf, off, readBuf.length - off, off);
      closeSync(fd);
      sample();
      u = viewSafetensors(readBuf);
    } else {
      const bytes = readFileSync(file);
      sample();
      u = decodeSafetensors(bytes, { views: true }).bundle; // as the coordinator's upload receiver
    }
    sample();
    agg.add(u, { site: `site-${k}`, numSamples: samplesOf(k) });
    sample();
    if (mode === 'decode-gc') gc();
  }
  const out = agg.finish();
  sample();
  const ms = performance.now() - t0;
  const r: StreamResult = { baselineRss, peakSampledRss: peak, hwm: peakRss(), ms, check: out.get(SPECS[0].name)!.data[5] };
  process.send!(r, () => process.disconnect());
}

async function runChild(mode: StreamMode, file: string): Promise<StreamResult> {
  const child = fork(fileURLToPath(import.meta.url), ['--stream', mode, file], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const [msg] = (await Promise.race([once(child, 'message'), once(child, 'exit').then(() => { throw new Error(`streaming child (${mode}) exited without a result`); })])) as [StreamResult];
  if (child.exitCode === null) await once(child, 'exit');
  return msg;
}

/** Peak RSS of one round of RSS_SITES sites per strategy, each in a fresh process, against the base model in `baseFile`. */
async function strategyRss(baseFile: string): Promise<void> {
  writeUpdateFiles(baseFile);
  const ct = new Table({
    head: [`${RSS_SITES} sites × ${fmt(PARAMS / 1e6, 1)} M params (fresh process)`, 'peak − baseline MB', '÷ one model', 'round s', 'disk spilled'],
    colAligns: ['left', 'right', 'right', 'right', 'right'],
  });
  for (const name of RSS_STRATEGIES) {
    const r = await runRssChild(name, RSS_SITES, baseFile);
    const peak = Math.max(r.hwm, r.peakSampledRss);
    ct.push([name, fmt(MB(peak - r.baselineRss)), fmt((peak - r.baselineRss) / MODEL_BYTES, 2), fmt(r.ms / 1000, 1), STRATEGIES[name]?.streaming !== false ? '—' : `${fmt((RSS_SITES * MODEL_BYTES) / 1e9, 1)} GB`]);
  }
  console.log(ct.toString());
  console.log('  includes one update buffer (the receiver\'s), except the rows read from the update files (a 16K-value block per update); the base model is read from its file a block at a time (base-blocks.ts), as the coordinator does. Streaming goal ≤ 3×: float64 sums (2×) + update (1×) + blocks; an optimiser\'s m and v live in a file (moments.ts).');
  console.log('  trimmed mean has the memory of the median (same block pass); both spill one model of disk per update.');
}

/** BENCH_PARTS=rss: only the per-strategy peak RSS at RSS_SITES sites. */
async function rssOnly(): Promise<void> {
  console.log(`load average at start: ${os.loadavg().map((x) => fmt(x, 2)).join(' ')} (2 cores; other work on the machine skews every row)`);
  const dir = mkdtempSync(join(os.tmpdir(), 'medfl-bench-aggregate-'));
  try {
    const baseFile = join(dir, 'base.safetensors');
    writeFileSync(baseFile, encodeSafetensors(makeUpdate(1000)));
    await strategyRss(baseFile);
    console.log(`load average at the end: ${os.loadavg().map((x) => fmt(x, 2)).join(' ')}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ───────────────────────────── main ─────────────────────────────

async function main(): Promise<void> {
  const cpus = os.cpus();
  console.log(`machine: ${cpus.length} × ${cpus[0]?.model ?? '?'}, ${fmt(os.totalmem() / 2 ** 30, 1)} GiB RAM, node ${process.version}${(globalThis as { gc?: unknown }).gc ? ', --expose-gc' : ''}`);
  console.log(`load average at start: ${os.loadavg().map((x) => fmt(x, 2)).join(' ')} (2 cores; other work on the machine skews every row)`);
  console.log(`model: tiny3d width ${WIDTH} encoder, ${SPECS.length} tensors, ${fmt(PARAMS)} float32 = ${fmt(MB(MODEL_BYTES), 1)} MB; ${UPDATES} updates; GB/s = bytes of updates read per second (10^9 B)`);
  const rssStart = process.memoryUsage().rss;

  const t = performance.now();
  const updates = Array.from({ length: UPDATES }, (_, k) => makeUpdate(k));
  console.log(`made ${UPDATES} updates in ${fmt((performance.now() - t) / 1000, 1)} s`);
  const totalBytes = UPDATES * MODEL_BYTES;
  const flat = updates.map((u) => SPECS.map((s) => u.get(s.name)!.data));

  // Reused, pre-touched destinations: the copy baseline and the loop candidates measure the loop, not page faults.
  const dst = SPECS.map((s) => new Float32Array(sizeOf(s)).fill(0));
  // The coordinator's own kernel: sums in [0, PARAMS), one update staged in [PARAMS, 2·PARAMS).
  const wasm = createSimdArena(PARAMS);
  if (!wasm) throw new Error('WebAssembly SIMD is not available in this Node');
  wasm.mem.fill(0, 0, 2 * PARAMS);
  const offs: number[] = [];
  SPECS.reduce((o, s) => (offs.push(o), o + sizeOf(s)), 0);

  const runs: Record<string, () => number> = {
    'memory copy (dst.set(src), reused dst)': () => {
      const t0 = performance.now();
      for (const u of flat) for (let j = 0; j < u.length; j++) dst[j].set(u[j]);
      return performance.now() - t0;
    },
    'FedAvg add ×10 (real, fedavg.ts)': () => NaN, // filled from the round below
    'FedAvg round: begin + add ×10 + finish (real)': () => NaN,
    'axpy loop of fedavg.ts (unroll 4), reused acc': () => loop(axpy),
    'simple loop acc[i] += w*x[i], reused acc': () => loop(axpySimple),
    'unroll 8, reused acc': () => loop(axpyUnroll8),
    'wasm SIMD f32x4 (update already in wasm memory)': () => {
      const t0 = performance.now();
      for (let k = 0; k < UPDATES; k++) for (let j = 0; j < SPECS.length; j++) wasm.axpyFromStaging(offs[j], sizeOf(SPECS[j]), samplesOf(k));
      return performance.now() - t0;
    },
    'wasm SIMD f32x4 incl. copying each update in': () => {
      const t0 = performance.now();
      for (let k = 0; k < UPDATES; k++) {
        for (let j = 0; j < SPECS.length; j++) wasm.mem.set(flat[k][j], PARAMS + offs[j]);
        for (let j = 0; j < SPECS.length; j++) wasm.axpyFromStaging(offs[j], sizeOf(SPECS[j]), samplesOf(k));
      }
      return performance.now() - t0;
    },
  };
  function loop(f: (acc: Float32Array, x: Float32Array, w: number) => void): number {
    const t0 = performance.now();
    for (let k = 0; k < UPDATES; k++) for (let j = 0; j < SPECS.length; j++) f(dst[j], flat[k][j], samplesOf(k));
    return performance.now() - t0;
  }
  const times: Record<string, number[]> = Object.fromEntries(Object.keys(runs).map((k) => [k, []]));
  let firstResult: Float32Array | undefined;
  // One strategy for all rounds, as the coordinator keeps one: it reuses its accumulator arena.
  const strategy = new FedAvg();
  const round = (): { adds: number; all: number } => {
    const t0 = performance.now();
    const agg = strategy.begin(new Map(), SPECS);
    const t1 = performance.now();
    for (let k = 0; k < UPDATES; k++) agg.add(updates[k], { site: `site-${k}`, numSamples: samplesOf(k) });
    const t2 = performance.now();
    const out = agg.finish();
    const t3 = performance.now();
    firstResult ??= out.get(SPECS[0].name)!.data.slice(); // finish() returns views into the reused arena
    return { adds: t2 - t1, all: t3 - t0 };
  };

  // One untimed pass of everything (JIT, first-touch of reused buffers), then interleaved repetitions.
  for (const [name, f] of Object.entries(runs)) if (!name.startsWith('FedAvg')) f();
  round();
  let peakSampled = process.memoryUsage().rss;
  for (let r = 0; r < REPS; r++) {
    gc(); // start each repetition from a collected heap, so one run's garbage does not bill the next
    for (const [name, f] of Object.entries(runs)) {
      if (name.startsWith('FedAvg')) continue;
      times[name].push(f());
    }
    const rr = round();
    times['FedAvg add ×10 (real, fedavg.ts)'].push(rr.adds);
    times['FedAvg round: begin + add ×10 + finish (real)'].push(rr.all);
    peakSampled = Math.max(peakSampled, process.memoryUsage().rss);
  }

  // Sanity: FedAvg's output is the weighted mean (checked at a few indices, float32 tolerance).
  const wsum = Array.from({ length: UPDATES }, (_, k) => samplesOf(k)).reduce((a, b) => a + b, 0);
  for (const i of [0, 5, 12345]) {
    let expect = 0;
    for (let k = 0; k < UPDATES; k++) expect += samplesOf(k) * flat[k][0][i];
    expect /= wsum;
    if (Math.abs(firstResult![i] - expect) > 1e-4) throw new Error(`FedAvg result ${firstResult![i]} ≠ weighted mean ${expect} at ${i}`);
  }

  const gbps = (ms: number) => totalBytes / 1e9 / (ms / 1000);
  const copyMed = stat(times['memory copy (dst.set(src), reused dst)'].map(gbps)).median;
  const table = new Table({
    head: ['10 × 131.9 MB, same run', 'median GB/s', 'min–max GB/s', 'median ms', '× memory copy'],
    colAligns: ['left', 'right', 'right', 'right', 'right'],
  });
  for (const [name, ms] of Object.entries(times)) {
    const s = stat(ms.map(gbps));
    table.push([name, fmt(s.median, 2), `${fmt(s.min, 2)}–${fmt(s.max, 2)}`, fmt(stat(ms).median), fmt(s.median / copyMed, 2)]);
  }
  console.log(table.toString());
  const addMed = stat(times['FedAvg add ×10 (real, fedavg.ts)'].map(gbps)).median;
  console.log(`target ≥ 0.5× memory copy: FedAvg add ${fmt(addMed / copyMed, 2)}× ${addMed / copyMed >= 0.5 ? 'MET' : 'NOT met'}`);
  console.log('  "FedAvg round" includes begin() zeroing the reused accumulator and finish() scaling it.');

  // Every strategy the plan can compose, on the same 10 updates, against the same memory copy.
  // The base model as the coordinator gives it to a round: a reader over its model file (read a block at a time).
  const baseDir = mkdtempSync(join(os.tmpdir(), 'medfl-bench-base-'));
  const baseFile = join(baseDir, 'base.safetensors');
  writeFileSync(baseFile, encodeSafetensors(makeUpdate(1000)));
  const base = () => openModelReader(baseFile);
  const files = writeUpdateFiles(baseFile, updates);
  const st = new Table({
    head: [`strategy: one round of ${UPDATES} × ${fmt(MB(MODEL_BYTES), 1)} MB (check + add + finish)`, 'GB/s', '× memory copy', 'round s'],
    colAligns: ['left', 'right', 'right', 'right'],
  });
  for (const name of Object.keys(STRATEGIES).filter((n) => !ONLY_NAMES || ONLY_NAMES.includes(n))) {
    const variants: [string, ComposedOptions, boolean][] = [[name, {}, true]];
    if (BEFORE && STRATEGIES[name].streaming) variants.push([`${name} — before (check() then add(): two passes)`, {}, false]);
    if (BEFORE_JS) variants.push([`${name} — before (JS ${STRATEGIES[name].streaming ? 'delta norm and noise, two passes' : 'column reduction'})`, BEFORE_OPTS, false]);
    for (const [label, extra, fused] of variants) {
      const strat = composed(name, extra);
      const reps = STRATEGIES[name].streaming ? 3 : 1;
      const ms: number[] = [];
      for (let r = 0; r < reps; r++) {
        gc();
        ms.push(composedRound(strat, base, (k) => updates[k], UPDATES, fused));
      }
      const m = stat(ms).median;
      st.push([label, fmt(gbps(m), 2), fmt(gbps(m) / copyMed, 2), fmt(m / 1000, 2)]);
    }
    if (name === 'median' || name === 'trimmed-mean β=0.1') {
      // One read per update (checkAndAdd: the norm measured while the update is spilled) against check() then add(), interleaved.
      const pair: [string, boolean][] = [[`${name}, one read (interleaved with the next row)`, true], [`${name} — before (check() then add(): two reads)`, false]];
      const ms = pair.map(() => [] as number[]);
      for (let r = 0; r < 2; r++) {
        pair.forEach(([, fused], i) => {
          gc();
          ms[i].push(composedRound(composed(name), base, (k) => updates[k], UPDATES, fused));
        });
      }
      pair.forEach(([label], i) => {
        const m = stat(ms[i]).median;
        st.push([label, fmt(gbps(m), 2), fmt(gbps(m) / copyMed, 2), fmt(m / 1000, 2)]);
      });
    }
    if (name === 'fedavg') {
      // One by one against one batched pass, in memory and from files: interleaved, so each pair sees the same load.
      const strats = [0, 1, 2, 3].map(() => composed('fedavg'));
      const inMemory = (k: number): BatchItem => ({ update: updates[k], info: { site: `site-${k}`, numSamples: samplesOf(k) } });
      const fromFile = (k: number): BatchItem => ({ reader: openModelReader(files[k]), info: { site: `site-${k}`, numSamples: samplesOf(k) } });
      const rows: [string, () => number][] = [
        [`fedavg, one by one (interleaved with the next ${3 + 2 * FOLD_VARIANTS.length} rows)`, () => composedRound(strats[0], base, (k) => updates[k], UPDATES)],
        [`fedavg, the ${UPDATES} updates in one batched pass (in memory)`, () => batchedRound(strats[1], base, inMemory, UPDATES)],
        ['fedavg, one by one, each read from its file into one reused buffer (as the receiver does)', () => fromFilesRound(strats[2], base, files, UPDATES)],
        [`fedavg, the ${UPDATES} updates in one batched pass read from their files a block at a time`, () => batchedRound(strats[3], base, fromFile, UPDATES)],
      ];
      for (const v of FOLD_VARIANTS) {
        const folds = nativeCheckedFoldsWith(v);
        const one = composed('fedavg', { checkedFold: folds.one });
        const batched = composed('fedavg', { checkedFoldBatch: folds.batch });
        rows.push([`fedavg, one by one, the ${v} fold loop`, () => composedRound(one, base, (k) => updates[k], UPDATES)]);
        rows.push([`fedavg, one batched pass (in memory), the ${v} fold loop`, () => batchedRound(batched, base, inMemory, UPDATES)]);
      }
      const ms = rows.map(() => [] as number[]);
      for (let r = 0; r < 3; r++) {
        rows.forEach(([, run], i) => {
          gc();
          ms[i].push(run());
        });
      }
      rows.forEach(([label], i) => {
        const m = stat(ms[i]).median;
        st.push([label, fmt(gbps(m), 2), fmt(gbps(m) / copyMed, 2), fmt(m / 1000, 2)]);
      });
    }
  }
  rmSync(baseDir, { recursive: true, force: true });
  console.log(st.toString());
  console.log(`  the base model is read from its model file a block at a time, as the coordinator reads it (the page cache holds it).`);
  console.log(`  streaming rows check and fold each update in one pass where the round can (checkAndAdd: fedavg without clipping; ${checkedFoldLoop()} loop), else check() (the delta norm) and then add(); median/trimmed rows include spilling every update to disk and reading it back.`);
  console.log(`load average after the strategies: ${os.loadavg().map((x) => fmt(x, 2)).join(' ')}`);
  if (ONLY_STRATEGIES) return;

  const maxRss = Math.max(peakRss(), process.resourceUsage().maxRSS * 1024);
  console.log(`\nRSS, all ${UPDATES} updates held in memory (this process): start ${fmt(MB(rssStart))} MB, peak sampled ${fmt(MB(peakSampled))} MB, peak (VmHWM/maxRSS) ${fmt(MB(maxRss))} MB = ${fmt(maxRss / MODEL_BYTES, 1)}× one model`);
  console.log(`  (= ${UPDATES} updates + the copy/loop destination (1×) + wasm memory (2×) + FedAvg's accumulator (1×) + the previous round's result awaiting GC)`);

  // Streaming: fresh processes, so each maxRSS is that scenario's own.
  const dir = mkdtempSync(join(os.tmpdir(), 'medfl-bench-aggregate-'));
  try {
    const file = join(dir, 'update.safetensors');
    writeFileSync(file, encodeSafetensors(updates[3]));
    const baseFile = join(dir, 'base.safetensors');
    writeFileSync(baseFile, encodeSafetensors(makeUpdate(1000)));
    updates.length = 0;
    flat.length = 0;
    const rt = new Table({
      head: ['streaming round (fresh process)', 'baseline RSS MB', 'peak RSS MB (VmHWM)', 'peak − baseline', '÷ one model', 'round s'],
      colAligns: ['left', 'right', 'right', 'right', 'right', 'right'],
    });
    for (const mode of Object.keys(STREAM_MODES) as StreamMode[]) {
      const r = await runChild(mode, file);
      const peak = Math.max(r.hwm, r.peakSampledRss);
      rt.push([
        STREAM_MODES[mode],
        fmt(MB(r.baselineRss)), fmt(MB(peak)), fmt(MB(peak - r.baselineRss)), fmt((peak - r.baselineRss) / MODEL_BYTES, 2), fmt(r.ms / 1000, 2),
      ]);
    }
    console.log(rt.toString());
    console.log('  target: peak − baseline ≤ 3× one model.');
    await strategyRss(baseFile);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--stream') {
  streamingChild(process.argv[3] as StreamMode, process.argv[4]!);
} else if (process.argv[2] === '--rss') {
  rssChild(process.argv[3]!, Number(process.argv[4]), process.argv[5]!);
} else {
  (process.env.BENCH_PARTS === 'rss' ? rssOnly() : main()).catch((e: Error) => {
    console.error(e.stack ?? e.message);
    process.exitCode = 1;
  });
}
