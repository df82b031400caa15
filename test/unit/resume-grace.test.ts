/**
 * Issue 15: a round resumed after a coordinator restart must wait long enough for sites to come back. A site waits
 * up to SITE_MAX_RECONNECT_BACKOFF_MS between reconnects; a grace of min(60 s, deadline / 2) could end such a
 * round before a site that had already trained even reconnected.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { RESUME_GRACE_MARGIN_MS, RoundEngine, resumeGraceMs } from '../../coordinator/rounds/round-engine.ts';
import { signedTask } from '../../coordinator/rounds/task-signer.ts';
import { strategyFromPlan } from '../../coordinator/aggregation/index.ts';
import { InProcessBus } from '../../shared/events/bus.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../../shared/protocol/reconnect.ts';

const plan = parsePlan(
  ['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 2', 'minSites: 1', 'gatherSeconds: 0', 'roundDeadlineSeconds: 10', ''].join('\n'),
  'plan.yaml',
);

describe('the grace of a round resumed after a restart', () => {
  it("outlasts the sites' longest reconnect backoff, with a margin, even for a short round deadline", async () => {
    expect(RESUME_GRACE_MARGIN_MS).toBeGreaterThan(0);
    for (const seconds of [1, 10, 60, 120, 3600]) expect(resumeGraceMs(seconds)).toBeGreaterThanOrEqual(SITE_MAX_RECONNECT_BACKOFF_MS + RESUME_GRACE_MARGIN_MS);
    expect(resumeGraceMs(3600)).toBe(Math.max(60_000, SITE_MAX_RECONNECT_BACKOFF_MS + RESUME_GRACE_MARGIN_MS));

    // A real engine finds an open round whose deadline passed while the coordinator was down.
    const dir = mkdtempSync(join(tmpdir(), 'medfl-grace-'));
    const store = new CoordinatorStore(join(dir, 'state.db'));
    const make = () =>
      new RoundEngine({ store, models: new ModelFiles(join(dir, 'models')), plan, architecture: architectureFor(plan.model), strategy: strategyFromPlan(plan), bus: new InProcessBus(), federationId: 'fed-grace', signTask: (m) => signedTask(m, () => Buffer.alloc(64)), log: pino({ level: 'silent' }) });
    const first = make();
    await first.start(); // writes the initial model; no site, so no round
    first.stop();
    const now = Date.now();
    store.openRound({ round: 1, baseModelHash: store.getMeta('current_model')!, selected: ['site-a'], openedAt: now - 20_000, deadlineAt: now - 10_000 });
    const engine = make();
    await engine.start();
    engine.stop();
    expect(engine.openRoundNumber).toBe(1);
    expect(store.getRound(1)!.deadlineAt - now).toBeGreaterThanOrEqual(SITE_MAX_RECONNECT_BACKOFF_MS + RESUME_GRACE_MARGIN_MS);
    store.close();
  });
});
