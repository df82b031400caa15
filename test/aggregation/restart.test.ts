/**
 * Server-optimiser state and the DP accountant are stored with each round's model, so a coordinator that
 * is stopped between rounds continues them: round 2 after a restart equals round 2 without one.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { ComposedStrategy } from '../../coordinator/aggregation/composed.ts';
import { PRIVACY_KEY, type PrivacySpent } from '../../coordinator/rounds/round-engine.ts';
import { statusReport } from '../../cli/status.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { RdpAccountant } from '../../shared/privacy/rdp-accountant.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { InprocFederation } from './inproc.ts';

const planText = (aggregation: string, extra = '', minSites = 2) =>
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 2',
    `minSites: ${minSites}`,
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 60',
    `aggregation: ${aggregation}`,
    extra,
    '',
  ].join('\n');

/** A site's hand-made update: base + a smooth per-site, per-round step. */
function step(base: TensorBundle, site: number, round: number): TensorBundle {
  return makeBundle([...base.values()].map((t) => ({ ...t, data: t.data.map((v, i) => v + 0.02 * Math.sin(i * (site + 1) + round) + 0.01 * site) })));
}

const feds: InprocFederation[] = [];
afterAll(async () => {
  for (const f of feds) await f.close();
});

async function runRound(f: InprocFederation, round: number): Promise<void> {
  for (const [i, s] of f.sites.entries()) {
    const t = await f.task(s, round);
    // One at a time, so the coordinator folds them in a known order (float sums depend on it).
    const ack = await f.upload(s, t, encodeSafetensors(step(f.model(t.modelHash), i, round)), 3 + i);
    expect(ack.accepted, ack.reason).toBe(true);
  }
  await f.closedRounds(round);
}

describe('a coordinator restart between rounds', () => {
  it('continues FedYogi from its stored moments: round 2 equals an uninterrupted run', async () => {
    const text = planText('{ strategy: trimmed-mean, trimFraction: 0.25, serverOptimizer: { type: fedyogi, lr: 0.05 } }', '', 4);
    const f = await InprocFederation.create(text, ['site-a', 'site-b', 'site-c', 'site-d']);
    feds.push(f);
    f.connect(['site-a', 'site-b', 'site-c', 'site-d']);
    await runRound(f, 1);
    await f.stop();
    await f.start();
    f.connect(['site-a', 'site-b', 'site-c', 'site-d']);
    await runRound(f, 2);
    const rounds = f.coord!.store.listRounds();
    expect(rounds.map((r) => r.state)).toEqual(['closed', 'closed']);
    // Three model versions and only the latest optimiser state (the round-1 state was superseded and deleted).
    const files = readdirSync(join(f.coordDir, 'models')).filter((n) => n.endsWith('.safetensors'));
    expect(files).toHaveLength(4);

    // The same two rounds through one strategy object that never restarted.
    const plan = parsePlan(text);
    const ref = new ComposedStrategy(plan.aggregation);
    const x0 = f.model(rounds[0].baseModelHash);
    const specs = [...x0.values()].map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
    const roundOf = (s: ComposedStrategy, base: TensorBundle, r: number) => {
      const agg = s.begin(base, specs);
      for (let i = 0; i < 4; i++) agg.add(step(base, i, r), { site: `s${i}`, numSamples: 3 + i });
      return makeBundle([...agg.finish().values()].map((t) => ({ ...t, data: t.data.slice() })));
    };
    const x1 = roundOf(ref, x0, 1);
    const got1 = f.model(rounds[0].resultModelHash!);
    for (const t of x1.values()) expect(Array.from(got1.get(t.name)!.data)).toEqual(Array.from(t.data));
    const x2 = roundOf(ref, got1, 2);
    const got2 = f.model(rounds[1].resultModelHash!);
    for (const t of x2.values()) expect(Array.from(got2.get(t.name)!.data)).toEqual(Array.from(t.data));
    // Without the stored moments round 2 would differ: the test can tell.
    const fresh = roundOf(new ComposedStrategy(plan.aggregation), got1, 2);
    const diff = Math.max(...[...fresh.values()].flatMap((t) => Array.from(t.data, (v, i) => Math.abs(v - got2.get(t.name)!.data[i]))));
    expect(diff).toBeGreaterThan(1e-4);
  }, 60_000);

  it('continues the DP accountant: ε after round 2 is two compositions, published and shown in status', async () => {
    const text = planText('{ dp: { clipNorm: 0.5, noiseMultiplier: 1.1, delta: 1.0e-5 } }', 'sitesPerRound: 2');
    const f = await InprocFederation.create(text, ['site-a', 'site-b', 'site-c']);
    feds.push(f);
    const connectAll = () => f.connect(['site-a', 'site-b', 'site-c']);
    // Only the two selected sites get a task; each uploads for the rounds it is asked.
    const runDpRound = async (round: number) => {
      await new Promise((r) => setTimeout(r, 300));
      const asked = f.sites.filter((s) => f.coord!.store.getRound(round)?.selected.includes(s.name));
      expect(asked).toHaveLength(2);
      for (const [i, s] of asked.entries()) {
        const t = await f.task(s, round);
        expect(JSON.parse(t.settingsJson).dp).toEqual({ clipNorm: 0.5, noiseMultiplier: 1.1, delta: 1e-5 });
        const ack = await f.upload(s, t, encodeSafetensors(step(f.model(t.modelHash), i, round)));
        expect(ack.accepted, ack.reason).toBe(true);
      }
      await f.closedRounds(round);
    };
    connectAll();
    await new Promise((r) => setTimeout(r, 300));
    await runDpRound(1);
    const after1 = JSON.parse(f.coord!.store.getMeta(PRIVACY_KEY)!) as PrivacySpent;
    await f.stop();
    await f.start();
    connectAll();
    await runDpRound(2);
    const after2 = JSON.parse(f.coord!.store.getMeta(PRIVACY_KEY)!) as PrivacySpent;
    const acc = new RdpAccountant();
    acc.step(2 / 3, 1.1);
    expect(after1.epsilon).toBeCloseTo(acc.epsilon(1e-5).epsilon, 10);
    acc.step(2 / 3, 1.1);
    expect(after2.epsilon).toBeCloseTo(acc.epsilon(1e-5).epsilon, 10);
    expect(after2.rounds).toBe(2);
    expect(after2.epsilon!).toBeGreaterThan(after1.epsilon!);
    const closed = f.events.filter((e) => e.type === 'round.closed');
    expect(closed.at(-1)!.dp).toEqual({ epsilon: after2.epsilon, delta: 1e-5 });
    expect(statusReport(f.coord!.store, f.coord!.federationId)).toContain(`ε = ${after2.epsilon!.toFixed(2)}`);
  }, 60_000);
});
