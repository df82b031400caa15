/**
 * Issue 14, item 1, at the round engine, through a real coordinator (gRPC, TLS, tokens; test/aggregation/inproc.ts)
 * with scripted sites: a 3e38 update is refused in round 1 (it used to make the global model +Inf for good);
 * a site claiming 1,000,000 samples gets at most half the weight and is flagged; the operator rolls back while
 * the coordinator runs, and the rollback reaches the event stream and the contribution ledger. Plus: an aggregate
 * that is not finite fails its round with a reason and is never published.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readFileSync } from 'node:fs';
import { createPublicKey } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { InprocFederation, type ScriptedSite } from './inproc.ts';
import { runRollback } from '../../cli/rollback.ts';
import { waitFor } from '../../cli/processes.ts';
import { verifyChain } from '../../coordinator/ledger/chain.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { RoundEngine, type TaskMessage } from '../../coordinator/rounds/round-engine.ts';
import { signedTask } from '../../coordinator/rounds/task-signer.ts';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import type { AggregationStrategy } from '../../coordinator/aggregation/strategy.ts';
import { InProcessBus, type FederationEvent } from '../../shared/events/bus.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { rawPublicKey } from '../../shared/security/site-identity.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';

const plan = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 3',
  'minSites: 3',
  'gatherSeconds: 0',
  'roundDeadlineSeconds: 60',
  '',
].join('\n');

const shift = (b: TensorBundle, f: (v: number, j: number, name: string) => number) =>
  makeBundle([...b.values()].map((t) => ({ ...t, data: Float32Array.from(t.data, (v, j) => f(v, j, t.name)) })));

let f: InprocFederation | undefined;
afterAll(async () => {
  await f?.close();
});

describe('a hostile site against a running coordinator with the default plan', () => {
  it('3e38 is refused, 1,000,000 samples are capped to half the weight and flagged, and the operator can roll back', async () => {
    f = await InprocFederation.create(plan, ['site-a', 'site-b', 'site-evil']);
    const [a, b, evil] = f.connect(['site-a', 'site-b', 'site-evil']);
    const honest = (_s: ScriptedSite, base: TensorBundle, i: number) => shift(base, (v, j) => v + 0.01 * Math.sin(j + i));

    // Round 1: the overflow attack, first in line (no norm reference exists yet).
    const t1 = await f.task(evil, 1);
    const base1 = f.model(t1.modelHash);
    const first = [...base1.keys()][0];
    const huge = await f.upload(evil, t1, encodeSafetensors(shift(base1, (v, j, n) => (n === first && j === 0 ? 3e38 : v))), 4);
    expect(huge.accepted).toBe(false);
    expect(huge.reason).toMatch(/proposes weight 3\.000e\+38 .* \(aggregation\.validation\.maxValue\)/);
    for (const [i, s] of [a, b, evil].entries()) expect((await f.upload(s, await f.task(s, 1), encodeSafetensors(honest(s, base1, i)), 4)).accepted).toBe(true);
    await f.closedRounds(1);
    const round1 = f.coord!.store.getRound(1)!.resultModelHash!;
    for (const t of f.model(round1).values()) expect(t.data.every(Number.isFinite)).toBe(true);

    // Round 2: the sample-count attack. The evil site's update differs from the honest ones by a known amount.
    const t2 = await f.task(evil, 2);
    const base2 = f.model(t2.modelHash);
    const ups = [a, b].map((s, i) => honest(s, base2, i));
    const evilUpdate = shift(base2, (v, j) => v - 0.02 * Math.cos(j));
    for (const [i, s] of [a, b].entries()) expect((await f.upload(s, await f.task(s, 2), encodeSafetensors(ups[i]), 4)).accepted).toBe(true);
    const ack = await f.upload(evil, t2, encodeSafetensors(evilUpdate), 1_000_000);
    expect(ack.accepted, ack.reason).toBe(true);
    await f.closedRounds(2);
    const round2 = f.model(f.coord!.store.getRound(2)!.resultModelHash!);
    // Capped weights 4, 4, 8: the evil site holds half the weight, not 99.9992 %.
    for (const [name, t] of round2) {
      for (let j = 0; j < t.data.length; j += 97) {
        const want = (4 * ups[0].get(name)!.data[j] + 4 * ups[1].get(name)!.data[j] + 8 * evilUpdate.get(name)!.data[j]) / 16;
        expect(t.data[j]).toBeCloseTo(want, 5);
      }
    }
    const flagged = f.events.find((e) => e.type === 'update.flagged');
    expect(flagged).toMatchObject({ site: 'site-evil', round: 2, samples: 1_000_000, previousMedian: 4 });

    // Round 3 is open; the operator returns the federation to round 1's model while the coordinator runs.
    await f.task(a, 3);
    const r = runRollback({ dir: f.coordDir, to: '1', reason: 'site-evil claimed 1,000,000 samples' });
    expect(r).toMatchObject({ toModel: round1, toRound: 1, failedRound: 3 });
    await waitFor(() => f!.events.some((e) => e.type === 'model.rolled_back'), 10_000, 'the rollback event');
    expect(f.events.find((e) => e.type === 'model.rolled_back')).toMatchObject({ round: 1, toModel: round1, failedRound: 3, reason: 'site-evil claimed 1,000,000 samples' });
    expect(f.coord!.store.getRound(3)).toMatchObject({ state: 'failed' });
    expect(f.coord!.store.getRound(3)!.note).toMatch(/rolled back by the operator/);
    // The next round starts from round 1's model.
    const t4 = await f.task(a, 4);
    expect(t4.modelHash).toBe(round1);
    // The ledger holds the rollback, signed and chained like every contribution.
    const home = new CoordinatorHome(f.coordDir);
    await waitFor(() => readFileSync(join(f!.coordDir, 'ledger.jsonl'), 'utf8').includes('"rollback"'), 10_000, 'the ledger entry');
    const report = verifyChain(readFileSync(join(f.coordDir, 'ledger.jsonl'), 'utf8').trim().split('\n'), {
      coordinatorPublicKey: rawPublicKey(createPublicKey(home.signingKey())),
      federation: home.config().federationId,
    });
    expect(report.problems).toEqual([]);
    expect(report.entries.at(-1)).toMatchObject({ strategy: 'rollback', site: '', round: 1, updateHash: round1, rollback: { fromModel: f.coord!.store.getRound(2)!.resultModelHash, toModel: round1, failedRound: 3 } });
  }, 90_000);
});

describe('the final check of an aggregate', () => {
  it('a non-finite aggregate fails its round with the cause, is not published, and the federation stays on its model', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-unpublished-'));
    const p = parsePlan(plan.replace('minSites: 3', 'minSites: 1'), 'plan.yaml');
    const store = new CoordinatorStore(join(dir, 'state.db'));
    const events: FederationEvent[] = [];
    const bus = new InProcessBus();
    bus.subscribe((e) => events.push(e));
    // A strategy whose result holds +Inf, as a broken optimiser or an unforeseen overflow would leave it.
    const real = new ComposedStrategy(p.aggregation);
    const broken: AggregationStrategy = {
      name: 'broken',
      begin(current, specs, ctx) {
        const r = real.begin(current, specs, ctx);
        return Object.assign(Object.create(r) as typeof r, {
          finish() {
            const out = r.finish();
            [...out.values()][1].data[2] = Infinity;
            return out;
          },
        });
      },
    };
    const engine = new RoundEngine({ store, models: new ModelFiles(join(dir, 'models')), plan: p, architecture: architectureFor(p.model), strategy: broken, bus, federationId: 'fed-test', signTask: (m) => signedTask(m, () => Buffer.alloc(64)), log: pino({ level: 'silent' }) });
    store.inviteSite('site-a', 'h'.repeat(64), Date.now() + 60_000);
    expect(store.enrolSite('site-a', 'h'.repeat(64), Buffer.alloc(32, 7)).ok).toBe(true);
    await engine.start();
    const tasks: TaskMessage[] = [];
    engine.siteConnected('site-a', { send: (t) => tasks.push(t) });
    await waitFor(() => tasks.length > 0, 5000, 'the task');
    const initial = engine.currentModelHash;
    const base = new ModelFiles(join(dir, 'models')).load(initial);
    const row = { updateId: 'u-00000001', round: 1, site: 'site-a', numSamples: 4, sha256: 'a'.repeat(64), path: join(dir, 'none'), sizeBytes: 1, acceptedAt: Date.now() };
    store.insertUpdate(row);
    expect(engine.fold(row, base)).toBe(true);
    await engine.accepted(row);
    engine.stop();
    const failed = events.find((e) => e.type === 'round.failed');
    expect(failed).toMatchObject({ round: 1, cause: 'aggregate', sites: ['site-a'] });
    expect(String(failed!.reason)).toMatch(/aggregate not published: the aggregate holds \+Inf in tensor ".*" at index 2; the federation stays on model/);
    expect(store.getRound(1)!.state).toBe('failed');
    expect(engine.currentModelHash).toBe(initial);
    expect(store.listModels()).toHaveLength(1);
    store.close();
  });
});
