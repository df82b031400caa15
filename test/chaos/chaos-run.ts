/**
 * Issue 15: faults as a test, with real processes on loopback — a coordinator (`medfl coordinator start --nats`),
 * three `medfl site run` agents and a real nats-server — and a seeded schedule of faults, each landing when the
 * federation reaches the state it targets, observed as it happens (inotify on the folders the processes write, the
 * store), never guessed from a timer:
 * - coordinator kill -9 during an upload: the moment an upload's partial file appears on the coordinator's disk
 *   (every site uploads through a relay that paces its uplink, so an upload lasts about a second);
 * - coordinator kill -9 at the round close: the moment the round's aggregate is being written (a new file in the
 *   models folder; the close's store commit follows it — a kill that lands after the commit is counted as such);
 * - coordinator kill -9 at a random point of an open round;
 * - site kill -9 while it holds an update the coordinator has not acknowledged (its outbox entry appears), or at a
 *   random point of an open round; each site is started again and delivers what its outbox holds;
 * - NATS killed and restarted on the same port and store, while a round is open;
 * - the coordinator's disk full for a few seconds while a round is open: its folder is a small tmpfs filled to the
 *   last block, where the machine lets the test mount one (the test's name says when it cannot).
 * Afterwards: every planned round closed; the updates the sites saw acknowledged == the updates counted in closed
 * rounds == the ledger's entries; nothing left over (partial uploads, spill files, site outboxes, unpublished
 * outbox rows); `medfl audit verify --nats` passes.
 *
 * Each fault waits for progress since the one before (an accepted update or a closed round), then for its moment,
 * which every round offers, so one round per fault (and a few to spare) is enough.
 */
import { mulberry32 } from '../../shared/util/random.ts';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, cpSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, watch, writeFileSync, writeSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { waitFor } from '../../cli/processes.ts';
import { auditVerify } from '../../cli/audit.ts';

export type Fault = 'coordinator-upload' | 'coordinator-close' | 'coordinator-random' | 'site-outbox' | 'site-random' | 'nats' | 'disk';

export interface ChaosOptions {
  /** The kills, in any order: shuffled with the seed, then NATS and (where a tmpfs can be mounted) the full disk. */
  kills: Fault[];
  seed: number;
  /** Skip the full disk even where a tmpfs could be mounted. */
  noDisk?: boolean;
}

export interface ChaosFigures {
  coordinatorKills: number;
  killedDuringUpload: number;
  killedAtClose: number;
  closeKillsAfterCommit: number;
  siteKills: number;
  siteKilledHoldingUpdate: number;
  natsRestarts: number;
  diskFullSeconds: number;
  refusedWhileFull: number;
}

/** Site-agent uplink through each site's relay: a 43 KB update takes about a second, long enough to be caught. */
const UPLINK_BYTES_PER_S = 40_000;
/** Longest wait for one fault's moment or for progress: generous, since a fault only waits for the next round. */
const MOMENT_TIMEOUT_MS = 240_000;


/**
 * A loopback relay to `port` that passes the coordinator's bytes at once and the site's at `bytesPerS`: each read is
 * forwarded in slices of at most 4 KiB, each after the time it takes at that rate, so one large read cannot slip by.
 */
async function pacedUplinkRelay(port: number, bytesPerS: number, cleanups: (() => void)[]): Promise<number> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((down) => {
    const up = connect(port, '127.0.0.1');
    sockets.add(down).add(up);
    up.pipe(down);
    down.on('data', (d: Buffer) => {
      down.pause();
      let at = 0;
      const next = () => {
        if (at >= d.length || up.destroyed) {
          down.resume();
          return;
        }
        const slice = d.subarray(at, at + 4096);
        at += slice.length;
        setTimeout(() => {
          up.write(slice);
          next();
        }, (slice.length / bytesPerS) * 1000);
      };
      next();
    });
    const end = () => {
      down.destroy();
      up.destroy();
    };
    down.on('close', end).on('error', end);
    up.on('close', end).on('error', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  return (server.address() as { port: number }).port;
}

/**
 * Runs `act` the moment an entry whose name passes `accept` is created in one of `dirs` (inotify, through fs.watch),
 * and resolves with where; resolves undefined if `giveUp` turns true first (checked every 100 ms).
 */
function onCreated(
  dirs: readonly string[],
  accept: (dir: string, name: string) => boolean,
  act: (dir: string, name: string) => void,
  giveUp: () => boolean,
): Promise<{ dir: string; name: string } | undefined> {
  return new Promise((resolve, reject) => {
    let done = false;
    const end = () => {
      done = true;
      for (const w of watchers) w.close();
      clearInterval(poll);
    };
    const watchers = dirs.map((dir) =>
      watch(dir, (_type, name) => {
        if (done || !name || !accept(dir, name) || !existsSync(join(dir, name))) return;
        end();
        try {
          act(dir, name);
        } catch (e) {
          reject(e);
          return;
        }
        resolve({ dir, name });
      }),
    );
    const poll = setInterval(() => {
      if (done || !giveUp()) return;
      end();
      resolve(undefined);
    }, 100);
  });
}

/** Mounts a small tmpfs on `dir` (keeping what is in it); false where the machine does not allow it. */
function mountTmpfs(dir: string, mb: number): boolean {
  const aside = mkdtempSync(join(tmpdir(), 'medfl-chaos-aside-'));
  cpSync(dir, aside, { recursive: true });
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${mb}m`, 'tmpfs', dir]).status !== 0) {
    rmSync(aside, { recursive: true, force: true });
    return false;
  }
  cpSync(aside, dir, { recursive: true });
  rmSync(aside, { recursive: true, force: true });
  return true;
}

function fillDisk(dir: string): string {
  const filler = join(dir, 'chaos-filler');
  const fd = openSync(filler, 'w');
  const block = Buffer.alloc(64 * 1024);
  try {
    for (;;) writeSync(fd, block);
  } catch {
    // ENOSPC: full
  } finally {
    closeSync(fd);
  }
  return filler;
}

export const canMountTmpfs: boolean = (() => {
  const probe = mkdtempSync(join(tmpdir(), 'medfl-chaos-probe-'));
  const ok = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe]).status === 0;
  if (ok) spawnSync('umount', [probe]);
  rmSync(probe, { recursive: true, force: true });
  return ok;
})();

/**
 * Rounds to plan for a schedule of `faults`, so the federation cannot finish before the last one lands. Each fault
 * waits for progress (within the open round) and then for its moment, which recurs every round: two rounds. A random
 * kill waits up to 2 s more and NATS stays away at least NATS_DOWN_MS and until one more round's progress; a round
 * lasts at least one paced upload (~1 s), so three rounds each bound those. The full disk comes last. Four to spare.
 * (A fixed 12 for the short run was not enough: on an idle machine rounds close in under a second and NATS's seconds
 * away let four or five run on.)
 */
export function roundsFor(faults: readonly Fault[]): number {
  const per = (f: Fault) => (f === 'coordinator-random' || f === 'site-random' || f === 'nats' ? 3 : 2);
  return faults.reduce((n, f) => n + per(f), 0) + 4;
}

/** Shortest time NATS stays away; it then stays away until the federation has made progress without it. */
const NATS_DOWN_MS = 2000;

/** Shuffles the kills with the seed and appends the slow faults (NATS away, disk full: rounds run on through them). */
export function schedule(o: ChaosOptions, rand: () => number, withDisk: boolean): Fault[] {
  const faults = [...o.kills];
  for (let i = faults.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [faults[i], faults[j]] = [faults[j]!, faults[i]!];
  }
  faults.push('nats');
  if (withDisk) faults.push('disk');
  return faults;
}

/**
 * The whole run, with its assertions; returns the figures and the line it printed. What it starts (processes, the
 * tmpfs, folders) is undone by the functions it pushes onto `cleanups`, which the caller runs in afterAll, so a run
 * that times out leaves nothing behind either.
 */
export function runChaos(o: ChaosOptions, cleanups: (() => void | Promise<void>)[]): Promise<{ figures: ChaosFigures; line: string }> {
  return run(o, cleanups);
}

/** Runs `cleanups` last-first; for afterAll. */
export async function undo(cleanups: (() => void | Promise<void>)[]): Promise<void> {
  for (const c of cleanups.splice(0).reverse()) await c();
}

async function run(o: ChaosOptions, cleanups: (() => void | Promise<void>)[]): Promise<{ figures: ChaosFigures; line: string }> {
  const rand = mulberry32(o.seed);
  const started = Date.now();
  const diskFull = !o.noDisk && canMountTmpfs;
  const faults = schedule(o, rand, diskFull);
  const ROUNDS = roundsFor(faults);
  const fed: TestFederation = await makeFederation({ sites: 3, plan: TEST_PLAN({ rounds: ROUNDS, minSites: 2, steps: 2, gather: 1, deadline: 90 }) });
  cleanups.push(() => rmSync(fed.work, { recursive: true, force: true }));
  cleanups.push(() => fed.killAll());
  if (diskFull && !mountTmpfs(fed.coordDir, 48)) throw new Error(`could not mount a tmpfs on ${fed.coordDir}, though a probe could`);
  if (diskFull) cleanups.push(() => void spawnSync('umount', ['-l', fed.coordDir]));
  const natsStore = mkdtempSync(join(tmpdir(), 'medfl-chaos-nats-'));
  cleanups.push(() => rmSync(natsStore, { recursive: true, force: true }));
  let nats: NatsServer = await startNats({ jetstream: true, storeDir: natsStore });
  cleanups.push(() => nats.stop());
  const natsPort = nats.port;

  let coordinator = await fed.startCoordinator(['--nats', nats.url]);
  await fed.enrollAll();
  // Every site reaches the coordinator through its own paced relay (its TLS name stays localhost).
  for (const site of fed.sites) {
    const relayPort = await pacedUplinkRelay(fed.port, UPLINK_BYTES_PER_S, cleanups as (() => void)[]);
    const config = join(fed.siteDir(site), 'site.json');
    writeFileSync(config, JSON.stringify({ ...JSON.parse(readFileSync(config, 'utf8')), coordinator: `localhost:${relayPort}` }));
  }
  const agents = new Map<string, ChildProcess>(fed.sites.map((s) => [s, fed.startSite(s)]));
  const store = fed.store();
  cleanups.push(() => store.close());
  const partialDir = join(fed.coordDir, 'updates', '.partial');
  const modelsDir = join(fed.coordDir, 'models');
  const figures: ChaosFigures = { coordinatorKills: 0, killedDuringUpload: 0, killedAtClose: 0, closeKillsAfterCommit: 0, siteKills: 0, siteKilledHoldingUpdate: 0, natsRestarts: 0, diskFullSeconds: 0, refusedWhileFull: 0 };

  const openRound = () => store.listRounds().find((r) => r.state === 'open');
  const progress = () => store.acceptedUpdates().length + store.closedRoundCount();
  const finished = () => store.closedRoundCount() >= ROUNDS;
  const coordinatorDown = async () => {
    await exited(coordinator);
    figures.coordinatorKills++;
    coordinator = await fed.startCoordinator(['--nats', nats.url]);
  };
  const killSite = (name: string) => {
    agents.get(name)!.kill('SIGKILL');
  };
  const siteDown = async (name: string) => {
    await exited(agents.get(name)!);
    figures.siteKills++;
    agents.set(name, fed.startSite(name));
  };
  const whileOpen = () => waitFor(() => finished() || openRound() !== undefined, MOMENT_TIMEOUT_MS, 'an open round', 20);

  /** When each fault landed (s since the start), for the figures line. */
  const timeline: string[] = [];
  let mark = progress();
  for (const fault of faults) {
    await waitFor(() => finished() || progress() > mark, MOMENT_TIMEOUT_MS, `progress before the ${fault} fault`, 20);
    if (finished()) throw new Error(`the federation finished before the ${fault} fault (seed ${o.seed}): plan more rounds`);
    switch (fault) {
      case 'coordinator-upload': {
        // The moment an upload's partial file is created: its bytes are still on their way through the relay.
        await waitFor(() => existsSync(partialDir), MOMENT_TIMEOUT_MS, 'the coordinator to make its upload folder');
        const part = await onCreated([partialDir], (_d, n) => n.endsWith('.part'), () => coordinator.kill('SIGKILL'), finished);
        if (part === undefined) break;
        await exited(coordinator);
        if (existsSync(join(part.dir, part.name))) figures.killedDuringUpload++;
        await coordinatorDown();
        break;
      }
      case 'coordinator-close': {
        // The moment the close writes the round's aggregate (a new model file); the store commit follows it.
        const known = new Set(readdirSync(modelsDir));
        // No close can commit before the next aggregate file appears, so a higher count afterwards is this close's commit.
        const closedBefore = store.closedRoundCount();
        const file = await onCreated([modelsDir], (_d, n) => !known.has(n) && (n.startsWith('.incoming-') || n.endsWith('.safetensors')), () => coordinator.kill('SIGKILL'), finished);
        if (file === undefined) break;
        await exited(coordinator);
        figures.killedAtClose++;
        if (store.closedRoundCount() > closedBefore) figures.closeKillsAfterCommit++;
        await coordinatorDown();
        break;
      }
      case 'coordinator-random':
        await whileOpen();
        await new Promise((r) => setTimeout(r, rand() * 2000));
        coordinator.kill('SIGKILL');
        await coordinatorDown();
        break;
      case 'site-outbox': {
        // The moment a site's outbox entry is written: it holds an update not yet acknowledged.
        const running = fed.sites.filter((s) => agents.get(s)!.exitCode === null);
        const watched = running.map((name) => {
          const dir = join(fed.siteDir(name), 'outbox');
          return { name, dir, known: new Set(existsSync(dir) ? readdirSync(dir) : []) };
        });
        await waitFor(() => watched.every((w) => existsSync(w.dir)), MOMENT_TIMEOUT_MS, "the sites' outbox folders");
        const hit = await onCreated(
          watched.map((w) => w.dir),
          (dir, n) => n.endsWith('.json') && !watched.find((w) => w.dir === dir)!.known.has(n),
          (dir) => killSite(watched.find((w) => w.dir === dir)!.name),
          finished,
        );
        if (hit === undefined) break;
        const name = watched.find((w) => w.dir === hit.dir)!.name;
        await exited(agents.get(name)!);
        if (readdirSync(join(fed.siteDir(name), 'outbox')).some((n) => n.endsWith('.json'))) figures.siteKilledHoldingUpdate++;
        await siteDown(name);
        break;
      }
      case 'site-random': {
        await whileOpen();
        await new Promise((r) => setTimeout(r, rand() * 2000));
        const running = fed.sites.filter((s) => agents.get(s)!.exitCode === null);
        const name = running[Math.floor(rand() * running.length)];
        if (name !== undefined) {
          killSite(name);
          await siteDown(name);
        }
        break;
      }
      case 'nats': {
        // Away long enough for the coordinator to go on without it: NATS_DOWN_MS and one more accepted update or close.
        await whileOpen();
        await nats.stop();
        const down = Date.now();
        const before = progress();
        await waitFor(() => finished() || (Date.now() - down >= NATS_DOWN_MS && progress() > before), MOMENT_TIMEOUT_MS, 'progress while NATS is away', 20);
        nats = await startNats({ jetstream: true, storeDir: natsStore, port: natsPort });
        figures.natsRestarts++;
        break;
      }
      case 'disk': {
        await whileOpen();
        const t = Date.now();
        const before = readFileSync(fed.logPath('coordinator'), 'utf8').length;
        const filler = fillDisk(fed.coordDir);
        await new Promise((r) => setTimeout(r, 4000));
        rmSync(filler);
        figures.diskFullSeconds = (Date.now() - t) / 1000;
        figures.refusedWhileFull = (readFileSync(fed.logPath('coordinator'), 'utf8').slice(before).match(/database or disk is full|ENOSPC/g) ?? []).length;
        break;
      }
    }
    timeline.push(`${fault}@${((Date.now() - started) / 1000).toFixed(0)}s/r${store.closedRoundCount()}`);
    mark = progress();
  }

  // The whole schedule ran, each fault at its moment (a kill that missed it would make the run say less than it claims).
  const count = (f: Fault) => o.kills.filter((k) => k === f).length;
  expect(figures.coordinatorKills).toBe(count('coordinator-upload') + count('coordinator-close') + count('coordinator-random'));
  expect(figures.killedDuringUpload).toBe(count('coordinator-upload'));
  expect(figures.killedAtClose).toBe(count('coordinator-close'));
  expect(figures.siteKills).toBe(count('site-outbox') + count('site-random'));
  expect(figures.siteKilledHoldingUpdate).toBe(count('site-outbox'));
  expect(figures.natsRestarts).toBe(1);
  // Every site runs to the end (the agents exit 0 once told the federation is finished).
  await waitFor(() => finished(), 600_000, `all ${ROUNDS} rounds to close`, 200);
  const codes = await Promise.all([...agents.values()].map((a) => exited(a, 300_000)));
  expect(codes).toEqual([0, 0, 0]);
  await waitFor(() => store.pendingOutbox('ledger').length + store.pendingOutbox('event').length === 0, 120_000, 'the outbox to be published');

  const rounds = store.listRounds();
  const closed = rounds.filter((r) => r.state === 'closed');
  expect(closed.length).toBe(ROUNDS);
  const counted = store.acceptedUpdates().filter((u) => u.roundState === 'closed').map((u) => `${u.round}/${u.site}`).sort();
  // What the sites were told: one "update acknowledged" per site and round (a resend after a kill says so again).
  const acknowledged = new Set<string>();
  for (const site of fed.sites) {
    for (const line of readFileSync(fed.logPath(site), 'utf8').split('\n')) {
      if (!line.includes('"update acknowledged"')) continue;
      acknowledged.add(`${(JSON.parse(line) as { round: number }).round}/${site}`);
    }
  }
  const failedRounds = new Set(rounds.filter((r) => r.state === 'failed').map((r) => r.round));
  expect([...acknowledged].filter((k) => !failedRounds.has(Number(k.split('/')[0]))).sort()).toEqual(counted);
  const verified = await auditVerify({ dir: fed.coordDir, nats: nats.url });
  expect(verified.text).toMatch(new RegExp(`ledger OK: ${counted.length} entries`));
  expect(verified.text).toMatch(new RegExp(`completeness OK: each of the ${counted.length} accepted update`));
  expect(verified.ok).toBe(true);

  // No leftovers: partial uploads, half-written model files, spill files, undelivered site updates.
  expect(readdirSync(partialDir)).toEqual([]);
  expect(readdirSync(modelsDir).filter((n) => n.startsWith('.incoming-'))).toEqual([]);
  const spill = join(fed.coordDir, 'updates', '.spill');
  expect(existsSync(spill) ? readdirSync(spill) : []).toEqual([]);
  for (const site of fed.sites) {
    const outbox = join(fed.siteDir(site), 'outbox');
    expect(existsSync(outbox) ? readdirSync(outbox) : [], `${site}'s outbox`).toEqual([]);
  }

  const line =
    `chaos (seed ${o.seed}): ${ROUNDS} rounds closed, ${failedRounds.size} failed and restarted; ${counted.length} updates acknowledged = counted = in the ledger; ` +
    `${JSON.stringify(figures)}; faults ${timeline.join(' ')}; ${((Date.now() - started) / 1000).toFixed(0)} s\n`;
  process.stdout.write(line);
  coordinator.kill('SIGTERM');
  await exited(coordinator);
  return { figures, line };
}
