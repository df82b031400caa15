/**
 * `npm run bench:sites`: N lightweight protocol-level sites against one real coordinator process (issue 15, scale).
 *
 * Each site is a real enrolled site talking the real protocol through the site's own transport
 * (site-agent/transport: FederationClient, uploadUpdate) — TLS with the pinned CA, a fresh signed token on every
 * call, heartbeats at the interval the coordinator names (5 s up to 200 sites, less often beyond), the task stream, the model download and the update upload — but trains nothing: it
 * waits `--train-s` seconds and sends the global model back as its update. Many sites share a worker process
 * (`--workers`), so 1,000 sites fit on a small machine; the coordinator is `medfl coordinator start`, as deployed.
 *
 * With `--idle-s S`, for each N first what N connected sites cost while no round runs (CPU of the coordinator and
 * of the site workers over S seconds, heartbeats per second).
 * For each N it prints: round overhead (round open to close, minus the simulated training time), the coordinator's
 * peak RSS and CPU seconds, heartbeat / download / upload latency percentiles, and failures.
 *
 *   npm run bench:sites -- [--sites 10,100,1000] [--model-mb 1] [--train-s 2] [--rounds 2] [--workers 4] [--out DIR]
 *                          [--max-downloads N] [--max-uploads N] [--max-waiting-uploads N]   (coordinator.json transfers)
 *                          [--idle-s S] [--cpu-profile] [--worker-cpu-profile] [--coordinator-node-options=--heapsnapshot-signal=SIGUSR2]
 *                          [--worker-default-heap]   (the site workers with V8's default heap limits, for comparison)
 *
 * The coordinator runs with bench/coordinator-probe.mjs loaded, which samples its memory breakdown once a second
 * (memory-N.jsonl in the work dir); the table gives it at its peak RSS and just before the first round opened (all
 * sites connected, no transfer yet). `--cpu-profile` writes the coordinator's CPU profile to coordinator-N.cpuprofile
 * in the work dir (`--worker-cpu-profile`: the site workers' profiles, in worker-profiles-N); `--coordinator-node-options` adds Node options allowed in NODE_OPTIONS (snapshots land there too).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { constants as gcKinds, PerformanceObserver } from 'node:perf_hooks';
import { stringify } from 'yaml';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite, type Invitation } from '../coordinator/admin.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { freePort, spawnMedfl, waitFor } from '../cli/processes.ts';
import { PlanSchema } from '../shared/plan/schema.ts';
import { generatedSiteName } from '../shared/protocol/site-names.ts';
import { BASE_HEARTBEAT_MS } from '../shared/protocol/heartbeat.ts';
import { startHeartbeatLoop } from '../site-agent/transport/heartbeat-loop.ts';
import { enrollSite } from '../site-agent/enroll.ts';
import { SiteHome } from '../site-agent/home.ts';
import { FederationClient, type WireChunk, type WireTask } from '../site-agent/transport/client.ts';
import { uploadUpdate } from '../site-agent/transport/upload.ts';
import { growHeapForStreaming } from '../shared/util/heap-growth.ts';

const PROBE = join(import.meta.dirname, 'coordinator-probe.mjs');
const say = (s: string) => process.stdout.write(`${s}\n`);
/** An idle worker's line once each of its sites has beaten once (--idle-s). */
const IDLE_READY = 'IDLE-READY';
/**
 * Models this worker's sites downloaded and checked, by hash. Every site downloads and checks its own copy, but the
 * worker keeps one: 250 sites holding 250 copies of the same megabyte only fed the worker's garbage collector (the
 * sites share the machine with the coordinator, so their waste showed in its round times).
 */
const checkedModels = new Map<string, Buffer>();

/** What one worker reports (JSON on its stdout's last line). */
interface WorkerReport {
  heartbeatMs: number[];
  downloadMs: number[];
  uploadMs: number[];
  failures: Record<string, number>;
  finishedSites: number;
  /** The worker process's own user + system CPU seconds: the simulated sites share the machine with the coordinator. */
  cpuS?: number;
  /** Full garbage collections the worker ran. */
  fullGcs?: number;
}

const role = process.argv[2];
if (role === '--enrol-worker') await enrolWorker(process.argv[3]!);
else if (role === '--run-worker') await runWorker(process.argv[3]!);
else if (role === '--idle-worker') await idleWorker(process.argv[3]!);
else await main();

// ---- parent ----

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      sites: { type: 'string', default: '10,100,1000' },
      'model-mb': { type: 'string', default: '1' },
      'train-s': { type: 'string', default: '2' },
      rounds: { type: 'string', default: '2' },
      workers: { type: 'string', default: '4' },
      'max-downloads': { type: 'string' },
      'max-uploads': { type: 'string' },
      'max-waiting-uploads': { type: 'string' },
      'coordinator-node-options': { type: 'string', default: '' },
      'cpu-profile': { type: 'boolean', default: false },
      'worker-cpu-profile': { type: 'boolean', default: false },
      'idle-s': { type: 'string', default: '0' },
      'worker-default-heap': { type: 'boolean', default: false },
      out: { type: 'string' },
    },
  });
  const counts = a.sites.split(',').map((s) => Number(s.trim()));
  const modelMb = Number(a['model-mb']);
  const trainS = Number(a['train-s']);
  const rounds = Number(a.rounds);
  const workers = Number(a.workers);
  const idleS = Number(a['idle-s']);
  if (!counts.every((n) => Number.isInteger(n) && n >= 1) || !(modelMb > 0) || !(trainS >= 0) || !(rounds >= 1) || !(workers >= 1) || !(idleS >= 0)) throw new Error('bad arguments');
  const maxN = Math.max(...counts);
  // tiny3d's encoder holds ~162·w² float32 values: pick the width that gives the model size asked for.
  const width = Math.max(1, Math.round(Math.sqrt((modelMb * 1024 * 1024) / 4 / 162)));
  const work = a.out ? resolve(a.out) : mkdtempSync(join(tmpdir(), 'medfl-bench-sites-'));
  mkdirSync(work, { recursive: true });
  const logs = join(work, 'logs');
  mkdirSync(logs, { recursive: true });
  const port = await freePort();
  const template = join(work, 'coordinator-template');
  const planFor = (minSites: number, totalRounds: number) =>
    PlanSchema.parse({
      name: 'bench-sites',
      model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width, seed: 1 },
      rounds: totalRounds,
      minSites,
      gatherSeconds: 1,
      waitForSitesSeconds: 3600,
      roundDeadlineSeconds: 1800,
      local: { steps: 1, batchSize: 1, learningRate: 0.001 },
      share: { parts: ['encoder'] },
    });

  // Transfer limits for coordinator.json; those not given are derived from memory by the coordinator (it logs them).
  const transfers = Object.fromEntries(
    (
      [
        ['maxDownloads', a['max-downloads']],
        ['maxUploads', a['max-uploads']],
        ['maxWaitingUploads', a['max-waiting-uploads']],
      ] as const
    )
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => [k, Number(v)]),
  );
  say(`bench:sites — sites ${counts.join(', ')}; model ~${modelMb} MB (tiny3d width ${width}); simulated training ${trainS} s; ${rounds} rounds each; ${workers} site worker processes; transfer limits ${Object.keys(transfers).length > 0 ? JSON.stringify(transfers) : 'derived from memory'}; work dir ${work}`);
  const home = await CoordinatorHome.init(template, { hosts: ['localhost', '127.0.0.1'], port });
  if (Object.keys(transfers).length > 0) writeFileSync(home.configPath, JSON.stringify({ ...home.config(), transfers }, null, 2));
  // No round opens while the sites enrol: more sites are needed than will ever connect.
  writeFileSync(home.planPath, stringify(JSON.parse(JSON.stringify(planFor(maxN + 1, 1)))));
  const names = Array.from({ length: maxN }, (_, i) => generatedSiteName(i));
  const t0 = Date.now();
  const invitations = names.map((n) => addSite(template, n, { ttlSeconds: 7200 }));
  let coordinator = await startCoordinator(template, port, join(logs, 'coordinator-enrol.log'));
  try {
    await runWorkers(workers, invitations, (slice, i) => {
      const file = join(work, `enrol-${i}.json`);
      writeFileSync(file, JSON.stringify({ port, sitesDir: join(work, 'sites'), invitations: slice }));
      return ['--enrol-worker', file];
    });
  } finally {
    await stop(coordinator);
  }
  say(`enrolled ${maxN} sites in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

  const measureIdle = (n: number) => measureIdleWith({ n, idleS, template, work, logs, port, workers, names });
  const results: string[][] = [];
  const idleLines: string[] = [];
  for (const n of counts) {
    if (idleS > 0) {
      idleLines.push(await measureIdle(n));
      say(idleLines.at(-1)!);
    }
    const dir = join(work, `coordinator-${n}`);
    rmSync(dir, { recursive: true, force: true });
    cpSync(template, dir, { recursive: true });
    writeFileSync(join(dir, 'plan.yaml'), stringify(JSON.parse(JSON.stringify(planFor(n, rounds)))));
    const coordLog = join(logs, `coordinator-${n}.log`);
    const probeFile = join(work, `memory-${n}.jsonl`);
    rmSync(probeFile, { force: true });
    const nodeOptions = [`--import=${PROBE}`, `--diagnostic-dir=${work}`, a['coordinator-node-options']].join(' ');
    const profile = a['cpu-profile'] ? { MEDFL_BENCH_CPU_PROFILE: join(work, `coordinator-${n}.cpuprofile`) } : {};
    coordinator = await startCoordinator(dir, port, coordLog, { NODE_OPTIONS: nodeOptions, MEDFL_BENCH_PROBE_FILE: probeFile, ...profile });
    const pid = coordinator.pid!;
    let peakRss = 0;
    const sampler = setInterval(() => (peakRss = Math.max(peakRss, rssBytes(pid))), 200);
    const cpuBefore = cpuSeconds(pid);
    const started = Date.now();
    let reports: WorkerReport[];
    try {
      reports = await runWorkers(workers, names.slice(0, n), (slice, i) => {
        const file = join(work, `run-${n}-${i}.json`);
        writeFileSync(file, JSON.stringify({ sitesDir: join(work, 'sites'), sites: slice, trainS, timeoutMs: 30 * 60_000, defaultHeap: a['worker-default-heap'] }));
        return ['--run-worker', file];
      }, a['worker-cpu-profile'] ? ['--cpu-prof', `--cpu-prof-dir=${join(work, `worker-profiles-${n}`)}`] : []);
    } finally {
      clearInterval(sampler);
    }
    peakRss = Math.max(peakRss, peakRssBytes(pid));
    const cpu = cpuSeconds(pid) - cpuBefore;
    const wall = (Date.now() - started) / 1000;
    await stop(coordinator);
    const store = new CoordinatorStore(join(dir, 'state.db'));
    const rows = store.listRounds();
    store.close();
    // Its rounds hold N model-sized updates each (2 GB at 1,000 sites × 1 MB × 2 rounds): kept only where --out asks.
    if (!a.out) rmSync(dir, { recursive: true, force: true });
    const closed = rows.filter((r) => r.state === 'closed');
    const overhead = closed.map((r) => (r.closedAt! - r.openedAt) / 1000 - trainS);
    const all = (k: keyof Pick<WorkerReport, 'heartbeatMs' | 'downloadMs' | 'uploadMs'>) => reports.flatMap((r) => r[k]);
    const failures: Record<string, number> = {};
    for (const r of reports) for (const [k, v] of Object.entries(r.failures)) failures[k] = (failures[k] ?? 0) + v;
    const failedRounds = rows.filter((r) => r.state === 'failed').length;
    if (failedRounds) failures.roundsFailed = failedRounds;
    const unfinished = n - reports.reduce((s, r) => s + r.finishedSites, 0);
    if (unfinished) failures.sitesNotFinished = unfinished;
    const memory = memoryBreakdown(probeFile, rows[0]?.openedAt);
    results.push([
      String(n),
      `${closed.length}/${rounds}`,
      overhead.map((o) => o.toFixed(1)).join(' / ') || '—',
      `${(peakRss / 1024 / 1024).toFixed(0)} MiB`,
      memory.connected,
      memory.peak,
      `${cpu.toFixed(1)} s in ${wall.toFixed(0)} s`,
      `${reports.reduce((s, r) => s + (r.cpuS ?? 0), 0).toFixed(1)} s`,
      `${memory.fullGcs ?? '—'} / ${reports.reduce((s, r) => s + (r.fullGcs ?? 0), 0)}`,
      `${pct(all('heartbeatMs'))} (${all('heartbeatMs').length})`,
      pct(all('downloadMs')),
      pct(all('uploadMs')),
      Object.keys(failures).length ? Object.entries(failures).map(([k, v]) => `${k} ${v}`).join(', ') : '0',
    ]);
    say(`N=${n}: ${results.at(-1)!.join(' | ')}`);
  }
  // The sites' folders (keys, tokens, downloaded models): kept only where --out asks.
  if (!a.out) rmSync(join(work, 'sites'), { recursive: true, force: true });
  say('');
  say('| sites | rounds closed | round overhead s (each round) | coordinator peak RSS | MiB rss/heap used/external/native rest, all connected before round 1 | the same at peak RSS | coordinator CPU | site workers CPU | full GCs, coordinator / site workers | heartbeat ms p50/p95/p99 (beats) | download ms p50/p95/p99 | upload ms p50/p95/p99 | failures |');
  say('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of results) say(`| ${r.join(' | ')} |`);
  for (const l of idleLines) say(`\n${l}`);
  say(`\nwork dir (logs${a.out ? ', per-N coordinator folders' : '; the coordinator folders are kept only with --out'}): ${work}`);
}

/**
 * What N connected sites cost while no round runs: the sites subscribe and heartbeat against a coordinator whose plan
 * needs more sites than there are (so no round opens); once every site has beaten once, the coordinator's and the
 * workers' CPU are read over `idleS` seconds (Linux /proc).
 */
async function measureIdleWith(o: { n: number; idleS: number; template: string; work: string; logs: string; port: number; workers: number; names: string[] }): Promise<string> {
  const dir = join(o.work, `idle-${o.n}`);
  rmSync(dir, { recursive: true, force: true });
  cpSync(o.template, dir, { recursive: true });
  const coordinator = await startCoordinator(dir, o.port, join(o.logs, `coordinator-idle-${o.n}.log`));
  const children: ChildProcess[] = [];
  let ready = 0;
  let allReady!: () => void;
  const readyNow = new Promise<void>((r) => (allReady = r));
  const expected = Math.ceil(o.n / Math.ceil(o.n / o.workers));
  let reports: WorkerReport[];
  let window: { coordinator: number; sites: number; seconds: number };
  try {
    const running = runWorkers(
      o.workers,
      o.names.slice(0, o.n),
      (slice, i) => {
        const file = join(o.work, `idle-${o.n}-${i}.json`);
        writeFileSync(file, JSON.stringify({ sitesDir: join(o.work, 'sites'), sites: slice }));
        return ['--idle-worker', file];
      },
      [],
      (child) => {
        children.push(child);
        child.stdout!.on('data', (d: Buffer) => {
          if (d.toString().includes(IDLE_READY) && ++ready === expected) allReady();
        });
      },
    );
    await Promise.race([readyNow, running]);
    // Let the first beats' bookkeeping settle before the window opens.
    await new Promise((r) => setTimeout(r, 3000));
    const sitesCpu = () => children.reduce((t, c) => t + cpuSeconds(c.pid!), 0);
    const before = { coordinator: cpuSeconds(coordinator.pid!), sites: sitesCpu(), at: Date.now() };
    await new Promise((r) => setTimeout(r, o.idleS * 1000));
    window = { coordinator: cpuSeconds(coordinator.pid!) - before.coordinator, sites: sitesCpu() - before.sites, seconds: (Date.now() - before.at) / 1000 };
    for (const c of children) c.kill('SIGTERM');
    reports = await running;
  } finally {
    await stop(coordinator);
    rmSync(dir, { recursive: true, force: true });
  }
  const beats = reports.reduce((t, r) => t + r.heartbeatMs.length, 0);
  const failures = reports.flatMap((r) => Object.entries(r.failures).map(([k, v]) => `${k} ${v}`));
  const pc = (cpu: number) => `${((100 * cpu) / window.seconds).toFixed(1)} %`;
  return `idle, ${o.n} sites connected, ${window.seconds.toFixed(0)} s: coordinator ${pc(window.coordinator)} of a core, site workers ${pc(window.sites)}; ${(beats / window.seconds).toFixed(1)} heartbeats/s (p50/p95/p99 ${pct(reports.flatMap((r) => r.heartbeatMs))} ms); failures ${failures.length ? failures.join(', ') : '0'}`;
}

async function startCoordinator(dir: string, port: number, log: string, env: NodeJS.ProcessEnv = {}): Promise<ChildProcess> {
  const c = spawnMedfl(['coordinator', 'start', '--dir', dir, '--port', String(port), '--bind', '127.0.0.1'], log, { MEDFL_LOG_LEVEL: 'info', ...env });
  await waitFor(() => {
    if (c.exitCode !== null) throw new Error(`the coordinator exited with ${c.exitCode}; see ${log}`);
    return existsSync(log) && readFileSync(log, 'utf8').includes('listening on port');
  }, 600_000, 'the coordinator to listen');
  return c;
}

async function stop(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  await gone;
}

/** Splits `items` over `count` worker processes (this file, in a worker role) and collects their reports. */
async function runWorkers<T>(
  count: number,
  items: T[],
  args: (slice: T[], i: number) => string[],
  nodeFlags: string[] = [],
  started?: (child: ChildProcess) => void,
): Promise<WorkerReport[]> {
  const per = Math.ceil(items.length / count);
  const jobs: Promise<WorkerReport>[] = [];
  for (let i = 0; i * per < items.length; i++) {
    const child = spawn(process.execPath, [...nodeFlags, '--import', 'tsx', import.meta.filename, ...args(items.slice(i * per, (i + 1) * per), i)], { stdio: ['ignore', 'pipe', 'inherit'] });
    started?.(child);
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    jobs.push(
      new Promise((res, rej) =>
        // 'close', not 'exit': 'exit' can fire before the last of the worker's stdout (its report) has been read,
        // which under load cut a report short and stopped the whole bench on parsing it.
        child.once('close', (code) => {
          const last = out.trim().split('\n').at(-1) ?? '';
          if (code !== 0) return rej(new Error(`site worker ${i} exited with ${code}: ${out.slice(-2000)}`));
          try {
            res(JSON.parse(last) as WorkerReport);
          } catch {
            rej(new Error(`site worker ${i} exited cleanly but its last line is not a report: ${last.slice(0, 200)}`));
          }
        }),
      ),
    );
  }
  return Promise.all(jobs);
}

/**
 * The coordinator's memory (coordinator-probe.mjs samples) just before `roundOpenedAt` and at its largest RSS:
 * RSS / V8 heap used / external (Buffers, ArrayBuffers) / the native rest (RSS − heap total − external: TLS,
 * HTTP/2 sessions, malloc, code), in MiB.
 */
function memoryBreakdown(file: string, roundOpenedAt: number | undefined): { connected: string; peak: string; fullGcs: number | undefined } {
  if (!existsSync(file)) return { connected: '—', peak: '—', fullGcs: undefined };
  const samples = readFileSync(file, 'utf8')
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { t: number; rss: number; heapTotal: number; heapUsed: number; external: number; fullGcs?: number });
  const mib = (b: number) => (b / 1024 / 1024).toFixed(0);
  const show = (s: (typeof samples)[number] | undefined) =>
    s ? `${mib(s.rss)}/${mib(s.heapUsed)}/${mib(s.external)}/${mib(Math.max(0, s.rss - s.heapTotal - s.external))}` : '—';
  const before = roundOpenedAt === undefined ? undefined : samples.filter((s) => s.t < roundOpenedAt).at(-1);
  const peak = samples.reduce<(typeof samples)[number] | undefined>((p, s) => (!p || s.rss > p.rss ? s : p), undefined);
  // From the last sample before round 1 to the last one taken (once a second, so the final second may be missed).
  const last = samples.at(-1)?.fullGcs;
  return { connected: show(before), peak: show(peak), fullGcs: last === undefined ? undefined : last - (before?.fullGcs ?? 0) };
}

function pct(xs: number[]): string {
  if (xs.length === 0) return '—';
  const s = [...xs].sort((x, y) => x - y);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
  return `${q(0.5).toFixed(0)}/${q(0.95).toFixed(0)}/${q(0.99).toFixed(0)}`;
}

function rssBytes(pid: number): number {
  return statusKb(pid, 'VmRSS') * 1024;
}
function peakRssBytes(pid: number): number {
  return statusKb(pid, 'VmHWM') * 1024;
}
function statusKb(pid: number, field: string): number {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}
/** User + system CPU seconds of a process (Linux /proc; the clock tick is 100 Hz on every Linux we run). */
function cpuSeconds(pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

// ---- workers ----

async function enrolWorker(file: string): Promise<void> {
  const job = JSON.parse(readFileSync(file, 'utf8')) as { port: number; sitesDir: string; invitations: Invitation[] };
  let next = 0;
  const one = async (): Promise<void> => {
    while (next < job.invitations.length) {
      const inv = job.invitations[next++]!;
      await enrollSite({ coordinator: `localhost:${job.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(job.sitesDir, inv.site) });
    }
  };
  // Few at once: on a loaded machine many parallel enrolments ran past their 15 s deadline (a one-time token cannot be retried).
  await Promise.all(Array.from({ length: 2 }, one));
  const report: WorkerReport = { heartbeatMs: [], downloadMs: [], uploadMs: [], failures: {}, finishedSites: job.invitations.length };
  say(JSON.stringify(report));
}

async function runWorker(file: string): Promise<void> {
  const job = JSON.parse(readFileSync(file, 'utf8')) as { sitesDir: string; sites: string[]; trainS: number; timeoutMs: number; defaultHeap?: boolean };
  // A worker streams hundreds of sites' models and updates through one small heap, as the coordinator does, and V8's
  // default limits had it run a full collection every 10–20 MB moved (heap-growth.ts): waste that a real site, moving
  // one model, does not have, taken from the two cores the coordinator is measured on. --worker-default-heap keeps them.
  if (!job.defaultHeap) growHeapForStreaming();
  let fullGcs = 0;
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if ((e as { detail?: { kind?: number } }).detail?.kind === gcKinds.NODE_PERFORMANCE_GC_MAJOR) fullGcs++;
  }).observe({ entryTypes: ['gc'] });
  const report: WorkerReport = { heartbeatMs: [], downloadMs: [], uploadMs: [], failures: {}, finishedSites: 0 };
  const fail = (what: string) => (report.failures[what] = (report.failures[what] ?? 0) + 1);
  const done = await Promise.race([
    Promise.all(job.sites.map((name, i) => runSite(join(job.sitesDir, name), job.trainS, i, report, fail))),
    new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), job.timeoutMs).unref()),
  ]);
  if (done === 'timeout') fail('workerTimeout');
  const cpu = process.cpuUsage();
  report.cpuS = (cpu.user + cpu.system) / 1e6;
  report.fullGcs = fullGcs;
  say(JSON.stringify(report));
  process.exit(0);
}

/** Sites that only subscribe and heartbeat; `IDLE_READY` once each has beaten once, the report on SIGTERM. */
async function idleWorker(file: string): Promise<void> {
  const job = JSON.parse(readFileSync(file, 'utf8')) as { sitesDir: string; sites: string[] };
  const report: WorkerReport = { heartbeatMs: [], downloadMs: [], uploadMs: [], failures: {}, finishedSites: 0 };
  const fail = (what: string) => (report.failures[what] = (report.failures[what] ?? 0) + 1);
  const stopped = new Promise((r) => process.once('SIGTERM', r));
  let stopping = false;
  let counting = false;
  const stops: (() => void)[] = [];
  await Promise.all(
    job.sites.map(async (name, i) => {
      const client = new FederationClient(new SiteHome(join(job.sitesDir, name)));
      await new Promise((r) => setTimeout(r, (i * 37) % BASE_HEARTBEAT_MS));
      const stream = client.subscribeTasks([]);
      stream.on('data', () => {});
      stream.on('error', () => stopping || fail('taskStreamDropped'));
      let first!: () => void;
      const beaten = new Promise<void>((r) => (first = r));
      stops.push(
        startHeartbeatLoop({
          beat: () => timedBeat(client, { state: 'idle', taskId: '' }, counting ? report : undefined).finally(first),
          onError: () => stopping || fail('heartbeat'),
        }),
      );
      await beaten;
    }),
  );
  counting = true;
  say(IDLE_READY);
  await stopped;
  stopping = true;
  for (const stopBeats of stops) stopBeats();
  const cpu = process.cpuUsage();
  report.cpuS = (cpu.user + cpu.system) / 1e6;
  say(JSON.stringify(report));
  process.exit(0);
}

/** One site until the coordinator says the federation is finished. */
async function runSite(dir: string, trainS: number, index: number, report: WorkerReport, fail: (what: string) => void): Promise<void> {
  const client = new FederationClient(new SiteHome(dir));
  // What the site is doing, as a real agent reports it: a site that heartbeats "idle, no task" while it works would be
  // offered its task again by the coordinator every 30 s (task-offers.ts), work a real site never causes.
  const status: SiteStatus = { state: 'idle', taskId: '' };
  // Spread the sites' first heartbeats over the base interval, as independent agents would be; then beat as the
  // agent does, at the interval the coordinator names (longer for many sites).
  await new Promise((r) => setTimeout(r, (index * 37) % BASE_HEARTBEAT_MS));
  const stopBeats = startHeartbeatLoop({ beat: () => timedBeat(client, status, report), onError: () => fail('heartbeat') });
  const handled = new Set<string>();
  try {
    await new Promise<void>((resolveSite) => {
      const subscribe = () => {
        const stream = client.subscribeTasks([]);
        stream.on('data', (task: WireTask) => {
          if (task.kind === 'FINISHED') {
            report.finishedSites++;
            stream.cancel();
            resolveSite();
            return;
          }
          if (task.kind !== 'TRAIN' || handled.has(task.taskId)) return;
          handled.add(task.taskId);
          void train(client, task, trainS, report, fail, status)
            .catch((e: Error) => {
              fail(`task: ${e.message.slice(0, 80)}`);
              // As the agent does: the coordinator offers the task again to a selected site that reports idle.
              handled.delete(task.taskId);
            })
            .finally(() => Object.assign(status, { state: 'idle', taskId: '' }));
        });
        stream.on('error', (e: { code?: number }) => {
          if (e.code === 1) return; // cancelled by us
          fail('taskStreamDropped');
          setTimeout(subscribe, 1000);
        });
      };
      subscribe();
    });
  } finally {
    stopBeats();
    client.close();
  }
}

/** One heartbeat, its latency recorded in `report` (where given); resolves with the interval the coordinator named. */
async function timedBeat(client: FederationClient, status: SiteStatus, report: WorkerReport | undefined): Promise<number> {
  const t = performance.now();
  const r = await client.heartbeat({ ...status, progress: 0, engine: 'bench' });
  report?.heartbeatMs.push(performance.now() - t);
  return r.nextHeartbeatMs;
}

/** A site's state as its heartbeats report it. */
interface SiteStatus {
  state: 'idle' | 'downloading' | 'training' | 'uploading';
  taskId: string;
}

async function train(client: FederationClient, task: WireTask, trainS: number, report: WorkerReport, fail: (what: string) => void, status: SiteStatus): Promise<void> {
  const t = performance.now();
  Object.assign(status, { state: 'downloading', taskId: task.taskId });
  const model = await download(client, task.modelHash, fail);
  report.downloadMs.push(performance.now() - t);
  status.state = 'training';
  await new Promise((r) => setTimeout(r, trainS * 1000));
  status.state = 'uploading';
  const u = performance.now();
  const ack = await uploadUpdate(() => client, { updateId: `bench-${task.taskId}`, taskId: task.taskId, round: task.round, baseModelHash: task.modelHash, numSamples: 4, payload: model }, undefined, { until: task.deadlineUnixMs });
  report.uploadMs.push(performance.now() - u);
  if (!ack.accepted) fail(`uploadRefused: ${ack.reason.slice(0, 80)}`);
}

/** The model's bytes, resuming from the last offset on a failure (at most 5 tries), checked against its hash. */
async function download(client: FederationClient, hash: string, fail: (what: string) => void): Promise<Buffer> {
  const sha = createHash('sha256');
  // The chunks are kept only until this worker holds a checked copy of the model.
  const parts: Buffer[] | undefined = checkedModels.has(hash) ? undefined : [];
  let have = 0;
  for (let attempt = 1; ; attempt++) {
    try {
      await new Promise<void>((res, rej) => {
        const s = client.downloadModel(hash, have);
        s.on('data', (c: WireChunk) => {
          // A view of the message grpc-js assembled for this chunk alone: hashed, and kept as it is where needed.
          sha.update(c.data);
          parts?.push(c.data);
          have += c.data.length;
        });
        s.on('error', rej);
        s.on('end', () => res());
      });
      if (sha.digest('hex') !== hash) throw new Error('downloaded model does not match its hash');
      const model = checkedModels.get(hash) ?? Buffer.concat(parts!);
      checkedModels.set(hash, model);
      return model;
    } catch (e) {
      fail('downloadAttempt');
      if (attempt >= 5) throw e;
      await new Promise((r) => setTimeout(r, 500 * attempt));
    }
  }
}
