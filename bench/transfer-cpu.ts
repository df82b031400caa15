/**
 * Where the CPU goes per transferred byte: one real coordinator process (TLS, tokens, SQLite, grpc-js) and N sites
 * in this process on the site's own transport; first N uploads at once, then N downloads at once. Prints each
 * process's CPU seconds per GB moved (every thread: TLS, HTTP/2, gRPC, the file writer) and, with `--profile DIR`,
 * writes a CPU profile of the coordinator's main thread and of this process for each phase, with a table of the
 * top self-time frames.
 *
 *   npm run bench:transfer-cpu -- [--sites 8] [--width 300] [--profile DIR]
 *
 * Profiles are of the main threads only; the file writer's thread (write(2), SHA-256) is in the CPU seconds, not in
 * the tables. Frames are counted by samples, not by the time between them, so that a process the machine starves
 * of CPU is not charged for the time it waited.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import * as os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite } from '../coordinator/admin.ts';
import { startCoordinator } from '../coordinator/coordinator.ts';
import { enrollSite } from '../site-agent/enroll.ts';
import { SiteHome } from '../site-agent/home.ts';
import { FederationClient, type WireTask } from '../site-agent/transport/client.ts';
import { ModelCache } from '../site-agent/transport/model-cache.ts';
import { uploadOnce } from '../site-agent/transport/upload.ts';
import { loadPlanFile } from '../shared/plan/load.ts';
import { architectureFor } from '../shared/model/registry.ts';
import { sharedParams } from '../shared/model/sharing.ts';
import { encodeSafetensors } from '../shared/tensors/safetensors.ts';
import { makeBundle } from '../shared/tensors/bundle.ts';

type Profile = { nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number } }[]; samples: number[] };

/** A CPU profiler on this thread's inspector (answers synchronously on the main thread). */
function profiler(): { start(): void; stop(): Profile } {
  const s = new Session();
  s.connect();
  s.post('Profiler.enable');
  return {
    start: () => s.post('Profiler.start'),
    stop: () => {
      let out: Profile | undefined;
      s.post('Profiler.stop', (err, r) => {
        if (err) throw err;
        out = r.profile as unknown as Profile;
      });
      return out!;
    },
  };
}

/** The heaviest frames by self samples (idle left out). */
function topFrames(p: Profile, n: number): string[] {
  const byId = new Map(p.nodes.map((x) => [x.id, x]));
  const self = new Map<string, number>();
  let busy = 0;
  for (const id of p.samples) {
    const cf = byId.get(id)!.callFrame;
    if (cf.functionName === '(idle)') continue;
    const url = cf.url.replace(/.*node_modules\//, '').replace(/^.*?\/(coordinator|site-agent|shared)\//, '$1/');
    const key = `${cf.functionName || '(anonymous)'} ${url ? `${url}:${cf.lineNumber + 1}` : ''}`.trim();
    self.set(key, (self.get(key) ?? 0) + 1);
    busy++;
  }
  const rows = [...self].sort((a, b) => b[1] - a[1]).slice(0, n);
  return [`main thread, ${busy} samples`, ...rows.map(([k, v]) => `${((100 * v) / busy).toFixed(1).padStart(5)} %  ${k}`)];
}

const cpuS = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

type ToChild = { op: 'start' } | { op: 'stop'; file?: string };

/** Child: the coordinator; 'start' / 'stop' bracket a phase, answered with its CPU seconds. */
async function serve(dir: string, profiling: boolean): Promise<void> {
  const coord = await startCoordinator({ dir, port: 0, host: '127.0.0.1', log: pino({ level: 'warn' }) });
  const prof = profiling ? profiler() : undefined;
  let from = 0;
  process.on('message', (m: ToChild) => {
    if (m.op === 'start') {
      prof?.start();
      from = cpuS();
      process.send!({ cpuS: 0 });
    } else {
      const used = cpuS() - from;
      if (prof && m.file) writeFileSync(m.file, JSON.stringify(prof.stop()));
      process.send!({ cpuS: used });
    }
  });
  process.once('SIGTERM', () => process.exit(0));
  process.once('disconnect', () => process.exit(0)); // the bench process is gone
  process.send!({ port: coord.port });
}

function planYaml(width: number, sites: number): string {
  return [
    'name: transfer-cpu',
    `model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: ${width}, seed: 1 }`,
    'rounds: 1',
    `minSites: ${sites}`,
    `sitesPerRound: ${sites}`,
    'roundDeadlineSeconds: 1800',
    'waitForSitesSeconds: 1800',
    'gatherSeconds: 1',
    'local: { steps: 1, batchSize: 2, learningRate: 0.003 }',
    'share: { parts: [encoder] }',
    '',
  ].join('\n');
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({ options: { sites: { type: 'string', default: '8' }, width: { type: 'string', default: '300' }, profile: { type: 'string' } } });
  const sites = Number(a.sites);
  const profDir = a.profile;
  if (profDir) mkdirSync(profDir, { recursive: true });
  console.log(`load average at start: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  const work = mkdtempSync(join(os.tmpdir(), 'medfl-bench-transfer-cpu-'));
  let proc: ChildProcess | undefined;
  try {
    const dir = join(work, 'coordinator');
    const home = await CoordinatorHome.init(dir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(home.planPath, planYaml(Number(a.width), sites));
    proc = fork(fileURLToPath(import.meta.url), ['--serve', dir, profDir ? '1' : '0'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const next = () => new Promise<{ port?: number; cpuS?: number }>((r) => proc!.once('message', r));
    const { port } = await next();
    const ask = async (m: ToChild) => {
      const answer = next();
      proc!.send(m);
      return (await answer).cpuS!;
    };
    const clients: FederationClient[] = [];
    const tasks: WireTask[] = [];
    for (let i = 0; i < sites; i++) {
      const name = `site-${String(i).padStart(2, '0')}`;
      const v = addSite(dir, name, { ttlSeconds: 600 });
      await enrollSite({ coordinator: `localhost:${port}`, token: v.token, caFingerprint: v.caFingerprint, dir: join(work, name) });
      const c = new FederationClient(new SiteHome(join(work, name)));
      await c.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' });
      clients.push(c);
    }
    // Every site's TRAIN task (the round opens once all are connected).
    await Promise.all(
      clients.map(
        (c, i) =>
          new Promise<void>((resolve) => {
            const s = c.subscribeTasks([]);
            s.on('error', () => undefined);
            s.on('data', (t: WireTask) => {
              if (t.kind === 'TRAIN') {
                tasks[i] = t;
                resolve();
              }
            });
          }),
      ),
    );
    const plan = loadPlanFile(home.planPath);
    const arch = architectureFor(plan.model);
    const names = new Set(sharedParams(arch, plan.share).map((p) => p.name));
    const payload = encodeSafetensors(makeBundle([...arch.init(1).values()].filter((t) => names.has(t.name)).map((t) => ({ ...t, data: (t.data as Float32Array).map((v) => v + 1e-3) }))));
    const me = profDir ? profiler() : undefined;

    const phase = async (name: string, bytes: number, run: () => Promise<unknown>) => {
      await ask({ op: 'start' });
      me?.start();
      const c0 = cpuS();
      const t0 = performance.now();
      await run();
      const wall = (performance.now() - t0) / 1000;
      const sitesCpu = cpuS() - c0;
      const siteProfile = me?.stop();
      const coordFile = profDir ? join(profDir, `${name}-coordinator.cpuprofile`) : undefined;
      const coordCpu = await ask({ op: 'stop', file: coordFile });
      const gb = bytes / 1e9;
      console.log(
        `\n${name}: ${sites} × ${(bytes / sites / 1e6).toFixed(1)} MB = ${gb.toFixed(2)} GB in ${wall.toFixed(1)} s; ` +
          `coordinator ${(coordCpu / gb).toFixed(2)} CPU s/GB, sites ${(sitesCpu / gb).toFixed(2)} CPU s/GB; load ${os.loadavg()[0]!.toFixed(1)}`,
      );
      if (profDir && coordFile && siteProfile) {
        writeFileSync(join(profDir, `${name}-sites.cpuprofile`), JSON.stringify(siteProfile));
        console.log(`coordinator, ${topFrames(JSON.parse(readFileSync(coordFile, 'utf8')) as Profile, 20).join('\n')}`);
        console.log(`sites, ${topFrames(siteProfile, 20).join('\n')}`);
      }
    };
    await phase('upload', payload.length * sites, async () => {
      const acks = await Promise.all(clients.map((c, i) => uploadOnce(c, { updateId: `transfer-cpu-${i}`, taskId: tasks[i]!.taskId, round: tasks[i]!.round, baseModelHash: tasks[i]!.modelHash, numSamples: 4, payload })));
      const refused = acks.find((x) => !x.accepted);
      if (refused) throw new Error(`upload refused: ${refused.reason}`);
    });
    const t = tasks[0]!;
    await phase('download', t.modelSize * sites, () => Promise.all(clients.map((c, i) => new ModelCache(join(work, `cache-${i}`)).ensure(c, t.modelHash, t.modelSize))));
    for (const c of clients) c.close();
  } finally {
    if (proc && proc.exitCode === null) {
      proc.kill('SIGTERM');
      await once(proc, 'exit');
    }
    rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--serve') void serve(process.argv[3]!, process.argv[4] === '1');
else
  main().then(
    () => process.exit(0),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
