/**
 * Issue 15: faults as a test, with real processes on loopback — a coordinator (`medfl coordinator start --nats`),
 * three `medfl site run` agents and a real nats-server — and a seeded random schedule of:
 * - coordinator kill -9: while an upload is open (site-a talks through a relay that slows its uplink, so the upload
 *   lasts long enough to be caught; the kill lands when its partial file exists), at the round close (the moment
 *   every selected site has reported), and at random times; each time it is started again;
 * - site kill -9 at random times, each site started again (its outbox sends what it had not delivered);
 * - NATS killed and restarted on the same port and store;
 * - the coordinator's disk full for a few seconds: its folder is a small tmpfs filled to the last block, where the
 *   machine lets the test mount one (the test's name says when it cannot).
 * Afterwards: every planned round closed; the updates the sites saw acknowledged == the updates counted in closed
 * rounds == the ledger's entries; nothing left over (partial uploads, spill files, site outboxes, unpublished
 * outbox rows); `medfl audit verify --nats` passes.
 *
 * In the suite: 3 coordinator kills and 2 site kills over 14 rounds (~2 minutes here). `npm run chaos` runs 20 and 10 (the env
 * MEDFL_CHAOS_COORDINATOR_KILLS / MEDFL_CHAOS_SITE_KILLS / MEDFL_CHAOS_SEED) and prints the same figures.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, cpSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { waitFor } from '../../cli/processes.ts';
import { auditVerify } from '../../cli/audit.ts';

const COORDINATOR_KILLS = Number(process.env.MEDFL_CHAOS_COORDINATOR_KILLS ?? 3);
const SITE_KILLS = Number(process.env.MEDFL_CHAOS_SITE_KILLS ?? 2);
const SEED = Number(process.env.MEDFL_CHAOS_SEED ?? Date.now() % 100_000);
// Enough rounds that every scheduled fault lands before the federation finishes (each waits for progress). One round
// per fault was too few on an unloaded machine: rounds of two steps close faster than a kill can wait for its moment.
const ROUNDS = Math.max(8, 2 * (COORDINATOR_KILLS + SITE_KILLS) + 4);
/** Site-a's uplink through the relay: slow enough that a 43 KB update takes about a second. */
const UPLINK_BYTES_PER_S = 40_000;

const cleanups: (() => void | Promise<void>)[] = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** mulberry32: a small seeded generator, so a failing schedule can be replayed with MEDFL_CHAOS_SEED. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A loopback relay to `port` that passes the coordinator's bytes at once and the site's at `bytesPerS`. */
async function slowUplinkRelay(port: number, bytesPerS: number): Promise<{ port: number; server: Server }> {
  const sockets = new Set<Socket>();
  const server = createServer((down) => {
    const up = connect(port, '127.0.0.1');
    sockets.add(down).add(up);
    up.pipe(down);
    down.on('data', (d: Buffer) => {
      down.pause();
      up.write(d);
      setTimeout(() => down.resume(), (d.length / bytesPerS) * 1000);
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
  return { port: (server.address() as { port: number }).port, server };
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

const canMount = (() => {
  const probe = mkdtempSync(join(tmpdir(), 'medfl-chaos-probe-'));
  const ok = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe]).status === 0;
  if (ok) spawnSync('umount', [probe]);
  rmSync(probe, { recursive: true, force: true });
  return ok;
})();

const title =
  `survives ${COORDINATOR_KILLS} coordinator kill -9s (during an upload, at the round close, at random), ${SITE_KILLS} site kill -9s, a NATS restart and ` +
  (canMount ? 'a full disk (tmpfs)' : 'NO full disk: this machine does not let the test mount a tmpfs') +
  ', with acknowledged == counted == ledger entries, no leftovers, and audit verify passing';

describe('chaos', () => {
  it(title, async () => {
    const rand = rng(SEED);
    const started = Date.now();
    const fed: TestFederation = await makeFederation({ sites: 3, plan: TEST_PLAN({ rounds: ROUNDS, minSites: 2, steps: 2, gather: 1, deadline: 90 }) });
    cleanups.push(() => rmSync(fed.work, { recursive: true, force: true }));
    cleanups.push(() => fed.killAll());
    const diskFull = canMount && mountTmpfs(fed.coordDir, 48);
    if (diskFull) cleanups.push(() => void spawnSync('umount', ['-l', fed.coordDir]));
    const natsStore = mkdtempSync(join(tmpdir(), 'medfl-chaos-nats-'));
    cleanups.push(() => rmSync(natsStore, { recursive: true, force: true }));
    let nats: NatsServer = await startNats({ jetstream: true, storeDir: natsStore });
    cleanups.push(() => nats.stop());
    const natsPort = nats.port;

    let coordinator = await fed.startCoordinator(['--nats', nats.url]);
    await fed.enrollAll();
    // site-a reaches the coordinator through a relay with a slow uplink (its TLS name stays localhost).
    const relay = await slowUplinkRelay(fed.port, UPLINK_BYTES_PER_S);
    const configA = join(fed.siteDir('site-a'), 'site.json');
    writeFileSync(configA, JSON.stringify({ ...JSON.parse(readFileSync(configA, 'utf8')), coordinator: `localhost:${relay.port}` }));
    const agents = new Map<string, ChildProcess>(fed.sites.map((s) => [s, fed.startSite(s)]));
    const store = fed.store();
    cleanups.push(() => store.close());
    const partialDir = join(fed.coordDir, 'updates', '.partial');
    const figures = { coordinatorKills: 0, killedDuringUpload: 0, killedAtClose: 0, closeKillsAfterCommit: 0, siteKills: 0, natsRestarts: 0, diskFullSeconds: 0, refusedWhileFull: 0 };

    const restartCoordinator = async () => {
      coordinator.kill('SIGKILL');
      await exited(coordinator);
      figures.coordinatorKills++;
      coordinator = await fed.startCoordinator(['--nats', nats.url]);
    };
    const openRound = () => store.listRounds().find((r) => r.state === 'open');
    const progress = () => store.acceptedUpdates().length + store.closedRoundCount();
    const finished = () => store.closedRoundCount() >= ROUNDS;

    type Fault = 'coordinator-upload' | 'coordinator-close' | 'coordinator-random' | 'site' | 'nats' | 'disk';
    // The kills in a shuffled order first, then the slow faults (NATS away, disk full: the rounds run on through
    // them, so placed early they could let the federation finish before every kill has landed).
    const faults: Fault[] = [];
    for (let i = 0; i < COORDINATOR_KILLS; i++) faults.push(i % 3 === 0 ? 'coordinator-upload' : i % 3 === 1 ? 'coordinator-close' : 'coordinator-random');
    for (let i = 0; i < SITE_KILLS; i++) faults.push('site');
    for (let i = faults.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [faults[i], faults[j]] = [faults[j]!, faults[i]!];
    }
    faults.push('nats');
    if (diskFull) faults.push('disk');

    // Each fault waits for progress since the last one, so the rounds move on between them.
    let mark = progress();
    for (const fault of faults) {
      if (finished()) break;
      await waitFor(() => finished() || progress() > mark, 240_000, `progress before the ${fault} fault`, 20);
      if (finished()) break;
      switch (fault) {
        case 'coordinator-upload': {
          // The kill lands while site-a's slowed upload has its partial file on the coordinator's disk.
          await waitFor(() => finished() || (existsSync(partialDir) && readdirSync(partialDir).length > 0), 240_000, 'an upload in progress', 5);
          if (finished()) break;
          coordinator.kill('SIGKILL');
          if (readdirSync(partialDir).length > 0) figures.killedDuringUpload++;
          await restartCoordinator();
          break;
        }
        case 'coordinator-close': {
          // The moment every selected site of the open round has reported, the close (aggregate, model, commit) runs.
          let round = 0;
          await waitFor(() => {
            const r = openRound();
            if (!r) return finished();
            round = r.round;
            return store.updatesForRound(r.round).length === r.selected.length;
          }, 240_000, 'a round about to close', 2);
          if (finished()) break;
          coordinator.kill('SIGKILL');
          figures.killedAtClose++;
          if (store.getRound(round)?.state === 'closed') figures.closeKillsAfterCommit++;
          await restartCoordinator();
          break;
        }
        case 'coordinator-random':
          await new Promise((r) => setTimeout(r, rand() * 3000));
          await restartCoordinator();
          break;
        case 'site': {
          await new Promise((r) => setTimeout(r, rand() * 3000));
          const running = fed.sites.filter((s) => agents.get(s)!.exitCode === null);
          const name = running[Math.floor(rand() * running.length)];
          const agent = name === undefined ? undefined : agents.get(name);
          if (name !== undefined && agent) {
            agent.kill('SIGKILL');
            await exited(agent);
            figures.siteKills++;
            agents.set(name, fed.startSite(name));
          }
          break;
        }
        case 'nats':
          await nats.stop();
          await new Promise((r) => setTimeout(r, 3000 + rand() * 3000));
          nats = await startNats({ jetstream: true, storeDir: natsStore, port: natsPort });
          figures.natsRestarts++;
          break;
        case 'disk': {
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
      mark = progress();
    }

    // The whole schedule ran (a fault skipped because the rounds were over would make the run say less than it claims).
    expect(figures.coordinatorKills).toBe(COORDINATOR_KILLS);
    expect(figures.siteKills).toBe(SITE_KILLS);
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

    // No leftovers: partial uploads, spill files, undelivered site updates.
    expect(readdirSync(partialDir)).toEqual([]);
    const spill = join(fed.coordDir, 'updates', '.spill');
    expect(existsSync(spill) ? readdirSync(spill) : []).toEqual([]);
    for (const site of fed.sites) {
      const outbox = join(fed.siteDir(site), 'outbox');
      expect(existsSync(outbox) ? readdirSync(outbox) : [], `${site}'s outbox`).toEqual([]);
    }

    process.stdout.write(
      `chaos (seed ${SEED}): ${ROUNDS} rounds closed, ${failedRounds.size} failed and restarted; ${counted.length} updates acknowledged = counted = in the ledger; ` +
        `${JSON.stringify(figures)}; ${((Date.now() - started) / 1000).toFixed(0)} s\n`,
    );
    coordinator.kill('SIGTERM');
    await exited(coordinator);
  }, Number(process.env.MEDFL_CHAOS_TIMEOUT_MS ?? 900_000));
});
