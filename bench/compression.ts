/**
 * Update compression on the demo's federation (3 sites, 5 rounds of 16 steps, 24³ phantoms, tiny3d width 8 —
 * the same data, seeds and plan as `medfl demo`), once per encoding: bytes each site uploaded and the sites'
 * validation Dice after the last round.
 *
 *   node --import tsx bench/compression.ts                 # float32, float16, int8, int8+delta
 *   BENCH_ENCODINGS=float32+model-float16,int8+delta+model-int8 node --import tsx bench/compression.ts
 *   BENCH_ENCODINGS=float32,int8+delta node --import tsx bench/compression.ts
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Table from 'cli-table3';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite } from '../coordinator/admin.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { writePhantomSite } from '../site-agent/data/phantom.ts';
import { freePort, runToEnd, spawnMedfl, waitFor } from '../cli/processes.ts';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const STEPS = 16;
const PROFILES = [
  { shift: 0, scale: 1 },
  { shift: 40, scale: 1.25 },
  { shift: -25, scale: 0.8 },
];

interface Outcome { uploadBytes: number; uploads: number; modelBytes: number; dice: number[]; seconds: number }

async function federation(encoding: string): Promise<Outcome> {
  // e.g. float32, int8+delta, int8+delta+model-float16
  const parts = encoding.split('+');
  const update = parts[0];
  const delta = parts.includes('delta') ? 'delta' : '';
  const model = parts.find((p) => p.startsWith('model-'))?.slice(6) ?? 'float32';
  const work = mkdtempSync(join(tmpdir(), `medfl-compress-${encoding}-`));
  const started = Date.now();
  const sites = ['site-a', 'site-b', 'site-c'];
  try {
    for (const [i, name] of sites.entries()) {
      const p = PROFILES[i];
      await writePhantomSite(join(work, 'data', name), { siteName: name, cases: 6, valCases: 3, size: [24, 24, 24], seed: 1000 * (i + 1), intensityShift: p.shift, intensityScale: p.scale });
    }
    const port = await freePort();
    const coordDir = join(work, 'coordinator');
    const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'], port });
    writeFileSync(home.planPath, [
      'name: medfl-demo',
      'model: { architecture: tiny3d, patch: [24, 24, 24], numClasses: 2, width: 8, seed: 7 }',
      `rounds: ${ROUNDS}`,
      'minSites: 3',
      'roundDeadlineSeconds: 300',
      'waitForSitesSeconds: 60',
      `local: { steps: ${STEPS}, batchSize: 2, learningRate: 0.005 }`,
      'share: { parts: [encoder] }',
      `compression: { update: ${update}, delta: ${delta === 'delta'}, model: ${model} }`,
      '',
    ].join('\n'));
    const logs = join(work, 'logs');
    mkdirSync(logs, { recursive: true });
    const coordinator = spawnMedfl(['coordinator', 'start', '--dir', coordDir, '--port', String(port), '--bind', '127.0.0.1'], join(logs, 'coordinator.log'));
    try {
      await waitFor(() => existsSync(join(logs, 'coordinator.log')) && readFileSync(join(logs, 'coordinator.log'), 'utf8').includes('listening on port'), 30_000, 'the coordinator');
      const invitations = sites.map((n) => addSite(coordDir, n, { ttlSeconds: 3600 }));
      await Promise.all(invitations.map((inv, i) => runToEnd(['site', 'enroll', '--coordinator', `localhost:${port}`, '--token', inv.token, '--ca-fingerprint', inv.caFingerprint, '--dir', join(work, 'sites', sites[i])], join(logs, `${sites[i]}.log`))));
      const agents = sites.map((n) => spawnMedfl(['site', 'run', '--dir', join(work, 'sites', n), '--data', join(work, 'data', n), '--exit-when-finished'], join(logs, `${n}.log`), { MEDFL_ENGINE: process.env.MEDFL_ENGINE ?? 'cpu' }));
      await waitFor(() => agents.every((a) => a.exitCode !== null), 20 * 60_000, 'the federation to finish', 500);
      const store = new CoordinatorStore(home.dbPath);
      const rows = store.listRounds().flatMap((r) => store.updatesForRound(r.round));
      const last = store.closedRoundCount();
      const dice = store.listMetrics().filter((m) => m.round === last && m.key === 'val_dice_mean').map((m) => m.value);
      const base1 = store.listRounds()[0].baseModelHash;
      const encoded = store.getMeta(`model_file:${model}:${base1}`);
      const modelBytes = encoded ? (JSON.parse(encoded) as { size: number }).size : store.getModel(base1)!.sizeBytes;
      store.close();
      return { uploadBytes: rows.reduce((s, u) => s + u.sizeBytes, 0), uploads: rows.length, modelBytes, dice, seconds: (Date.now() - started) / 1000 };
    } finally {
      if (coordinator.exitCode === null) {
        coordinator.kill('SIGTERM');
        await once(coordinator, 'exit');
      }
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const encodings = (process.env.BENCH_ENCODINGS ?? 'float32,float16,int8,int8+delta').split(',');
  const t = new Table({ head: ['encoding', 'bytes per update', '× float32', 'bytes per model download', `val Dice after round ${ROUNDS} (per site)`, 'mean Dice', 's'], colAligns: ['left', 'right', 'right', 'right', 'left', 'right', 'right'] });
  let ref: number | undefined;
  for (const e of encodings) {
    const o = await federation(e);
    const per = o.uploadBytes / Math.max(1, o.uploads);
    ref ??= per;
    const mean = o.dice.reduce((a, b) => a + b, 0) / Math.max(1, o.dice.length);
    t.push([e, Math.round(per).toLocaleString('en-US'), (per / ref).toFixed(3), o.modelBytes.toLocaleString('en-US'), o.dice.map((d) => d.toFixed(3)).join(' '), mean.toFixed(3), o.seconds.toFixed(0)]);
    process.stdout.write(`${e}: done in ${o.seconds.toFixed(0)} s\n`);
  }
  process.stdout.write(`${t.toString()}\n`);
}

main().catch((e: Error) => {
  process.stderr.write(`${e.stack ?? e.message}\n`);
  process.exitCode = 1;
});
