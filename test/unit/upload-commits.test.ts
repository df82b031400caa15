/**
 * The group commit of uploads (coordinator/server/upload-commits.ts) over real partial files, the real upload intake
 * and a real composed strategy: uploads waiting together are checked and folded in one batch pass read from their
 * files (never decoded whole), and the round's model is what one-by-one checked folds of the same updates give, byte
 * for byte; a bad update in a batch is refused alone in the one-at-a-time path's words; a store transaction that
 * fails takes the whole batch out of the sums again, acknowledges nothing and leaves no file; rounds without a batch
 * fold (median) and float16 uploads are committed one at a time. Through the real round engine: its round takes the
 * uploads in one batch (never one checkAndAdd per update), and a restart before the close counts each stored update
 * once, and a batch fold that fails part-way is sent again and the close rebuilds the round from its stored updates
 * (no restart).
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { strategyFromPlan } from '../../coordinator/aggregation/index.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import type { RoundAggregator, Verdict } from '../../coordinator/aggregation/strategy.ts';
import { RefusalWarnings } from '../../coordinator/events/refusal-warnings.ts';
import { FoldQueue } from '../../coordinator/rounds/fold-queue.ts';
import type { OpenRound } from '../../coordinator/rounds/open-round.ts';
import { RoundEvents } from '../../coordinator/rounds/round-events.ts';
import { UploadIntake } from '../../coordinator/rounds/upload-intake.ts';
import { UploadCommits } from '../../coordinator/server/upload-commits.ts';
import { RoundRecovery } from '../../coordinator/rounds/round-recovery.ts';
import { UploadReceiver } from '../../coordinator/server/upload-receiver.ts';
import type { CoordinatorStore, UpdateRow } from '../../coordinator/store/store.ts';
import { InProcessBus } from '../../shared/events/bus.ts';
import type { ParamInfo } from '../../shared/model/types.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { CHUNK_BYTES } from '../../shared/protocol/grpc.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { encodeUpdate } from '../../shared/tensors/update-codec.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { foldFixture, maxUlpDiff } from '../helpers/fold-fixture.ts';
import { bareEngine } from '../helpers/bare-engine.ts';
import { waitFor } from '../../cli/processes.ts';
import { pick } from '../../shared/model/sharing.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { parsePlan } from '../../shared/plan/load.ts';

const fixture = foldFixture([5, 8193, 70003]);
const { specs, update, baseModel, bundleOf, total, offsets } = fixture;
const BASE = 'b'.repeat(64);
const SITES = ['s0', 's1', 's2', 's3', 's4', 's5'];
const log = pino({ level: 'silent' });
const full = () => Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' });

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-upload-commits-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const aggregation = (a: Record<string, unknown>) => PlanSchema.parse({ aggregation: a }).aggregation;

/** A coordinator's commit path around one open round of `strategy`: real intake and receiver, a store in memory. */
function commitPath(strategy: ComposedStrategy, o: { decodes?: boolean; maxBatchBytes?: number } = {}) {
  const receiver = new UploadReceiver(join(dir, 'updates'), specs, 1 << 24);
  const base = bundleOf(baseModel(5));
  const open: OpenRound = {
    row: { round: 1, selected: SITES, baseModelHash: BASE } as OpenRound['row'],
    aggregator: strategy.begin(base, specs, { expected: SITES.length }),
    reported: new Set(),
    closing: false,
    stage: { kind: 'fine-tuning', index: 1 },
  };
  const rows: UpdateRow[] = [];
  const store = {
    fails: undefined as (() => Error) | undefined,
    updateFor: (round: number, site: string) => rows.find((r) => r.round === round && r.site === site),
    insertUpdate(row: UpdateRow) {
      if (this.fails) throw this.fails();
      rows.push(row);
    },
    insertUpdates(updates: readonly { row: UpdateRow }[]) {
      if (this.fails) throw this.fails();
      rows.push(...updates.map((u) => u.row));
    },
  };
  const shared = specs.map((s) => ({ name: s.name, shape: s.shape })) as unknown as ParamInfo[];
  const intake = new UploadIntake({ store: store as unknown as CoordinatorStore, shared, events: new RoundEvents('fed', new InProcessBus()), refusals: new RefusalWarnings(log), strategyName: strategy.name, open: () => open, finished: () => false });
  const folds = new FoldQueue();
  const engine = {
    admissionProblem: (site: string, round: number, hash: string) => intake.admissionProblem(site, round, hash),
    checkAndFold: (site: string, round: number, u: TensorBundle, n: number, d: boolean) => intake.checkAndFold(site, round, u, n, d),
    unfold: (site: string, round: number, u: TensorBundle, n: number, d: boolean, v: Verdict) => intake.unfold(site, round, u, n, d, v),
    fold: (row: UpdateRow, u: TensorBundle, opts: { isDelta?: boolean; verdict?: Verdict; folded?: boolean }) => intake.fold(row, u, opts),
    checkAndFoldBatch: (round: number, items: Parameters<UploadIntake['checkAndFoldBatch']>[1]) => intake.checkAndFoldBatch(round, items),
    unfoldItem: (round: number, item: Parameters<UploadIntake['unfoldItem']>[1], v: Verdict) => intake.unfoldItem(round, item, v),
    folded: (row: UpdateRow) => intake.folded(row),
    serialised: <T>(fn: () => T | Promise<T>) => folds.run(fn),
    acceptedEvent: (row: UpdateRow) => intake.acceptedEvent(row),
    aggregateStale: (_round: number, why: string) => void stale.push(why),
  };
  const stale: string[] = [];
  const batches: number[] = [];
  const decoded: string[] = [];
  // With decodes: false, a whole-file decode (the one-at-a-time path) fails the test's upload.
  const finish: UploadReceiver['finish'] = (p, site) => {
    decoded.push(site);
    if (o.decodes === false) throw new Error('decoded into the scratch buffer');
    return receiver.finish(p, site);
  };
  const commits = new UploadCommits({ engine, store, receiver: { verify: (p, s) => receiver.verify(p, s), inspect: (p) => receiver.inspect(p), place: (p, s) => receiver.place(p, s), syncFolder: (f) => receiver.syncFolder(f), finish }, log, onBatch: (n) => batches.push(n), maxBatchBytes: o.maxBatchBytes });
  const acks: string[] = [];

  /** One site's upload, its bytes written, fsynced and hashed: ready for the commit. */
  async function closed(site: string, bytes: Uint8Array, numSamples: number) {
    const p = receiver.begin({ updateId: `update-${site}`, round: 1, taskId: 't', baseModelHash: BASE, totalSize: bytes.length, sha256: sha256Hex(bytes), numSamples });
    for (let at = 0; at < bytes.length; at += CHUNK_BYTES) p.write(at, Buffer.from(bytes.subarray(at, Math.min(bytes.length, at + CHUNK_BYTES))));
    await p.close();
    return { site, partial: p };
  }
  /** Uploads handed over at once, so they wait together, each settled. */
  async function together(ups: [string, Uint8Array, number][], ackFails?: string) {
    const ready = await Promise.all(ups.map(([s, b, n]) => closed(s, b, n)));
    const acknowledge = (row: UpdateRow) => {
      if (row.site === ackFails) throw new Error('the call is gone');
      acks.push(row.site);
      return Promise.resolve();
    };
    return Promise.allSettled(ready.map((r) => commits.submit({ ...r, acknowledge })));
  }
  const files = () => readdirSync(join(dir, 'updates', 'round-1')).sort();
  const partials = () => readdirSync(join(dir, 'updates', '.partial'));
  return { open, base, rows, store, batches, decoded, acks, together, files, partials };
}

/** The reference: the same updates through checkAndAdd() (or check() + add() where it declines) one at a time, in order. */
function oneByOne(strategy: ComposedStrategy, base: TensorBundle, ups: [TensorBundle, number][]): { agg: RoundAggregator; verdicts: Verdict[] } {
  const agg = strategy.begin(base, specs, { expected: SITES.length });
  const verdicts = ups.map(([u, n], k) => {
    const info = { site: SITES[k], numSamples: n };
    const fused = agg.checkAndAdd?.(u, info);
    if (fused) return fused;
    const v = agg.check(u, info);
    if (!v.problem) agg.add(u, info, v);
    return v;
  });
  return { agg, verdicts };
}

function flat(agg: RoundAggregator): Float32Array {
  const res = agg.finish();
  const out = new Float32Array(total);
  for (const sp of specs) out.set(res.get(sp.name)!.data, offsets.get(sp.name)!.off);
  return out;
}

const ups = [11, 12, 13, 14, 15].map((k) => update(k));
const weights = [3, 7, 1, 12, 5];

describe('group commit of uploads', () => {
  it('folds the uploads waiting together in one batch pass read from their files: the one-by-one model byte for byte, one row each, acked after', async () => {
    for (const cfg of [aggregation({}), aggregation({ validation: { maxNorm: 1e6 } }), aggregation({ clipNorm: 50 })]) {
      rmSync(join(dir, 'updates'), { recursive: true, force: true });
      const c = commitPath(new ComposedStrategy(cfg), { decodes: false });
      const settled = await c.together(ups.map((u, k) => [SITES[k], encodeSafetensors(u), weights[k]]));
      expect(settled.map((s) => s.status)).toEqual(ups.map(() => 'fulfilled'));
      expect(c.batches).toEqual([5]);
      expect(c.decoded).toEqual([]);
      expect(c.rows.map((r) => r.site)).toEqual(SITES.slice(0, 5));
      expect(c.acks).toEqual(SITES.slice(0, 5));
      expect([...c.open.reported]).toEqual(SITES.slice(0, 5));
      expect(c.files()).toEqual(SITES.slice(0, 5).map((s) => `${s}-update-${s}.safetensors`));
      expect(c.partials()).toEqual([]);
      const ref = oneByOne(new ComposedStrategy(cfg), c.base, ups.map((u, k) => [u, weights[k]]));
      expect(Buffer.from(flat(c.open.aggregator).buffer).equals(Buffer.from(flat(ref.agg).buffer))).toBe(true);
    }
  });

  it('bounds a batch by its bytes (the pass holds the event loop), in arrival order: the same model byte for byte', async () => {
    const size = encodeSafetensors(ups[0]).length;
    const c = commitPath(new ComposedStrategy(aggregation({})), { decodes: false, maxBatchBytes: Math.floor(2.5 * size) });
    const settled = await c.together(ups.map((u, k) => [SITES[k], encodeSafetensors(u), weights[k]]));
    expect(settled.map((s) => s.status)).toEqual(ups.map(() => 'fulfilled'));
    expect(c.batches).toEqual([2, 2, 1]);
    expect(c.rows.map((r) => r.site)).toEqual(SITES.slice(0, 5));
    const ref = oneByOne(new ComposedStrategy(aggregation({})), c.base, ups.map((u, k) => [u, weights[k]]));
    expect(Buffer.from(flat(c.open.aggregator).buffer).equals(Buffer.from(flat(ref.agg).buffer))).toBe(true);
    // An update larger than the bound alone is still a batch (of one).
    rmSync(join(dir, 'updates'), { recursive: true, force: true });
    const c2 = commitPath(new ComposedStrategy(aggregation({})), { decodes: false, maxBatchBytes: 1 });
    expect((await c2.together(ups.slice(0, 2).map((u, k) => [SITES[k], encodeSafetensors(u), weights[k]]))).map((s) => s.status)).toEqual(['fulfilled', 'fulfilled']);
    expect(c2.batches).toEqual([1, 1]);
  });

  it('one site whose acknowledgement fails does not fail the others of its batch: all stored and counted', async () => {
    const c = commitPath(new ComposedStrategy(aggregation({})), { decodes: false });
    const settled = await c.together(ups.slice(0, 3).map((u, k) => [SITES[k], encodeSafetensors(u), weights[k]]), 's1');
    expect(settled.map((s) => s.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
    expect(c.batches).toEqual([3]);
    expect(c.rows.map((r) => r.site)).toEqual(['s0', 's1', 's2']);
    expect(c.acks).toEqual(['s0', 's2']);
    expect([...c.open.reported]).toEqual(['s0', 's1', 's2']);
  });

  it('refuses a bad update of a batch alone, in the words of the one-at-a-time path, and keeps the rest', async () => {
    const nan = update(30);
    nan.get('t2')!.data[30000] = Number.NaN;
    const batch: [TensorBundle, number][] = [[ups[0], 3], [nan, 4], [ups[1], 7]];
    const c = commitPath(new ComposedStrategy(aggregation({})), { decodes: false });
    const settled = await c.together(batch.map(([u, n], k) => [SITES[k], encodeSafetensors(u), n]));
    const ref = oneByOne(new ComposedStrategy(aggregation({})), c.base, batch);
    expect(ref.verdicts[1].problem).toMatch(/tensor "t2" holds NaN at index 30000/);
    expect(settled[1]).toMatchObject({ status: 'rejected', reason: { name: 'UploadRefused', message: ref.verdicts[1].problem } });
    expect(settled.filter((s) => s.status === 'fulfilled')).toHaveLength(2);
    expect(c.batches).toEqual([3]);
    expect(c.rows.map((r) => r.site)).toEqual(['s0', 's2']);
    expect(c.files()).toEqual(['s0-update-s0.safetensors', 's2-update-s2.safetensors']);
    expect(c.partials()).toEqual([]);
    expect(maxUlpDiff(flat(c.open.aggregator), flat(ref.agg))).toBeLessThanOrEqual(1);
  });

  it('a failing store transaction takes the whole batch out of the sums: nothing acked, counted or left on disk; sent again, it counts once', async () => {
    for (const cfg of [aggregation({ validation: { maxNorm: 1e6 } }), aggregation({ clipNorm: 50 })]) {
      rmSync(join(dir, 'updates'), { recursive: true, force: true });
      const c = commitPath(new ComposedStrategy(cfg), { decodes: false });
      const bytes = ups.map((u) => encodeSafetensors(u));
      await c.together([0, 1].map((k) => [SITES[k], bytes[k], weights[k]]));
      c.store.fails = full;
      const failed = await c.together([2, 3, 4].map((k) => [SITES[k], bytes[k], weights[k]]));
      expect(failed).toEqual([0, 1, 2].map(() => ({ status: 'rejected', reason: expect.objectContaining({ code: 'SQLITE_FULL' }) })));
      expect(c.open.aggregator.count).toBe(2);
      expect(c.acks).toEqual(['s0', 's1']);
      expect([...c.open.reported]).toEqual(['s0', 's1']);
      expect(c.files()).toEqual(['s0-update-s0.safetensors', 's1-update-s1.safetensors']);
      expect(c.partials()).toEqual([]);
      c.store.fails = undefined;
      const again = await c.together([2, 3, 4].map((k) => [SITES[k], bytes[k], weights[k]]));
      expect(again.map((s) => s.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
      expect(c.batches).toEqual([2, 3, 3]);
      expect(c.rows.map((r) => r.site)).toEqual(SITES.slice(0, 5));
      const ref = oneByOne(new ComposedStrategy(cfg), c.base, ups.map((u, k) => [u, weights[k]]));
      // Taken out and folded again: the sums within float64 rounding of never having failed (retract's promise).
      expect(maxUlpDiff(flat(c.open.aggregator), flat(ref.agg))).toBeLessThanOrEqual(1);
    }
  });

  it('a second update of one site in the same batch is refused as already reported, and its file never replaces the first', async () => {
    const c = commitPath(new ComposedStrategy(aggregation({})), { decodes: false });
    const settled = await c.together([['s0', encodeSafetensors(ups[0]), 3], ['s0', encodeSafetensors(ups[1]), 3]]);
    expect(settled[0].status).toBe('fulfilled');
    expect(settled[1]).toMatchObject({ status: 'rejected', reason: { message: "site 's0' already reported an update for round 1" } });
    expect(c.open.aggregator.count).toBe(1);
    expect(c.files()).toEqual(['s0-update-s0.safetensors']);
  });

  it('commits median rounds and float16 uploads one at a time, decoded as before', async () => {
    const median = commitPath(new ComposedStrategy(aggregation({ strategy: 'median' })));
    const m = await median.together(ups.slice(0, 3).map((u, k) => [SITES[k], encodeSafetensors(u), weights[k]]));
    expect(m.map((s) => s.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
    expect(median.batches).toEqual([]);
    expect(median.decoded).toEqual(['s0', 's1', 's2']);
    expect(median.open.aggregator.count).toBe(3);

    rmSync(join(dir, 'updates'), { recursive: true, force: true });
    const half = commitPath(new ComposedStrategy(aggregation({})));
    const h = await half.together([['s0', encodeUpdate(ups[0], { update: 'float16', delta: false }), 3], ['s1', encodeSafetensors(ups[1]), 7]]);
    expect(h.map((s) => s.status)).toEqual(['fulfilled', 'fulfilled']);
    expect(half.batches).toEqual([1]);
    expect(half.decoded).toEqual(['s0']);
    expect(half.open.aggregator.count).toBe(2);
  });

  it('one at a time, a second upload of an update already stored is refused without touching the stored file', async () => {
    const c = commitPath(new ComposedStrategy(aggregation({})));
    // float16: the one-at-a-time path, whose admission check used to come after the file had moved.
    const bytes = encodeUpdate(ups[0], { update: 'float16', delta: false });
    expect((await c.together([['s0', bytes, 3]]))[0].status).toBe('fulfilled');
    // The site's retry, crossing its first attempt: the same update id, so the same final file name.
    const again = await c.together([['s0', bytes, 3]]);
    expect(again[0]).toMatchObject({ status: 'rejected', reason: { name: 'UploadRefused', message: expect.stringMatching(/already reported/) } });
    expect(c.files()).toEqual(['s0-update-s0.safetensors']);
    expect(c.partials()).toEqual([]);
    expect(c.rows.map((r) => r.site)).toEqual(['s0']);
  });
});

describe('group commit through the round engine', () => {
  const plan = parsePlan(['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 1', 'minSites: 3', 'gatherSeconds: 0', 'roundDeadlineSeconds: 60', ''].join('\n'), 'plan.yaml');
  const sites = ['site-a', 'site-b', 'site-c'];

  /** A bare engine in `at` with round 1 open for the three sites, and each site's update closed and ready to commit. */
  async function openRound(at: string, strategy: ComposedStrategy) {
    const b = bareEngine(at, plan, { strategy });
    b.enrol(sites);
    await b.engine.start();
    b.connect(sites);
    await waitFor(() => b.tasks.length === 3, 5000, 'the three tasks of round 1');
    const hash = b.engine.currentModelHash;
    const base = pick(b.models.load(hash), b.engine.shared);
    const specs = b.engine.shared.map((p) => ({ name: p.name, shape: [...p.shape], dtype: 'F32' as const }));
    const receiver = new UploadReceiver(join(at, 'updates'), specs, 1 << 24);
    const commits = new UploadCommits({ engine: b.engine, store: b.store, receiver, log });
    const closed = async (site: string) => {
      const k = sites.indexOf(site);
      const bytes = encodeSafetensors(makeBundle([...base.values()].map((t) => ({ ...t, data: t.data.map((v, j) => v + 0.01 * (k + 1) * Math.sin(j)) }))));
      const p = receiver.begin({ updateId: `update-${site}`, round: 1, taskId: 't', baseModelHash: hash, totalSize: bytes.length, sha256: sha256Hex(bytes), numSamples: 4 + k });
      p.write(0, Buffer.from(bytes));
      await p.close();
      return { site, partial: p };
    };
    return { b, commits, closed };
  }

  it("the engine's round folds uploads waiting together in one batch, and after a restart counts each stored update once", async () => {
    // Which of the round's check-and-fold entry points the engine uses.
    const calls: string[] = [];
    const strategy = strategyFromPlan(plan);
    const begin = strategy.begin.bind(strategy);
    strategy.begin = (...args) => {
      const agg = begin(...args);
      const batch = agg.checkAndAddBatch!.bind(agg);
      const one = agg.checkAndAdd!.bind(agg);
      agg.checkAndAddBatch = (items) => (calls.push(`batch of ${items.length}`), batch(items));
      agg.checkAndAdd = (u, info) => (calls.push('one'), one(u, info));
      return agg;
    };
    const { b: first, commits, closed } = await openRound(dir, strategy);
    const ready = await Promise.all(sites.map(closed));
    const acked: string[] = [];
    const rows = await Promise.all(ready.map((r) => commits.submit({ ...r, acknowledge: async (row) => void acked.push(row.site) })));
    expect(calls).toEqual(['batch of 3']);
    expect(acked).toEqual(sites);
    expect(first.store.updatesForRound(1).map((u) => u.site).sort()).toEqual(sites);

    // Killed before the close (the acks are out, engine.accepted() never ran): the restart re-folds the stored updates.
    first.close();
    const second = bareEngine(dir, plan);
    await second.engine.start();
    await waitFor(() => second.store.getRound(1)?.state === 'closed', 10_000, 'round 1 to close after the restart');
    expect(second.store.updatesForRound(1).map((u) => u.updateId).sort()).toEqual(rows.map((r) => r.updateId).sort());
    expect(second.events.find((e) => e.type === 'round.closed')).toMatchObject({ round: 1, sites });
    second.close();
  });

  it('a batch fold that fails part-way is refused and sent again, and the close rebuilds the round from its stored updates: the model of a clean round, no restart', async () => {
    /** Round 1 with the three sites' updates; with `failFirst`, the first batch (two of them) fails after folding. */
    async function round(at: string, failFirst: boolean) {
      const strategy = strategyFromPlan(plan);
      let failures = failFirst ? 1 : 0;
      const begin = strategy.begin.bind(strategy);
      strategy.begin = (...args) => {
        const agg = begin(...args);
        const batch = agg.checkAndAddBatch!.bind(agg);
        agg.checkAndAddBatch = (items) => {
          const verdicts = batch(items);
          if (failures-- > 0) throw new Error('EIO: i/o error, read');
          return verdicts;
        };
        return agg;
      };
      mkdirSync(at, { recursive: true });
      const { b, commits, closed } = await openRound(at, strategy);
      // Closed first, then handed over at once, so they wait together.
      const send = async (which: string[]) => {
        const ready = await Promise.all(which.map(closed));
        return Promise.allSettled(
          ready.map(async (r) => {
            const row = await commits.submit({ ...r, acknowledge: async () => undefined });
            await b.engine.accepted(row);
            return row;
          }),
        );
      };
      if (failFirst) {
        const first = await send(['site-a', 'site-b']);
        expect(first.map((r) => r.status)).toEqual(['rejected', 'rejected']);
        expect(b.store.updatesForRound(1)).toEqual([]);
      }
      expect((await send(sites)).map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
      await waitFor(() => b.store.getRound(1)?.state === 'closed', 10_000, 'round 1 to close');
      const result = b.store.getRound(1)!.resultModelHash;
      b.close();
      return result;
    }
    const clean = await round(join(dir, 'clean'), false);
    const failed = await round(join(dir, 'failed'), true);
    // Without the rebuild the failed batch's two updates would count twice.
    expect(failed).toBe(clean);
  });

  it('a running coordinator reads the stored updates again with a turn of the event loop after each: the same aggregate as at start-up', async () => {
    const strategy = strategyFromPlan(plan);
    const { b, commits, closed } = await openRound(dir, strategy);
    const ready = await Promise.all(sites.map(closed));
    await Promise.all(ready.map((r) => commits.submit({ ...r, acknowledge: async () => undefined })));
    const row = b.store.getRound(1)!;
    const recovery = new RoundRecovery({ store: b.store, models: b.models, plan, strategy, shared: b.engine.shared, features: {} as never, events: {} as never, log });
    let turns = 0;
    let reading = true;
    const tick = () => {
      turns++;
      if (reading) setImmediate(tick);
    };
    setImmediate(tick);
    const yielding = await recovery.refoldYielding(row);
    reading = false;
    expect(turns).toBeGreaterThanOrEqual(sites.length); // a heartbeat could have been answered after each update
    expect([...yielding.reported].sort()).toEqual(sites);
    const values = (r: { aggregator: RoundAggregator }) => [...r.aggregator.finish().values()].map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).toString('hex')).join();
    // Each finished before the next begins: one round's aggregator at a time, as in the coordinator.
    const yielded = values(yielding);
    expect(yielded).toBe(values(recovery.refold(row)));
    b.close();
  });
});

