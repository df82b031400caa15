/**
 * A round feature that collects a round's input itself instead of taking uploads (round-feature.ts collectInput,
 * resumeRefusal), plugged into the engine through its `features` option with no edit of the engine: uploads are
 * refused with the feature's reason, each task carries what the feature adds for its site, idle sites are not sent
 * the task again, the sum the feature folds closes the round, the deadline is the feature's to handle, and a round
 * open at a restart fails with the feature's reason.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { waitFor } from '../../cli/processes.ts';
import type { RoundFeature, RoundInput, RoundInputControl, RoundView } from '../../coordinator/rounds/round-feature.ts';
import type { RoundRow } from '../../coordinator/store/store.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { bareEngine } from '../helpers/bare-engine.ts';

const plan = parsePlan(
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 3',
    'minSites: 2',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 1.5',
    // A sum is folded in delta form, against the base model the strategy keeps for a norm check.
    'aggregation: { validation: { maxNorm: 1000 } }',
    '',
  ].join('\n'),
  'plan.yaml',
);
const SITES = ['site-a', 'site-b'];

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A test-only feature: every round's input arrives as one sum handed in by the test, never as uploads. */
class HandedInSum implements RoundFeature {
  readonly name = 'handed-in-sum';
  readonly controls = new Map<number, RoundInputControl>();
  readonly deadlines: number[] = [];
  readonly failedViews: Array<{ round: number; by: string | undefined; reason: string }> = [];

  constructor(private readonly refuseResume = false) {}

  collectInput(round: RoundView, control: RoundInputControl): RoundInput {
    const n = round.row.round;
    this.controls.set(n, control);
    return {
      uploadRefusal: (site) => `round ${n} takes its input from the test, not from ${site}`,
      // Any per-site field the test can spot in the task.
      siteSettings: (site) => ({ roundOffset: SITES.indexOf(site) + 10 }),
      deadlineReached: () => {
        this.deadlines.push(n);
        control.fail(`the test handed in nothing for round ${n}`);
      },
      abort: () => undefined,
      lostResultNote: (error) => `lost: ${error}`,
    };
  }

  resumeRefusal(row: RoundRow): string | undefined {
    return this.refuseResume ? `round ${row.round}'s input was in the test's memory` : undefined;
  }

  onRoundFailed(round: RoundView, reason: string): void {
    this.failedViews.push({ round: round.row.round, by: round.inputCollectedBy, reason });
  }
}

describe('a round feature that collects the round input', () => {
  it('refuses uploads, adds its per-site settings, folds its sum to close the round, and owns the deadline', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-round-input-'));
    dirs.push(dir);
    const feature = new HandedInSum();
    const f = bareEngine(dir, plan, { reofferMs: 0, features: [feature] });
    const { store, models, events, engine, tasks } = f;
    f.enrol(SITES);
    await engine.start();
    f.connect(SITES);
    await waitFor(() => tasks.length === 2, 5000, "round 1's tasks");

    const base = engine.currentModelHash;
    expect(tasks.map((t) => [t.round, (JSON.parse(t.settingsJson) as { roundOffset?: number }).roundOffset])).toEqual([
      [1, 10],
      [1, 11],
    ]);
    expect(engine.admissionProblem('site-a', 1, base)).toBe('round 1 takes its input from the test, not from site-a');
    // An idle site is not sent the task again: the feature decides who takes part.
    engine.siteIdle('site-b');
    expect(tasks).toHaveLength(2);

    // Σ wᵢΔᵢ with Σ wᵢ = 4: the new model is base + 0.25 everywhere.
    const control = feature.controls.get(1)!;
    expect(control.isAccepting()).toBe(true);
    const current = models.load(base);
    const sum = makeBundle([...current.values()].map((t) => ({ name: t.name, dtype: 'F32' as const, shape: [...t.shape], data: new Float32Array(t.data.length).fill(1) })));
    expect(await control.foldSum(() => ({ sum, weight: 4, sites: SITES }))).toBe(true);
    await control.close('the test handed in the sum of both sites');
    expect(control.isAccepting()).toBe(false);
    expect(await control.foldSum(() => ({ sum, weight: 4, sites: SITES }))).toBe(false);
    const closed = events.find((e) => e.type === 'round.closed')!;
    expect(closed).toMatchObject({ round: 1, why: 'the test handed in the sum of both sites', sites: SITES });
    const next = models.load(store.getRound(1)!.resultModelHash!);
    for (const [name, t] of current) expect(Math.abs(next.get(name)!.data[0]! - (t.data[0]! + 0.25))).toBeLessThan(1e-6);

    // Round 2: nothing is handed in; the deadline goes to the feature, which fails the round through its control.
    await waitFor(() => events.some((e) => e.type === 'round.failed'), 10_000, 'round 2 to fail');
    f.close();
    expect(feature.deadlines).toEqual([2]);
    expect(events.find((e) => e.type === 'round.failed')).toMatchObject({ round: 2, reason: 'the test handed in nothing for round 2' });
    expect(feature.failedViews[0]).toEqual({ round: 2, by: 'handed-in-sum', reason: 'the test handed in nothing for round 2' });
  });

  it('a round open at a restart fails with the reason the feature gives, and the next round opens', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-round-input-'));
    dirs.push(dir);
    const first = bareEngine(dir, plan, { features: [new HandedInSum()] });
    first.enrol(SITES);
    await first.engine.start();
    first.connect(SITES);
    await waitFor(() => first.tasks.length === 2, 5000, "round 1's tasks");
    first.close();

    const feature = new HandedInSum(true);
    const second = bareEngine(dir, plan, { resumeGraceMs: 60_000, features: [feature] });
    await second.engine.start();
    second.connect(SITES);
    await waitFor(() => second.tasks.some((t) => t.round === 2), 5000, "round 2's tasks");
    expect(second.store.getRound(1)).toMatchObject({ state: 'failed', note: "round 1's input was in the test's memory" });
    second.close();
    expect(second.events.find((e) => e.type === 'round.failed')).toMatchObject({ round: 1, reason: "round 1's input was in the test's memory" });
    expect(feature.failedViews).toEqual([{ round: 1, by: 'handed-in-sum', reason: "round 1's input was in the test's memory" }]);
  });
});
