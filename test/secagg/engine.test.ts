/**
 * The round engine with secure aggregation, in process (real gRPC, TLS, tokens, the site's real SecAgg code
 * with hand-made updates): a round closes on base + Σ wᵢΔᵢ / Σ wᵢ; plain uploads are refused in such a round;
 * a round where fewer than t sites take part fails with its reason at the deadline and a new round starts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { InprocFederation } from '../aggregation/inproc.ts';
import { runSecAggRound } from '../../site-agent/secagg/round.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { waitFor } from '../../cli/processes.ts';

const plan = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 2, seed: 5 }',
  'rounds: 3',
  'minSites: 2',
  'roundDeadlineSeconds: 6',
  'gatherSeconds: 1',
  'share: { parts: [encoder] }',
  'aggregation: { secureAggregation: { enabled: true, threshold: 2, clip: 0.5, phaseSeconds: 1 } }',
  '',
].join('\n');
const sites = ['site-a', 'site-b', 'site-c'];
const log = pino({ level: 'silent' });

describe('round engine with secure aggregation (in process)', () => {
  let f: InprocFederation;
  beforeAll(async () => {
    f = await InprocFederation.create(plan, sites);
    f.connect(sites);
  }, 60_000);
  afterAll(async () => f?.close());

  it('round 1: plain uploads are refused; the masked round closes on the weighted FedAvg of the deltas', async () => {
    const tasks = await Promise.all(f.sites.map((s) => f.task(s, 1)));
    const settings = TaskSettingsSchema.parse(JSON.parse(tasks[0]!.settingsJson));
    expect(settings.secureAggregation).toMatchObject({ id: 1, threshold: 2, clip: 0.5, sites: 3 });
    const baseBytes = readFileSync(join(f.coordDir, 'models', `${tasks[0]!.modelHash}.safetensors`));
    const base = f.model(tasks[0]!.modelHash);
    const refused = await f.upload(f.sites[0]!, tasks[0]!, encodeSafetensors(base));
    expect(refused.accepted).toBe(false);
    expect(refused.reason).toMatch(/uses secure aggregation: send the masked input through SecureAggregation/);

    const steps = [0.01, -0.02, 0.03];
    const samples = [2, 3, 5];
    await Promise.all(
      f.sites.map((s, i) => {
        const t = tasks[i]!;
        const upd = makeBundle([...base.values()].map((x) => ({ name: x.name, dtype: 'F32' as const, shape: [...x.shape], data: x.data.map((v) => v + steps[i]!) })));
        return runSecAggRound({
          home: new SiteHome(join(f.work, s.name)), connection: s.client.connection, log, round: 1, taskId: t.taskId, deadlineUnixMs: t.deadlineUnixMs,
          settings: TaskSettingsSchema.parse(JSON.parse(t.settingsJson)), update: encodeSafetensors(upd), base: baseBytes, numSamples: samples[i]!,
        });
      }),
    );
    await f.closedRounds(1);
    const row = f.coord!.store.listRounds()[0]!;
    const next = f.model(row.resultModelHash!);
    const mean = (0.01 * 2 - 0.02 * 3 + 0.03 * 5) / 10;
    for (const [name, t] of base) {
      const y = next.get(name)!.data;
      for (let i = 0; i < t.data.length; i += 7) expect(Math.abs(y[i]! - (t.data[i]! + mean))).toBeLessThan(1e-5);
    }
    const closed = f.events.find((e) => e.type === 'round.closed' && e.round === 1)!;
    expect(closed.why).toMatch(/secure aggregation unmasked the sum of 3 of 3 sites/);
    // The session's phases, as the round.closed event records them.
    expect((closed.secureAggregation as { timeline: { phase: string; sites: number }[] }).timeline.map((p) => [p.phase, p.sites])).toEqual([
      ['share', 3],
      ['mask', 3],
      ['unmask', 3],
      ['done', 3],
    ]);
  }, 60_000);

  it('round 2 with one site taking part: fails at the deadline with the reason, and round 3 starts from the same model', async () => {
    const t = await f.task(f.sites[0]!, 2);
    const base = readFileSync(join(f.coordDir, 'models', `${t.modelHash}.safetensors`));
    const lone = runSecAggRound({
      home: new SiteHome(join(f.work, 'site-a')), connection: f.sites[0]!.client.connection, log, round: 2, taskId: t.taskId, deadlineUnixMs: t.deadlineUnixMs,
      settings: TaskSettingsSchema.parse(JSON.parse(t.settingsJson)), update: base, base, numSamples: 1,
    }).catch((e: Error) => e.message);
    await waitFor(() => f.events.some((e) => e.type === 'round.failed' && e.round === 2), 20_000, 'round 2 to fail');
    const failed = f.events.find((e) => e.type === 'round.failed' && e.round === 2)!;
    expect(failed.reason).toMatch(/secure aggregation failed: round deadline reached in phase 'advertise'/);
    expect(await lone).toMatch(/secure aggregation Advertise: round 2's secure aggregation failed/);
    const t3 = await f.task(f.sites[1]!, 3);
    expect(t3.modelHash).toBe(t.modelHash);
    expect(f.coord!.store.listRounds().map((r) => [r.round, r.state])).toEqual([
      [1, 'closed'],
      [2, 'failed'],
      [3, 'open'],
    ]);
  }, 60_000);
});
