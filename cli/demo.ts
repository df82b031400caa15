/**
 * `medfl demo`: a whole federation on this machine, done the way a real one is — one coordinator and
 * N site agents as separate processes on loopback, TLS and tokens on, each site enrolled with its own
 * one-time token and holding its own generated phantoms (NIfTI, MSD layout, site-specific intensities).
 * Progress comes from the coordinator's state database; the end is a table of round × site results.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import cliProgress from 'cli-progress';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite } from '../coordinator/admin.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { SITE_PROFILES, writePhantomSite } from '../site-agent/data/phantom.ts';
import { metricsTable, roundsTable } from './status.ts';
import { freePort, runToEnd, spawnMedfl, waitFor } from './processes.ts';
import { generatedSiteName } from '../shared/protocol/site-names.ts';

export interface DemoOptions {
  dir?: string;
  rounds: number;
  sites: number;
  steps: number;
  natsUrl?: string;
  /** Overall time limit; the demo fails loudly instead of hanging. */
  timeoutMs?: number;
  out?: NodeJS.WritableStream;
}


export async function runDemo(o: DemoOptions): Promise<boolean> {
  const out = o.out ?? process.stdout;
  const say = (s: string) => out.write(s + '\n');
  const started = Date.now();
  const work = o.dir ? resolve(o.dir) : mkdtempSync(join(tmpdir(), 'medfl-demo-'));
  mkdirSync(work, { recursive: true });
  const logs = join(work, 'logs');
  mkdirSync(logs, { recursive: true });
  const coordDir = join(work, 'coordinator');
  const siteNames = Array.from({ length: o.sites }, (_, i) => generatedSiteName(i));
  say(`MedFL demo: 1 coordinator + ${o.sites} sites as separate processes, TLS + tokens, ${o.rounds} rounds, work dir ${work}`);

  // 1. Each site's own data: phantoms with a site-specific intensity profile, as NIfTI in the MSD layout.
  const patch: [number, number, number] = [24, 24, 24];
  for (const [i, name] of siteNames.entries()) {
    const p = SITE_PROFILES[i % SITE_PROFILES.length];
    await writePhantomSite(join(work, 'data', name), { siteName: name, cases: 6, valCases: 3, size: patch, seed: 1000 * (i + 1), intensityShift: p.shift, intensityScale: p.scale });
  }
  say(`  generated ${o.sites} site datasets (6 training + 3 validation phantoms each, ${patch.join('×')} voxels)`);

  // 2. The coordinator: keys, CA, plan, invitations.
  const port = await freePort();
  if (existsSync(join(coordDir, 'coordinator.json'))) throw new Error(`${coordDir} already holds a coordinator; give the demo a fresh --dir`);
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'], port });
  writeFileSync(
    home.planPath,
    [
      'name: medfl-demo',
      'model: { architecture: tiny3d, patch: [24, 24, 24], numClasses: 2, width: 8, seed: 7 }',
      `rounds: ${o.rounds}`,
      `minSites: ${Math.max(1, o.sites - 1)}`,
      'roundDeadlineSeconds: 120',
      'waitForSitesSeconds: 60',
      `local: { steps: ${o.steps}, batchSize: 2, learningRate: 0.005 }`,
      'share: { parts: [encoder] }',
      '',
    ].join('\n'),
  );
  const invitations = siteNames.map((n) => addSite(coordDir, n, { ttlSeconds: 3600 }));

  const children: ChildProcess[] = [];
  const killAll = () => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  };
  process.once('SIGINT', () => {
    killAll();
    process.exit(130);
  });

  try {
    const coordArgs = ['coordinator', 'start', '--dir', coordDir, '--port', String(port), '--bind', '127.0.0.1'];
    if (o.natsUrl) coordArgs.push('--nats', o.natsUrl);
    const coordinator = spawnMedfl(coordArgs, join(logs, 'coordinator.log'));
    children.push(coordinator);
    const coordLog = join(logs, 'coordinator.log');
    await waitFor(() => existsSync(coordLog) && readFileSync(coordLog, 'utf8').includes('listening on port'), 30_000, 'the coordinator to listen');
    say(`  coordinator listening on 127.0.0.1:${port} (pid ${coordinator.pid})`);

    // 3. Sites enrol (own key pair, CA pinned by fingerprint), then run, each in its own process.
    await Promise.all(
      invitations.map((inv, i) =>
        runToEnd(['site', 'enroll', '--coordinator', `localhost:${port}`, '--token', inv.token, '--ca-fingerprint', inv.caFingerprint, '--dir', join(work, 'sites', siteNames[i])], join(logs, `${siteNames[i]}.log`)),
      ),
    );
    say(`  ${o.sites} sites enrolled with one-time tokens`);
    const agents = siteNames.map((n) =>
      spawnMedfl(['site', 'run', '--dir', join(work, 'sites', n), '--data', join(work, 'data', n), '--exit-when-finished', '--audit-wire', join(logs, `${n}.wire.jsonl`)], join(logs, `${n}.log`)),
    );
    children.push(...agents);

    // 4. Progress from the coordinator's own state.
    const store = new CoordinatorStore(home.dbPath);
    const total = o.rounds * o.sites;
    const tty = Boolean((out as NodeJS.WriteStream).isTTY);
    const bar = tty ? new cliProgress.SingleBar({ format: '  training |{bar}| {value}/{total} site-rounds | round {round} | {elapsed}s', stream: out as NodeJS.WriteStream, hideCursor: true }, cliProgress.Presets.shades_classic) : undefined;
    bar?.start(total, 0, { round: 1, elapsed: 0 });
    let lastClosed = 0;
    const timeout = o.timeoutMs ?? 10 * 60_000;
    await waitFor(
      () => {
        const rounds = store.listRounds();
        const done = rounds.reduce((n, r) => n + (r.state === 'closed' ? r.selected.length : store.updatesForRound(r.round).length), 0);
        const closed = store.closedRoundCount();
        const open = rounds.find((r) => r.state === 'open')?.round ?? closed;
        bar?.update(Math.min(done, total), { round: open, elapsed: Math.round((Date.now() - started) / 1000) });
        if (!tty && closed > lastClosed) {
          const r = rounds.filter((x) => x.state === 'closed').at(-1)!;
          say(`  round ${r.round} closed: ${r.selected.length} sites → model ${r.resultModelHash!.slice(0, 12)}… (${Math.round((Date.now() - started) / 1000)} s)`);
        }
        lastClosed = closed;
        const dead = agents.filter((a) => a.exitCode !== null && a.exitCode !== 0);
        if (coordinator.exitCode !== null) throw new Error(`the coordinator exited (code ${coordinator.exitCode}); see ${join(logs, 'coordinator.log')}`);
        if (dead.length > o.sites - Math.max(1, o.sites - 1)) throw new Error(`${dead.length} site agents died; see ${logs}`);
        return closed >= o.rounds;
      },
      timeout,
      `${o.rounds} rounds to close`,
      250,
    );
    bar?.stop();
    // Sites get FINISHED and exit on their own; give them a moment to send their last metrics.
    await waitFor(() => agents.every((a) => a.exitCode !== null), 30_000, 'site agents to finish').catch(() => undefined);

    say('');
    say('Rounds');
    say(roundsTable(store.listRounds()));
    say('');
    say('Local training and validation Dice (each site: its own head on the shared encoder, on its held-back cases)');
    say(metricsTable(store.listMetrics()));
    const model = store.getMeta('current_model')!;
    say('');
    say(`global model after ${store.closedRoundCount()} rounds: ${model}`);
    say(`  file: ${join(coordDir, 'models', `${model}.safetensors`)}`);
    say(`  what each site sent is listed in ${logs}/site-*.wire.jsonl; logs in ${logs}`);
    say(`finished in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    store.close();
    return true;
  } catch (e) {
    say(`demo failed: ${(e as Error).message}`);
    say(`logs are in ${logs}`);
    return false;
  } finally {
    killAll();
  }
}
