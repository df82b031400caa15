/**
 * Secure aggregation as a round feature (coordinator/rounds/features/secure-aggregation.ts) in the round engine,
 * without gRPC: the open round has a session the SecureAggregation service can find, tasks carry each site's id,
 * uploads and re-offers are refused, and a round open when the coordinator stopped fails at the next start (its
 * session lived in memory only) while a new round opens with a new session.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { waitFor } from '../../cli/processes.ts';
import { SecureAggregation } from '../../coordinator/rounds/features/secure-aggregation.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { bareEngine } from '../helpers/bare-engine.ts';

const plan = parsePlan(
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 2, seed: 5 }',
    'rounds: 3',
    'minSites: 2',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 60',
    'share: { parts: [encoder] }',
    'aggregation: { secureAggregation: { enabled: true, threshold: 2, clip: 0.5, phaseSeconds: 30 } }',
    '',
  ].join('\n'),
  'plan.yaml',
);
const SITES = ['site-a', 'site-b'];

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('secure aggregation as a round feature', () => {
  it('runs the open round as a session, and a round open at a restart fails and is replaced', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-secagg-feature-'));
    dirs.push(dir);
    const first = bareEngine(dir, plan, { reofferMs: 0 });
    first.enrol(SITES);
    await first.engine.start();
    first.connect(SITES);
    await waitFor(() => first.tasks.length === 2, 5000, "round 1's tasks");

    const feature = first.engine.feature(SecureAggregation)!;
    const session = feature.sessionFor(1)!;
    expect(session.phase).toBe('advertise');
    expect(feature.sessionFor(2)).toBeUndefined();
    const settings = first.tasks.map((t) => TaskSettingsSchema.parse(JSON.parse(t.settingsJson)).secureAggregation);
    expect(settings).toEqual(SITES.map((_, i) => ({ id: i + 1, threshold: 2, clip: 0.5, maxWeight: plan.aggregation.secureAggregation.maxWeight, sites: 2, vectorLength: feature.vectorLength })));
    expect(first.engine.admissionProblem('site-a', 1, first.engine.currentModelHash)).toBe('round 1 uses secure aggregation: send the masked input through SecureAggregation, not an update upload');
    first.engine.siteIdle('site-b');
    expect(first.tasks).toHaveLength(2);
    first.close();
    // Stopping ends the session (its waiting calls are refused); the round itself is the next start's to fail.
    expect(session.phase).toBe('failed');

    const second = bareEngine(dir, plan);
    await second.engine.start();
    second.connect(SITES);
    await waitFor(() => second.tasks.some((t) => t.round === 2), 5000, "round 2's tasks");
    expect(second.store.listRounds().map((r) => [r.round, r.state])).toEqual([
      [1, 'failed'],
      [2, 'open'],
    ]);
    expect(second.events.find((e) => e.type === 'round.failed')).toMatchObject({
      round: 1,
      reason: 'the coordinator restarted during a secure-aggregation round; its session is not kept across restarts, so the round failed and a new one starts',
    });
    const again = second.engine.feature(SecureAggregation)!;
    expect(again.sessionFor(1)).toBeUndefined();
    expect(again.sessionFor(2)?.phase).toBe('advertise');
    second.close();
  });
});
