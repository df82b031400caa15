/**
 * Model download and update upload over a shaped WAN link, on the site's one grpc-js connection:
 *
 *   1. one site, 132 MB model (tiny3d width 451, encoder shared), through a userspace relay
 *      (test/helpers/shaped-relay.ts: rate with a bounded queue, one-way delay) at 100 Mbit/s · 40 ms RTT and at
 *      1 Gbit/s · 20 ms RTT: achieved / link rate for the download (ModelCache.ensure: written, fsynced, hashed) and for
 *      the upload (uploadOnce: header → chunks → trailer → the coordinator's durable ack); "wire" ends when the relay
 *      has delivered the last byte, "done" when the file is in the site's cache / the ack is back;
 *   2. 20 sites uploading the same size at once straight to the coordinator (loopback, no relay): the coordinator
 *      process's CPU seconds per GB received (its own threads included: TLS, HTTP/2, gRPC, the file writer).
 *
 * BENCH_WINDOWS=grpc-default,widened runs part 1 once per HTTP/2 receive-window setting, in that order, in one run:
 * "widened" is what MedFL ships (the coordinator's 32 MiB `receiveWindow`, the site's 32 MiB
 * 'grpc-node.flow_control_window'); "grpc-default" leaves both at grpc-js's own 65,535 bytes (the coordinator through
 * coordinator.json's `receiveWindow: "grpc-default"`, the site's download on a channel without the option), which
 * measures what the widening buys.
 *
 * Three processes, as on real machines: the coordinator (--serve), the relay (--relay), and this one (the sites).
 * Rates are of model bytes (MB = 10^6 B; the TLS, HTTP/2 and gRPC framing on top is ~1 %).
 *
 *   npm run bench:wan
 *   BENCH_WIDTH=200 BENCH_SITES=5 npm run bench:wan     # smaller and quicker
 *   BENCH_LINKS=2,2,2 BENCH_SITES=0 npm run bench:wan    # the 1 Gbit/s link three times, no many-sites part
 *   BENCH_WINDOWS=grpc-default,widened BENCH_LINKS=1,2 BENCH_SITES=0 npm run bench:wan   # what the wide windows buy
 */
import * as grpc from '@grpc/grpc-js';
import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { pino } from 'pino';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite } from '../coordinator/admin.ts';
import { startCoordinator } from '../coordinator/coordinator.ts';
import { GRPC_DEFAULT_WINDOW } from '../coordinator/server/receive-window.ts';
import { enrollSite } from '../site-agent/enroll.ts';
import { channelCredentials, channelOptions, coordinatorTarget, parseAddress } from '../site-agent/transport/connection.ts';
import { SiteHome } from '../site-agent/home.ts';
import { FederationClient, type WireTask } from '../site-agent/transport/client.ts';
import { ModelCache } from '../site-agent/transport/model-cache.ts';
import { uploadOnce } from '../site-agent/transport/upload.ts';
import { loadPlanFile } from '../shared/plan/load.ts';
import { loadProto } from '../shared/protocol/grpc.ts';
import { loadSiteKey, siteCallCredentials } from '../shared/security/site-identity.ts';
import { architectureFor } from '../shared/model/registry.ts';
import { sharedParams } from '../shared/model/sharing.ts';
import { encodeSafetensors } from '../shared/tensors/safetensors.ts';
import { makeBundle } from '../shared/tensors/bundle.ts';
import { link, startShapedRelay, type LinkShape } from '../test/helpers/shaped-relay.ts';

const WIDTH = Number(process.env.BENCH_WIDTH ?? 451);
const SITES = Number(process.env.BENCH_SITES ?? 20);
const ALL_LINKS: { name: string; mbit: number; rttMs: number }[] = [
  { name: '100 Mbit/s, 40 ms RTT', mbit: 100, rttMs: 40 },
  { name: '1 Gbit/s, 20 ms RTT', mbit: 1000, rttMs: 20 },
  // The machine's own ceiling through the same three processes: what the CPU left to them allows.
  { name: 'relay without shaping (ceiling)', mbit: 0, rttMs: 0 },
];
/** BENCH_LINKS=1,2: only those rows (1-based), e.g. to repeat one. */
const LINKS = process.env.BENCH_LINKS ? process.env.BENCH_LINKS.split(',').map((i) => ALL_LINKS[Number(i) - 1]!) : ALL_LINKS;
/** The receive windows part 1 runs with, in this order (header). */
type WindowMode = 'widened' | typeof GRPC_DEFAULT_WINDOW;
const WINDOWS = (process.env.BENCH_WINDOWS ?? 'widened').split(',').map((w): WindowMode => {
  if (w === 'widened' || w === GRPC_DEFAULT_WINDOW) return w;
  throw new Error(`BENCH_WINDOWS: '${w}' is neither 'widened' nor '${GRPC_DEFAULT_WINDOW}'`);
});

type ChildMsg = { type: 'ready'; port: number } | { type: 'cpu'; id: number; cpuMs: number } | { type: 'relay'; id: number; up: number; down: number; at?: number };
type ParentMsg = { type: 'cpu'; id: number } | { type: 'relay'; id: number; direction: 'up' | 'down'; total: number };

const fmt = (x: number, d = 0): string => x.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });

function planYaml(rounds: number, minSites: number): string {
  return [
    'name: wan-bench',
    `model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: ${WIDTH}, seed: 1 }`,
    `rounds: ${rounds}`,
    `minSites: ${minSites}`,
    `sitesPerRound: ${minSites}`,
    'roundDeadlineSeconds: 1800',
    'waitForSitesSeconds: 1800',
    `gatherSeconds: ${minSites > 1 ? 3 : 0}`,
    'local: { steps: 1, batchSize: 2, learningRate: 0.003 }',
    'share: { parts: [encoder] }',
    '',
  ].join('\n');
}

/** Child: a coordinator on loopback; answers CPU-time questions (process.cpuUsage counts every thread). */
async function serve(dir: string): Promise<void> {
  const coord = await startCoordinator({ dir, port: 0, host: '127.0.0.1', log: pino({ level: 'warn' }) });
  process.on('message', (m: ParentMsg) => {
    if (m.type === 'cpu') {
      const u = process.cpuUsage();
      process.send!({ type: 'cpu', id: m.id, cpuMs: (u.user + u.system) / 1000 } satisfies ChildMsg);
    }
  });
  // Exit normally on SIGTERM so that `node --cpu-prof` (inherited by this child) writes its profile.
  process.once('SIGTERM', () => process.exit(0));
  process.send!({ type: 'ready', port: coord.port } satisfies ChildMsg);
}

/** Child: the relay in front of the coordinator at `port`. */
async function relay(port: number, shape: LinkShape): Promise<void> {
  const r = await startShapedRelay({ host: '127.0.0.1', port }, shape);
  process.on('message', (m: ParentMsg) => {
    if (m.type === 'relay') process.send!({ type: 'relay', id: m.id, up: r.bytes.up, down: r.bytes.down, at: r.reachedAt(m.direction, m.total) } satisfies ChildMsg);
    if (m.type === 'cpu') {
      const u = process.cpuUsage();
      process.send!({ type: 'cpu', id: m.id, cpuMs: (u.user + u.system) / 1000 } satisfies ChildMsg);
    }
  });
  process.once('SIGTERM', () => process.exit(0));
  process.send!({ type: 'ready', port: r.port } satisfies ChildMsg);
}

type RelayAnswer = Extract<ChildMsg, { type: 'relay' }>;

async function child(args: string[]): Promise<{
  proc: ChildProcess;
  port: number;
  cpuMs: () => Promise<number>;
  /** Relay only: bytes delivered each way, and when `direction` first reached `total` (ms since the epoch). */
  relay: (direction: 'up' | 'down', total: number) => Promise<RelayAnswer>;
}> {
  const proc = fork(fileURLToPath(import.meta.url), args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const waiting = new Map<number, (m: ChildMsg) => void>();
  let next = 0;
  const port = await new Promise<number>((resolve, reject) => {
    proc.on('message', (m: ChildMsg) => {
      if (m.type === 'ready') resolve(m.port);
      else waiting.get(m.id)?.(m);
    });
    proc.once('exit', (code) => reject(new Error(`${args[0]} process exited early (${code})`)));
  });
  const ask = (m: { type: 'cpu' } | { type: 'relay'; direction: 'up' | 'down'; total: number }) =>
    new Promise<ChildMsg>((resolve) => {
      const id = next++;
      waiting.set(id, resolve);
      proc.send({ ...m, id } as ParentMsg);
    });
  return {
    proc,
    port,
    cpuMs: async () => ((await ask({ type: 'cpu' })) as Extract<ChildMsg, { type: 'cpu' }>).cpuMs,
    relay: async (direction, total) => (await ask({ type: 'relay', direction, total })) as RelayAnswer,
  };
}

type Child = Awaited<ReturnType<typeof child>>;
interface CpuSnapshot { site: number; coordinator: number; relay: number }
async function cpuNow(coord: Child, relay: Child): Promise<CpuSnapshot> {
  const u = process.cpuUsage();
  return { site: (u.user + u.system) / 1000, coordinator: await coord.cpuMs(), relay: await relay.cpuMs() };
}
function cpuSince(a: CpuSnapshot, b: CpuSnapshot): string {
  return [b.site - a.site, b.coordinator - a.coordinator, b.relay - a.relay].map((ms) => fmt(ms / 1000, 1)).join(' · ');
}

/** Wall-clock ms comparable across processes. */
const now = (): number => performance.timeOrigin + performance.now();

async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  proc.kill('SIGTERM');
  await once(proc, 'exit');
}

/** The next TRAIN task after round `after` on a site's task stream. */
function taskStream(c: FederationClient): { next(after: number): Promise<WireTask>; close(): void } {
  let latest: WireTask | undefined;
  let wake: (() => void) | undefined;
  const s = c.subscribeTasks([]);
  s.on('error', () => undefined);
  s.on('data', (t: WireTask) => {
    if (t.kind === 'TRAIN') latest = t;
    wake?.();
  });
  return {
    async next(after) {
      while (!latest || latest.round <= after) await new Promise<void>((r) => (wake = r));
      return latest;
    },
    close: () => s.cancel(),
  };
}

/**
 * The site's downloads on a channel with grpc-js's own receive window: the site's channel options without
 * 'grpc-node.flow_control_window', the same credentials and token. Only downloadModel, which ModelCache.ensure uses.
 */
function siteWithGrpcDefaultWindow(home: SiteHome): { downloads: FederationClient; close(): void } {
  const config = home.config();
  const { host, port } = parseAddress(config.coordinator);
  const creds = grpc.credentials.combineChannelCredentials(
    channelCredentials(host, home.caPem(), home.clientCertificate()),
    siteCallCredentials({ siteName: config.siteName, federationId: config.federationId, privateKey: loadSiteKey(home.dir).privateKey }),
  );
  const { 'grpc-node.flow_control_window': _window, ...options } = channelOptions(host);
  const federation = new (loadProto().Federation)(coordinatorTarget(host, port), creds, options);
  const downloads = { downloadModel: (modelHash: string, offset: number) => federation.DownloadModel({ modelHash, offset }) };
  return { downloads: downloads as unknown as FederationClient, close: () => federation.close() };
}

/** A valid update for the plan (its shared tensors, shifted a little), safetensors-encoded. */
function updatePayload(planPath: string): Buffer {
  const plan = loadPlanFile(planPath);
  const arch = architectureFor(plan.model);
  const names = new Set(sharedParams(arch, plan.share).map((p) => p.name));
  const all = arch.init(1);
  return encodeSafetensors(makeBundle([...all.values()].filter((t) => names.has(t.name)).map((t) => ({ ...t, data: (t.data as Float32Array).map((v) => v + 1e-3) }))));
}

/**
 * Part 1 with one window setting: a coordinator of its own (coordinator.json's `receiveWindow` "grpc-default" or left
 * at its default), one site, and for each link a relay, a download and an upload. Returns the update it sent.
 */
async function oneSite(work: string, window: WindowMode, procs: ChildProcess[], rows: string[][], cpuRows: string[][]): Promise<Buffer> {
  const coordDir = join(work, `coordinator-${window}`);
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  if (window === GRPC_DEFAULT_WINDOW) writeFileSync(home.configPath, JSON.stringify({ ...home.config(), receiveWindow: GRPC_DEFAULT_WINDOW }));
  writeFileSync(home.planPath, planYaml(LINKS.length + 1, 1));
  const payload = updatePayload(home.planPath);
  const t0 = performance.now();
  const coord = await child(['--serve', coordDir]);
  procs.push(coord.proc);
  console.log(`coordinator up, windows ${window} (${fmt((performance.now() - t0) / 1000, 1)} s incl. writing the initial model)`);
  const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
  const siteDir = join(work, `site-a-${window}`);
  await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteDir });
  const siteHome = new SiteHome(siteDir);

  let round = 0;
  for (const l of LINKS) {
    const r = await child(['--relay', String(coord.port), JSON.stringify(link(l.mbit, l.rttMs))]);
    procs.push(r.proc);
    siteHome.saveConfig({ ...siteHome.config(), coordinator: `localhost:${r.port}` });
    const client = new FederationClient(siteHome);
    // The download runs on the site's own channel, or with "grpc-default" on one with grpc-js's receive window.
    const narrow = window === GRPC_DEFAULT_WINDOW ? siteWithGrpcDefaultWindow(siteHome) : undefined;
    try {
      await client.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' }); // connection up, features known
      const tasks = taskStream(client);
      const task = await tasks.next(round);
      round = task.round;
      const cache = new ModelCache(join(work, `cache-${window}-${round}`));
      // "wire": from the request to the moment the relay delivered the transfer's last byte (its byte count crossing
      // the size, framing included: ≤0.3 % early); "done": to the file renamed into the cache / to the ack.
      const downFrom = (await r.relay('down', 0)).down;
      const cpu0 = await cpuNow(coord, r);
      const d0 = now();
      const got = await cache.ensure(narrow?.downloads ?? client, task.modelHash, task.modelSize);
      const downDone = (now() - d0) / 1000;
      const downCpu = cpuSince(cpu0, await cpuNow(coord, r));
      const downWire = ((await r.relay('down', downFrom + task.modelSize)).at! - d0) / 1000;
      if (got !== task.modelSize) throw new Error(`download moved ${got} of ${task.modelSize} bytes`);
      rmSync(cache.dir, { recursive: true, force: true });
      const upFrom = (await r.relay('up', 0)).up;
      const cpu1 = await cpuNow(coord, r);
      const u0 = now();
      const ack = await uploadOnce(client, { updateId: `wan-bench-round-${round}`, taskId: task.taskId, round, baseModelHash: task.modelHash, numSamples: 4, payload });
      const upDone = (now() - u0) / 1000;
      const upCpu = cpuSince(cpu1, await cpuNow(coord, r));
      const upWire = ((await r.relay('up', upFrom + payload.length)).at! - u0) / 1000;
      if (!ack.accepted) throw new Error(`upload refused: ${ack.reason}`);
      tasks.close();
      // ÷ link (three decimals below 0.1, where grpc-js's own windows land), or Mbit/s where there is no link rate.
      const ratio = (bytes: number, s: number) => {
        const mbit = (bytes * 8) / s / 1e6;
        return l.mbit > 0 ? fmt(mbit / l.mbit, mbit / l.mbit < 0.1 ? 3 : 2) : `${fmt(mbit, 0)} Mbit/s`;
      };
      rows.push([
        window,
        l.name,
        `${fmt(task.modelSize / 1e6, 1)} MB`,
        `${fmt(downWire, 2)} s`,
        `**${ratio(task.modelSize, downWire)}**`,
        `${fmt(downDone, 2)} s (${ratio(task.modelSize, downDone)})`,
        `${fmt(upWire, 2)} s`,
        `**${ratio(payload.length, upWire)}**`,
        `${fmt(upDone, 2)} s (${ratio(payload.length, upDone)})`,
      ]);
      cpuRows.push([window, l.name, 'download', fmt(downDone, 2), downCpu], [window, l.name, 'upload', fmt(upDone, 2), upCpu]);
      console.log(`${window}, ${l.name}: download wire ${fmt(downWire, 2)} s, done ${fmt(downDone, 2)} s; upload wire ${fmt(upWire, 2)} s, ack ${fmt(upDone, 2)} s`);
    } finally {
      narrow?.close();
      client.close();
      await stop(r.proc);
    }
  }
  await stop(coord.proc);
  return payload;
}

async function main(): Promise<void> {
  const cpus = os.cpus();
  const grpcVersion = (createRequire(import.meta.url)('@grpc/grpc-js/package.json') as { version: string }).version;
  console.log(`machine: ${cpus.length} × ${cpus[0]?.model ?? '?'}, node ${process.version}, grpc-js ${grpcVersion}`);
  console.log(`load average at start: ${os.loadavg().map((x) => fmt(x, 2)).join(' ')} (other work on this machine slows every row)`);
  const work = mkdtempSync(join(os.tmpdir(), 'medfl-bench-wan-'));
  const procs: ChildProcess[] = [];
  try {
    // ── 1. one site through the shaped link, once per receive-window setting ──
    const rows: string[][] = [];
    const cpuRows: string[][] = [];
    let payload: Buffer | undefined;
    for (const window of WINDOWS) payload = await oneSite(work, window, procs, rows, cpuRows);
    console.log('\n| windows | link | model (= update) | download, wire | ÷ link | download, file ready (÷ link) | upload, wire | ÷ link | upload, to the ack (÷ link) |');
    console.log('|---|---|---|---|---|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.join(' | ')} |`);
    console.log('\nCPU seconds over each transfer (site = this process; the three processes share the machine):');
    console.log('| windows | link | transfer | wall s | site · coordinator · relay CPU s |');
    console.log('|---|---|---|---|---|');
    for (const r of cpuRows) console.log(`| ${r.join(' | ')} |`);

    // ── 2. many sites uploading at once: the coordinator's CPU per GB received ──
    if (SITES <= 0) return;
    const manyDir = join(work, 'coordinator-many');
    const manyHome = await CoordinatorHome.init(manyDir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(manyHome.planPath, planYaml(1, SITES));
    const many = await child(['--serve', manyDir]);
    procs.push(many.proc);
    const clients: FederationClient[] = [];
    const streams: ReturnType<typeof taskStream>[] = [];
    for (let i = 0; i < SITES; i++) {
      const name = `site-${String(i).padStart(2, '0')}`;
      const v = addSite(manyDir, name, { ttlSeconds: 600 });
      await enrollSite({ coordinator: `localhost:${many.port}`, token: v.token, caFingerprint: v.caFingerprint, dir: join(work, name) });
      const c = new FederationClient(new SiteHome(join(work, name)));
      clients.push(c);
      await c.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' });
      streams.push(taskStream(c));
    }
    const tasks = await Promise.all(streams.map((s) => s.next(0)));
    const c0 = await many.cpuMs();
    const w0 = performance.now();
    const update = payload ?? updatePayload(manyHome.planPath);
    const acks = await Promise.all(
      clients.map((c, i) => uploadOnce(c, { updateId: `many-sites-${i}`, taskId: tasks[i]!.taskId, round: tasks[i]!.round, baseModelHash: tasks[i]!.modelHash, numSamples: 4, payload: update })),
    );
    const wallS = (performance.now() - w0) / 1000;
    const cpuS = ((await many.cpuMs()) - c0) / 1000;
    const refused = acks.filter((a) => !a.accepted);
    if (refused.length > 0) throw new Error(`${refused.length} uploads refused: ${refused[0]!.reason}`);
    const gb = (update.length * SITES) / 1e9;
    console.log(
      `\n${SITES} sites uploading ${fmt(update.length / 1e6, 1)} MB each at once over loopback: ${fmt(gb, 2)} GB in ${fmt(wallS, 1)} s; ` +
        `coordinator CPU ${fmt(cpuS, 1)} s = ${fmt(cpuS / gb, 2)} CPU s per GB received (first byte to last ack: TLS, HTTP/2, gRPC, ` +
        `checks, file writer and hashing; folds that ran meanwhile included)`,
    );
    for (const s of streams) s.close();
    for (const c of clients) c.close();
  } finally {
    for (const p of procs) await stop(p).catch(() => undefined);
    rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--serve') {
  void serve(process.argv[3]!);
} else if (process.argv[2] === '--relay') {
  void relay(Number(process.argv[3]), JSON.parse(process.argv[4]!) as LinkShape);
} else {
  main().then(
    () => process.exit(0),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
}
