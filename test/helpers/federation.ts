/**
 * Builds a local federation for tests the way an admin would: a coordinator directory, invitations,
 * generated phantom data per site, and helpers to run the coordinator and site agents as processes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite, type Invitation } from '../../coordinator/admin.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { freePort, spawnMedfl, waitFor } from '../../cli/processes.ts';

export interface TestFederation {
  work: string;
  coordDir: string;
  port: number;
  home: CoordinatorHome;
  sites: string[];
  invitations: Invitation[];
  siteDir(name: string): string;
  dataDir(name: string): string;
  logPath(name: string): string;
  /** A read connection to the coordinator's state (SQLite allows it next to the running coordinator). */
  store(): CoordinatorStore;
  children: ChildProcess[];
  startCoordinator(extra?: string[]): Promise<ChildProcess>;
  enrollAll(): Promise<void>;
  startSite(name: string, extra?: string[]): ChildProcess;
  /** Runs a test's own site-agent script (`node --import tsx SCRIPT SITE_DIR DATA_DIR ...args`) with the same environment and log. */
  startSiteScript(name: string, script: string, args: string[]): ChildProcess;
  killAll(): void;
}

const SITE_ENV = {
  MEDFL_LOG_LEVEL: 'info',
  MEDFL_ENGINE: 'cpu',
  // Several sites share this machine's cores: one OpenMP thread each keeps oneDNN from oversubscribing.
  OMP_NUM_THREADS: '1',
};

export const TEST_PLAN = (o: { rounds: number; minSites: number; deadline?: number; steps?: number; gather?: number }) =>
  [
    'name: test-federation',
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    `rounds: ${o.rounds}`,
    `minSites: ${o.minSites}`,
    `roundDeadlineSeconds: ${o.deadline ?? 60}`,
    'waitForSitesSeconds: 60',
    `gatherSeconds: ${o.gather ?? 10}`,
    `local: { steps: ${o.steps ?? 3}, batchSize: 2, learningRate: 0.005 }`,
    'share: { parts: [encoder] }',
    '',
  ].join('\n');

export async function makeFederation(o: {
  sites: number;
  plan: string;
  /** Writes site `index`'s data folder instead of the default two-class phantom (e.g. a classification site). */
  writeData?: (dir: string, name: string, index: number) => Promise<void>;
}): Promise<TestFederation> {
  const work = mkdtempSync(join(tmpdir(), 'medfl-test-'));
  const coordDir = join(work, 'coordinator');
  const port = await freePort();
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'], port });
  writeFileSync(home.planPath, o.plan);
  const sites = Array.from({ length: o.sites }, (_, i) => `site-${String.fromCharCode(97 + i)}`);
  mkdirSync(join(work, 'logs'), { recursive: true });
  for (const [i, name] of sites.entries()) {
    if (o.writeData) await o.writeData(join(work, 'data', name), name, i);
    else await writePhantomSite(join(work, 'data', name), { siteName: name, cases: 4, valCases: 2, size: [16, 16, 16], seed: 100 + i, intensityShift: 20 * i });
  }
  const invitations = sites.map((n) => addSite(coordDir, n, { ttlSeconds: 600 }));
  const children: ChildProcess[] = [];
  const f: TestFederation = {
    work,
    coordDir,
    port,
    home,
    sites,
    invitations,
    children,
    siteDir: (n) => join(work, 'sites', n),
    dataDir: (n) => join(work, 'data', n),
    logPath: (n) => join(work, 'logs', `${n}.log`),
    store: () => new CoordinatorStore(home.dbPath),
    async startCoordinator(extra = []) {
      const log = f.logPath('coordinator');
      const before = existsSync(log) ? readFileSync(log, 'utf8').length : 0;
      const c = spawnMedfl(['coordinator', 'start', '--dir', coordDir, '--port', String(port), '--bind', '127.0.0.1', ...extra], log, { MEDFL_LOG_LEVEL: 'info' });
      children.push(c);
      await waitFor(() => {
        if (c.exitCode !== null) throw new Error(`coordinator exited with ${c.exitCode}:\n${readFileSync(log, 'utf8').slice(-3000)}`);
        return existsSync(log) && readFileSync(log, 'utf8').slice(before).includes('listening on port');
        // Generous: on a 2-core machine busy with training runs a process start alone has taken over 30 s.
      }, 90_000, 'the coordinator to listen');
      return c;
    },
    async enrollAll() {
      await Promise.all(
        invitations.map((inv, i) => enrollSite({ coordinator: `localhost:${port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: f.siteDir(sites[i]) })),
      );
    },
    startSite(name, extra = []) {
      const c = spawnMedfl(['site', 'run', '--dir', f.siteDir(name), '--data', f.dataDir(name), '--exit-when-finished', ...extra], f.logPath(name), SITE_ENV);
      children.push(c);
      return c;
    },
    startSiteScript(name, script, args) {
      const log = createWriteStream(f.logPath(name), { flags: 'a' });
      const c = spawn(process.execPath, ['--import', 'tsx', script, f.siteDir(name), f.dataDir(name), ...args], { env: { ...process.env, ...SITE_ENV }, stdio: ['ignore', 'pipe', 'pipe'] });
      c.stdout!.pipe(log, { end: false });
      c.stderr!.pipe(log, { end: false });
      children.push(c);
      return c;
    },
    killAll() {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    },
  };
  return f;
}

export function exited(c: ChildProcess, timeoutMs = 60_000): Promise<number | null> {
  if (c.exitCode !== null || c.signalCode !== null) return Promise.resolve(c.exitCode);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('process did not exit in time')), timeoutMs);
    c.once('exit', (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
}
