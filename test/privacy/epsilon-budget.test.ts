/**
 * Issue 17: plan privacy.epsilonBudget. A coordinator whose next round would take the client-level ε past the budget
 * opens no round: it publishes privacy.budget_exhausted, logs why, ends the federation, and `medfl status`, its --json,
 * the dashboard data and /metrics show spent against budget. Real coordinator in this process, sites scripted over
 * real gRPC (test/aggregation/inproc.ts); the budget lets exactly one round through.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { waitFor } from '../../cli/processes.ts';
import { InprocFederation } from '../aggregation/inproc.ts';
import { statusJson } from '../../coordinator/admin-http/status-json.ts';
import { statusReport } from '../../cli/status.ts';
import { RdpAccountant } from '../../shared/privacy/rdp-accountant.ts';
import { parsePlan, PlanError } from '../../shared/plan/load.ts';
import { sampleValue, scrape } from '../helpers/prometheus.ts';

const DP = { clipNorm: 5, noiseMultiplier: 1.1, delta: 0.00001 };
/** ε after n rounds that ask every enrolled site (q = 1), as the coordinator's accountant steps them. */
function epsilonAfter(n: number): number {
  const acc = new RdpAccountant();
  acc.step(1, DP.noiseMultiplier, n);
  return acc.epsilon(DP.delta).epsilon;
}
const BUDGET = Number(((epsilonAfter(1) + epsilonAfter(2)) / 2).toFixed(4));

const plan = (budget: number) =>
  [
    'name: epsilon-budget',
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 4',
    'minSites: 2',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 60',
    'afterLastRound: idle',
    `aggregation: { dp: { clipNorm: ${DP.clipNorm}, noiseMultiplier: ${DP.noiseMultiplier}, delta: ${DP.delta} } }`,
    `privacy: { epsilonBudget: ${budget} }`,
    '',
  ].join('\n');

const TOKEN = 'epsilon-budget-token-0123456789abcdef';

describe('plan privacy.epsilonBudget', () => {
  it('is checked when the plan is loaded', () => {
    expect(parsePlan(plan(3)).privacy.epsilonBudget).toBe(3);
    expect(parsePlan('rounds: 2').privacy.epsilonBudget).toBeUndefined();
    const problems = (text: string) => {
      try {
        parsePlan(text, 'plan.yaml');
      } catch (e) {
        return (e as PlanError).problems.join('\n');
      }
      return '';
    };
    expect(problems('privacy: { epsilonBudget: 3 }')).toMatch(/privacy\.epsilonBudget: privacy\.epsilonBudget needs aggregation\.dp with noiseMultiplier above 0/);
    expect(problems('aggregation: { dp: { clipNorm: 1, noiseMultiplier: 0, delta: 0.00001 } }\nprivacy: { epsilonBudget: 3 }')).toMatch(/needs aggregation\.dp with noiseMultiplier above 0/);
    expect(problems('privacy: { epsilonBudget: -1 }')).toMatch(/privacy\.epsilonBudget/);
    expect(problems('privacy: { epsilonBudgt: 3 }')).toMatch(/Unrecognized key: "epsilonBudgt"/);
  });
});

describe('a coordinator at its privacy budget', () => {
  let f: InprocFederation;
  let base: string;

  beforeAll(async () => {
    expect(epsilonAfter(1)).toBeLessThan(BUDGET);
    expect(epsilonAfter(2)).toBeGreaterThan(BUDGET);
    f = await InprocFederation.create(plan(BUDGET), ['site-a', 'site-b'], { admin: { port: 0, token: TOKEN } });
    base = f.coord!.admin!.url;
    const [a, b] = f.connect(['site-a', 'site-b']);
    for (const s of [a!, b!]) {
      const t = await f.task(s, 1);
      const model = f.model(t.modelHash);
      const ack = await f.upload(s, t, encodeSafetensors(makeBundle([...model.values()].map((x) => ({ ...x, data: x.data.map((v) => v + 0.01) })))));
      expect(ack.accepted, ack.reason).toBe(true);
    }
    await f.closedRounds(1);
    await waitFor(() => f.coord!.engine.isFinished, 10_000, 'the federation to end at its budget');
  });

  afterAll(async () => {
    await f?.close();
  });

  it('opens no further round, publishes privacy.budget_exhausted and finishes, saying why', async () => {
    // Give a wrongly opened round time to show up.
    await new Promise((r) => setTimeout(r, 500));
    const store = f.coord!.store;
    expect(store.listRounds().map((r) => [r.round, r.state])).toEqual([[1, 'closed']]);
    const exhausted = f.events.filter((e) => e.type === 'privacy.budget_exhausted');
    expect(exhausted).toHaveLength(1);
    expect(exhausted[0]).toMatchObject({ budget: BUDGET, delta: DP.delta, rounds: 1, samplingRate: 1 });
    expect(exhausted[0]!.spent).toBeCloseTo(epsilonAfter(1), 9);
    expect(exhausted[0]!.projected).toBeCloseTo(epsilonAfter(2), 9);
    const finished = f.events.filter((e) => e.type === 'federation.finished');
    expect(finished).toHaveLength(1);
    expect(finished[0]).toMatchObject({ rounds: 1, why: 'privacy budget exhausted' });
    // Both are in the store's event history, so they survive a restart and reach NATS.
    expect(store.listOutbox('event').some((r) => JSON.parse(r.body).type === 'privacy.budget_exhausted')).toBe(true);
  });

  it('medfl status and --json show spent against budget and the exhaustion', () => {
    const store = f.coord!.store;
    const j = statusJson(store, f.coord!.federationId) as Record<string, any>;
    expect(j.privacyBudget).toMatchObject({ budget: BUDGET, delta: DP.delta, exhausted: true });
    expect(j.privacyBudget.spent).toBeCloseTo(epsilonAfter(1), 9);
    expect(j.privacyBudget.remaining).toBeCloseTo(BUDGET - epsilonAfter(1), 9);
    expect(j.privacyBudget.refusedAt).toBeCloseTo(epsilonAfter(2), 9);
    const text = statusReport(store, f.coord!.federationId);
    expect(text).toMatch(new RegExp(`ε = ${epsilonAfter(1).toFixed(2)} of budget ${BUDGET} at δ`));
    expect(text).toMatch(/privacy budget exhausted: the next round would bring ε to \d+\.\d{3} .*above the plan's budget/);
  });

  it('the dashboard data and /metrics show the same', async () => {
    const s = (await (await fetch(`${base}/api/status`, { headers: { authorization: `Bearer ${TOKEN}` } })).json()) as Record<string, any>;
    expect(s.privacyBudget.exhausted).toBe(true);
    expect(s.live.privacyPlan).toMatchObject({ epsilonBudget: BUDGET, roundsReleased: 1, plannedRounds: 4, roundsWithinBudget: 0 });
    expect(s.live.phase).toBe('finished');
    const metrics = await scrape(base, TOKEN);
    expect(sampleValue(metrics, 'medfl_privacy_epsilon_budget')).toBe(BUDGET);
    expect(sampleValue(metrics, 'medfl_privacy_epsilon_spent')).toBeCloseTo(epsilonAfter(1), 9);
    expect(sampleValue(metrics, 'medfl_privacy_budget_exhausted')).toBe(1);
  });

  it('refuses again after a restart with the same plan, without opening a round', async () => {
    await f.stop();
    f.events.length = 0;
    await f.start();
    f.connect(['site-a', 'site-b']);
    await waitFor(() => f.coord!.engine.isFinished, 10_000, 'the restarted coordinator to see the budget spent');
    expect(f.coord!.store.listRounds()).toHaveLength(1);
    // The same fact: the same stable event id, one row in the history.
    const rows = f.coord!.store.listOutbox('event').filter((r) => JSON.parse(r.body).type === 'privacy.budget_exhausted');
    expect(rows).toHaveLength(1);
  });
});
