/**
 * Adjacent releases side by side, as real processes over TLS (docs/compatibility.md): the previous release's
 * `medfl` (commit 3b6b42d, packed in test/fixtures/previous-release by scripts/previous-release-fixture.sh, run
 * with the current node_modules) as a site of this coordinator and as the coordinator of this site; and this site
 * against a "newer" coordinator (the real one, whose task signer extends the settings before signing with its real key).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { exited, makeFederation, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';
import { freePort, spawnMedfl, waitFor } from '../../cli/processes.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { pino } from 'pino';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { keyTaskSigner, type TaskSigner } from '../../coordinator/rounds/task-signer.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';
import { statusJson } from '../../coordinator/admin-http/status-json.ts';
import { medflVersion } from '../../shared/util/version.ts';
import { SITE_FEATURES } from '../../shared/protocol/features.ts';

const FIXTURE = resolve(import.meta.dirname, '..', 'fixtures', 'previous-release', 'medfl-3b6b42d.tar.xz');
const REPO = resolve(import.meta.dirname, '..', '..');
const SITE_ENV = { MEDFL_LOG_LEVEL: 'info', MEDFL_ENGINE: 'cpu', OMP_NUM_THREADS: '1' };

let oldRelease: string;
const children: ChildProcess[] = [];
const cleanup: string[] = [];

/** The previous release's CLI, unpacked beside a link to this checkout's node_modules. */
function unpackPreviousRelease(): string {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-previous-'));
  cleanup.push(dir);
  execFileSync('tar', ['-xJf', FIXTURE, '-C', dir]);
  symlinkSync(join(REPO, 'node_modules'), join(dir, 'node_modules'), 'dir');
  return dir;
}

function spawnOld(args: string[], logPath: string, env: NodeJS.ProcessEnv = {}): ChildProcess {
  const log = createWriteStream(logPath, { flags: 'a' });
  const child = spawn(process.execPath, [join(oldRelease, 'bin', 'medfl.js'), ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.pipe(log, { end: false });
  child.stderr!.pipe(log, { end: false });
  children.push(child);
  return child;
}

function runOld(args: string[]): string {
  return execFileSync(process.execPath, [join(oldRelease, 'bin', 'medfl.js'), ...args], { encoding: 'utf8' });
}

/** pino lines of a log file (other lines skipped). */
function logLines(path: string): Record<string, unknown>[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function finish(c: ChildProcess, logPath: string): Promise<void> {
  const code = await exited(c, 150_000).catch((e: Error) => {
    throw new Error(`${e.message}:\n${readFileSync(logPath, 'utf8').slice(-3000)}`);
  });
  if (code !== 0) throw new Error(`process exited with ${code}:\n${readFileSync(logPath, 'utf8').slice(-3000)}`);
}

beforeAll(() => {
  oldRelease = unpackPreviousRelease();
});

afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const d of cleanup) rmSync(d, { recursive: true, force: true });
});

describe('a site of the previous release against this coordinator', () => {
  let f: TestFederation;
  afterAll(() => f?.killAll());

  async function federation(plan: string): Promise<TestFederation> {
    f = await makeFederation({ sites: 2, plan });
    cleanup.push(f.work);
    await f.startCoordinator();
    // site-a: the previous release, enrolled and run by its own CLI; site-b: this release.
    const [a, b] = f.invitations;
    runOld(['site', 'enroll', '--coordinator', `localhost:${f.port}`, '--token', a!.token, '--ca-fingerprint', a!.caFingerprint, '--dir', f.siteDir('site-a')]);
    await enrollSite({ coordinator: `localhost:${f.port}`, token: b!.token, caFingerprint: b!.caFingerprint, dir: f.siteDir('site-b') });
    return f;
  }

  it('trains a round with a current site; the coordinator sees it as protocol 1 without features', async () => {
    await federation(TEST_PLAN({ rounds: 1, minSites: 2, gather: 0 }));
    const old = spawnOld(['site', 'run', '--dir', f.siteDir('site-a'), '--data', f.dataDir('site-a'), '--exit-when-finished'], f.logPath('site-a'), SITE_ENV);
    const cur = f.startSite('site-b');
    await Promise.all([finish(old, f.logPath('site-a')), finish(cur, f.logPath('site-b'))]);

    const store = f.store();
    expect(store.getRound(1)?.state).toBe('closed');
    expect(store.updatesForRound(1).map((u) => u.site).sort()).toEqual(['site-a', 'site-b']);
    // The old site's heartbeats, without a software version, were accepted (it stayed seen) and show it as unknown.
    const versions = (statusJson(store, 'compat').sites as { name: string; version: string | null }[]).map((s) => [s.name, s.version]);
    expect(versions).toEqual([['site-a', 'unknown'], ['site-b', medflVersion()]]);
    store.close();
    const subscribed = logLines(f.logPath('coordinator')).filter((l) => l.msg === 'site subscribed to tasks');
    expect(subscribed.find((l) => l.site === 'site-a')).toMatchObject({ protocolVersion: 1, features: [] });
    expect(subscribed.find((l) => l.site === 'site-b')).toMatchObject({ protocolVersion: 2, features: [...SITE_FEATURES] });
    expect(logLines(f.logPath('site-a')).some((l) => l.msg === 'update acknowledged')).toBe(true);
  }, 240_000);

  it('is not sent a task it cannot honour (keepMoments: all); the coordinator names the site and the feature', async () => {
    const plan = TEST_PLAN({ rounds: 1, minSites: 1, gather: 30 }).replace('learningRate: 0.005', 'learningRate: 0.005, keepMoments: all');
    await federation(plan);
    const old = spawnOld(['site', 'run', '--dir', f.siteDir('site-a'), '--data', f.dataDir('site-a'), '--exit-when-finished'], f.logPath('site-a'), SITE_ENV);
    const store = f.store();
    // Both selected: the current site joins while the round waits for the rest (gatherSeconds).
    await waitFor(() => store.listSites().some((s) => s.name === 'site-a' && s.lastSeenAt !== null), 60_000, 'the old site to connect');
    const cur = f.startSite('site-b');
    await Promise.all([finish(old, f.logPath('site-a')), finish(cur, f.logPath('site-b'))]);

    expect(store.getRound(1)?.selected).toEqual(['site-a', 'site-b']);
    expect(store.getRound(1)?.state).toBe('closed');
    expect(store.updatesForRound(1).map((u) => u.site)).toEqual(['site-b']);
    store.close();
    const withheld = logLines(f.logPath('coordinator')).filter((l) => l.msg?.toString().startsWith('task withheld'));
    expect(withheld.length).toBeGreaterThan(0);
    expect(withheld[0]).toMatchObject({ round: 1, site: 'site-a', missing: ['local-keep-moments'], protocolVersion: 1 });
    // The old site never trained: nothing was sent to it that it would have run differently from the plan.
    expect(logLines(f.logPath('site-a')).some((l) => l.msg === 'global model ready')).toBe(false);
    expect(logLines(f.logPath('site-b')).some((l) => l.msg === 'update acknowledged')).toBe(true);
  }, 240_000);
});

describe('this site against a coordinator of the previous release', () => {
  it('enrols, trains a round and sees the federation finish', async () => {
    const work = mkdtempSync(join(tmpdir(), 'medfl-old-coord-'));
    cleanup.push(work);
    const coordDir = join(work, 'coordinator');
    const siteDir = join(work, 'site-a');
    const dataDir = join(work, 'data');
    mkdirSync(join(work, 'logs'));
    const coordLog = join(work, 'logs', 'coordinator.log');
    const siteLog = join(work, 'logs', 'site-a.log');
    const port = await freePort();
    runOld(['coordinator', 'init', '--dir', coordDir, '--host', 'localhost', '127.0.0.1', '--port', String(port)]);
    writeFileSync(join(coordDir, 'plan.yaml'), TEST_PLAN({ rounds: 1, minSites: 1, gather: 0 }));
    const invite = runOld(['coordinator', 'site', 'add', 'site-a', '--dir', coordDir]);
    const token = /token\s+(\S+)/.exec(invite)?.[1];
    const fingerprint = /CA fingerprint\s+(\S+)/.exec(invite)?.[1];
    if (!token || !fingerprint) throw new Error(`no invitation in:\n${invite}`);
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 4, valCases: 2, size: [16, 16, 16], seed: 100, intensityShift: 0 });

    const coord = spawnOld(['coordinator', 'start', '--dir', coordDir, '--port', String(port), '--bind', '127.0.0.1'], coordLog, { MEDFL_LOG_LEVEL: 'info' });
    await waitFor(() => {
      if (coord.exitCode !== null) throw new Error(`old coordinator exited with ${coord.exitCode}:\n${readFileSync(coordLog, 'utf8').slice(-3000)}`);
      return existsSync(coordLog) && readFileSync(coordLog, 'utf8').includes('listening on port');
    }, 60_000, 'the old coordinator to listen');
    await enrollSite({ coordinator: `localhost:${port}`, token, caFingerprint: fingerprint, dir: siteDir });
    const site = spawnMedfl(['site', 'run', '--dir', siteDir, '--data', dataDir, '--exit-when-finished'], siteLog, SITE_ENV);
    children.push(site);
    await finish(site, siteLog);

    const siteLines = logLines(siteLog);
    expect(siteLines.some((l) => l.msg === 'update acknowledged' && l.round === 1)).toBe(true);
    expect(siteLines.some((l) => l.msg === 'federation finished')).toBe(true);
    expect(siteLines.some((l) => l.msg === 'task refused: this site cannot honour it')).toBe(false);
    const coordLines = logLines(coordLog);
    expect(coordLines.some((l) => l.msg === 'update accepted' && l.site === 'site-a' && l.round === 1)).toBe(true);
    expect(coordLines.some((l) => l.msg === 'round closed' && l.round === 1)).toBe(true);
    coord.kill('SIGTERM');
    await exited(coord, 30_000);
  }, 240_000);
});

describe('this site against a newer coordinator (settings with fields this release does not know)', () => {
  let f: TestFederation;
  let coord: RunningCoordinator;
  const events: FederationEvent[] = [];
  /** What the "newer" coordinator adds to each genuine task's settings before signing it with the real key. */
  let newer: (settings: Record<string, any>, round: number) => void = () => undefined;

  beforeAll(async () => {
    f = await makeFederation({ sites: 1, plan: TEST_PLAN({ rounds: 2, minSites: 1, deadline: 20, gather: 0, steps: 2 }) });
    cleanup.push(f.work);
    const genuine = keyTaskSigner(new CoordinatorHome(f.coordDir).signingKey());
    const signTask: TaskSigner = (manifest) => {
      if (manifest.kind !== 'TRAIN') return genuine(manifest);
      const s = JSON.parse(manifest.settingsJson) as Record<string, any>;
      newer(s, manifest.round);
      return genuine({ ...manifest, settingsJson: JSON.stringify(s) });
    };
    coord = await startCoordinator({ dir: f.coordDir, port: f.port, host: '127.0.0.1', log: pino({ level: 'silent' }), signTask });
    coord.bus.subscribe((e) => events.push(e));
    await f.enrollAll();
  }, 60_000);

  afterAll(async () => {
    f?.killAll();
    await coord?.stop();
  });

  it('ignores a new tuning field (and says so), and refuses a new model field by name, telling the coordinator', async () => {
    // Round 1: a new tuning field; later rounds: a new model field (set before round 2 can start).
    newer = (s, round) => {
      if (round === 1) s.local.warmupSteps = 5;
      else s.model.attention = 'global';
    };
    const site = f.startSite('site-a');
    await waitFor(() => events.some((e) => e.type === 'update.accepted' && e.round === 1), 120_000, 'round 1 to be trained despite the unknown tuning field');
    const ignored = logLines(f.logPath('site-a')).find((l) => l.msg?.toString().startsWith('task settings name tuning fields'));
    expect(ignored).toMatchObject({ round: 1, ignored: ['local.warmupSteps'] });

    await waitFor(() => events.some((e) => e.type === 'task.declined' && e.round === 2), 120_000, 'round 2 to be declined');
    site.kill('SIGTERM');
    const declined = events.find((e) => e.type === 'task.declined' && e.round === 2)!;
    expect(String(declined.reason)).toMatch(/field\(s\) model\.attention unknown to this site \(this site speaks protocol version 2/);
    expect(logLines(f.logPath('site-a')).some((l) => l.msg === 'task refused: this site cannot honour it' && l.round === 2)).toBe(true);
    expect(events.some((e) => e.type === 'update.accepted' && e.round === 2)).toBe(false);
  }, 240_000);
});
