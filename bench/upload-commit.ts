/**
 * `npm run bench:upload-commit`: the coordinator's commit of accepted uploads, alone, as a same-run A/B — the group
 * commit (coordinator/server/upload-commits.ts: every waiting upload checked and folded in one batch pass read from
 * its file, one directory fsync, one SQLite transaction) against the one-at-a-time path it replaced (each upload read
 * into the receiver's buffer, checked and folded, renamed + directory fsync, its own transaction), on the same
 * closed uploads, real partial files, a real SQLite store (WAL, synchronous=FULL) and the plan's default strategy.
 *
 *   npm run bench:upload-commit -- [--updates 256] [--model-mb 1] [--reps 3] [--wave 32]
 *
 * `--wave` uploads are handed over at once, and the next wave once they are all acknowledged: at most that many wait
 * together (a queue that keeps up sees batches of one). Per path: wall and main-thread CPU per update, and the batch
 * sizes the group commit made. bench:sites measures the same path inside a whole federation, where it is a part.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { ComposedStrategy } from '../coordinator/aggregation/composed.ts';
import { RefusalWarnings } from '../coordinator/events/refusal-warnings.ts';
import { FoldQueue } from '../coordinator/rounds/fold-queue.ts';
import type { OpenRound } from '../coordinator/rounds/open-round.ts';
import { RoundEvents } from '../coordinator/rounds/round-events.ts';
import { UploadIntake } from '../coordinator/rounds/upload-intake.ts';
import { UploadCommits } from '../coordinator/server/upload-commits.ts';
import { UploadReceiver, type PartialUpload } from '../coordinator/server/upload-receiver.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { InProcessBus } from '../shared/events/bus.ts';
import type { ParamInfo } from '../shared/model/types.ts';
import { PlanSchema } from '../shared/plan/schema.ts';
import { CHUNK_BYTES } from '../shared/protocol/grpc.ts';
import { makeBundle, type TensorSpec } from '../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../shared/tensors/safetensors.ts';
import { sha256Hex } from '../shared/util/hash.ts';
import { mulberry32 } from '../shared/util/random.ts';

const { values: a } = parseArgs({ options: { updates: { type: 'string', default: '256' }, 'model-mb': { type: 'string', default: '1' }, reps: { type: 'string', default: '3' }, wave: { type: 'string', default: '32' } } });
const N = Number(a.updates);
const floats = Math.round((Number(a['model-mb']) * 1e6) / 4);
const reps = Number(a.reps);
const wave = Number(a.wave);
const say = (s: string) => process.stdout.write(`${s}\n`);
const BASE = 'b'.repeat(64);

// Two tensors, so the layout checks and the per-tensor passes are not trivial.
const specs: TensorSpec[] = [
  { name: 'w', dtype: 'F32', shape: [floats - 1000] },
  { name: 'b', dtype: 'F32', shape: [1000] },
];
const rng = mulberry32(7);
const tensor = (s: TensorSpec, scale: number) => ({ ...s, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, () => scale * (rng() - 0.5)) });
const base = makeBundle(specs.map((s) => tensor(s, 1)));
// A few distinct updates, reused (making N of them is not what is measured).
const payloads = [0, 1, 2, 3].map(() => encodeSafetensors(makeBundle(specs.map((s) => tensor(s, 1)))));

type Path = 'one at a time' | 'group commit';

async function run(path: Path): Promise<{ wallS: number; cpuS: number; batches: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-bench-commit-'));
  const store = new CoordinatorStore(join(dir, 'state.db'));
  try {
    const sites = Array.from({ length: N }, (_, i) => `site-${i}`);
    store.openRound({ round: 1, baseModelHash: BASE, selected: sites, openedAt: Date.now(), deadlineAt: Date.now() + 3_600_000 });
    const strategy = new ComposedStrategy(PlanSchema.parse({}).aggregation);
    const open: OpenRound = { row: store.getRound(1)!, aggregator: strategy.begin(base, specs, { expected: N }), reported: new Set(), closing: false, stage: { kind: 'fine-tuning', index: 1 } };
    const log = pino({ level: 'silent' });
    const shared = specs.map((s) => ({ name: s.name, shape: s.shape })) as unknown as ParamInfo[];
    const intake = new UploadIntake({ store, shared, events: new RoundEvents('bench', new InProcessBus()), refusals: new RefusalWarnings(log), strategyName: strategy.name, open: () => open, finished: () => false });
    const folds = new FoldQueue();
    const engine = {
      admissionProblem: intake.admissionProblem.bind(intake),
      checkAndFold: intake.checkAndFold.bind(intake),
      unfold: intake.unfold.bind(intake),
      fold: intake.fold.bind(intake),
      checkAndFoldBatch: intake.checkAndFoldBatch.bind(intake),
      unfoldItem: intake.unfoldItem.bind(intake),
      folded: intake.folded.bind(intake),
      acceptedEvent: intake.acceptedEvent.bind(intake),
      serialised: <T>(fn: () => T | Promise<T>) => folds.run(fn),
      // A bench whose folds fail measures nothing: stop it.
      aggregateStale: (_round: number, why: string) => {
        process.stderr.write(`bench:upload-commit: ${why}\n`);
        process.exit(1);
      },
    };
    const receiver = new UploadReceiver(join(dir, 'updates'), specs, 1 << 30);
    // The one-at-a-time path: a receiver that cannot hand a file to the batch, so every upload is decoded.
    const wrapped = {
      verify: receiver.verify.bind(receiver),
      inspect: path === 'group commit' ? receiver.inspect.bind(receiver) : () => undefined,
      place: receiver.place.bind(receiver),
      syncFolder: receiver.syncFolder.bind(receiver),
      finish: receiver.finish.bind(receiver),
    };
    const batches: number[] = [];
    const commits = new UploadCommits({ engine, store, receiver: wrapped, log, onBatch: (n) => batches.push(n) });
    const closed: PartialUpload[] = [];
    for (let i = 0; i < N; i++) {
      const bytes = payloads[i % payloads.length];
      const p = receiver.begin({ updateId: `update-${i}`, round: 1, taskId: 't', baseModelHash: BASE, totalSize: bytes.length, sha256: sha256Hex(bytes), numSamples: 1 + (i % 7) });
      for (let at = 0; at < bytes.length; at += CHUNK_BYTES) p.write(at, Buffer.from(bytes.subarray(at, Math.min(bytes.length, at + CHUNK_BYTES))));
      await p.close();
      closed.push(p);
    }
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    for (let w = 0; w < N; w += wave) {
      const rows = await Promise.all(closed.slice(w, w + wave).map((partial, j) => commits.submit({ site: sites[w + j], partial, acknowledge: async () => undefined })));
      if (rows.length !== Math.min(wave, N - w)) throw new Error('an upload was not committed');
    }
    const wallS = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    if (store.updatesForRound(1).length !== N || open.aggregator.count !== N) throw new Error(`${path}: ${store.updatesForRound(1).length} rows, ${open.aggregator.count} folded, expected ${N}`);
    open.aggregator.discard?.();
    return { wallS, cpuS: (cpu.user + cpu.system) / 1e6, batches };
  } finally {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

say(`bench:upload-commit — ${N} uploads of ${((floats * 4) / 1e6).toFixed(1)} MB, ${wave} handed over at a time, ${reps} reps each path (alternating); load ${(await import('node:os')).loadavg().map((l) => l.toFixed(1)).join(' ')}`);
const results = new Map<Path, { wallS: number; cpuS: number; batches: number[] }[]>();
for (let r = 0; r < reps; r++) {
  for (const path of ['one at a time', 'group commit'] as Path[]) {
    const res = await run(path);
    results.set(path, [...(results.get(path) ?? []), res]);
  }
}
const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
say('');
say('| path | ms per update, wall (median; all) | CPU ms per update (median) | batch sizes (first rep) |');
say('|---|---|---|---|');
for (const [path, rs] of results) {
  const wall = rs.map((x) => (x.wallS * 1000) / N);
  const cpu = rs.map((x) => (x.cpuS * 1000) / N);
  const sizes = rs[0].batches.length ? `${rs[0].batches.length} batches, mean ${(rs[0].batches.reduce((s, b) => s + b, 0) / rs[0].batches.length).toFixed(1)}` : '—';
  say(`| ${path} | ${median(wall).toFixed(2)} (${wall.map((x) => x.toFixed(2)).join(', ')}) | ${median(cpu).toFixed(2)} | ${sizes} |`);
}
say(`load after: ${(await import('node:os')).loadavg().map((l) => l.toFixed(1)).join(' ')}`);
