/**
 * plan.retention.updateRounds: after a round closes, the update files of older closed rounds are deleted and the
 * most recent N kept; the open round's files are never touched, so a restart still re-folds them. The default
 * keeps everything.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { InprocFederation } from './inproc.ts';

const plan = (retention: string) =>
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 4',
    'minSites: 2',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 60',
    retention,
    '',
  ].join('\n');

const feds: InprocFederation[] = [];
afterAll(async () => {
  for (const f of feds) await f.close();
});

/** The round-N directories holding update files, as round numbers. */
function roundsOnDisk(f: InprocFederation): number[] {
  const dir = join(f.coordDir, 'updates');
  return readdirSync(dir)
    .map((n) => /^round-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/** Each site moves every weight by its own step: 0.01 × (its index + round). */
async function uploadAll(f: InprocFederation, round: number, sites = f.sites): Promise<void> {
  for (const s of sites) {
    const t = await f.task(s, round);
    const base = f.model(t.modelHash);
    const step = 0.01 * (f.sites.indexOf(s) + round);
    const next = makeBundle([...base.values()].map((x) => ({ ...x, data: x.data.map((v) => v + step) })));
    const ack = await f.upload(s, t, encodeSafetensors(next));
    expect(ack.accepted, ack.reason).toBe(true);
  }
}

describe('plan.retention', () => {
  it('is "all" by default and refuses what it cannot mean', () => {
    expect(parsePlan('rounds: 1\n').retention).toEqual({ updateRounds: 'all' });
    expect(parsePlan('retention: { updateRounds: 0 }\n').retention.updateRounds).toBe(0);
    expect(() => parsePlan('retention: { updateRounds: -1 }\n')).toThrow(/updateRounds/);
    expect(() => parsePlan('retention: { models: 2 }\n')).toThrow(/models/);
  });

  it('keeps the update files of the last N closed rounds, never the open round\'s, and a restart still re-folds those', async () => {
    const f = await InprocFederation.create(plan('retention: { updateRounds: 1 }'), ['site-a', 'site-b']);
    feds.push(f);
    f.connect(['site-a', 'site-b']);
    await uploadAll(f, 1);
    await f.closedRounds(1);
    expect(roundsOnDisk(f)).toEqual([1]);
    await uploadAll(f, 2);
    await f.closedRounds(2);
    expect(roundsOnDisk(f)).toEqual([2]); // round 1 pruned, the last closed round kept
    // Round 3 open with one accepted update: its file stays, and survives a restart that re-folds it.
    await uploadAll(f, 3, f.sites.slice(0, 1));
    expect(roundsOnDisk(f)).toEqual([2, 3]);
    const accepted = f.coord!.store.updatesForRound(3);
    expect(accepted).toHaveLength(1);
    expect(existsSync(accepted[0]!.path)).toBe(true);
    await f.stop();
    await f.start();
    f.connect(['site-a', 'site-b']);
    await uploadAll(f, 3, f.sites.slice(1));
    await f.closedRounds(3);
    // FedAvg of site-a's step (0.03, accepted before the restart, re-folded from its file) and site-b's (0.04).
    const base3 = f.model((await f.task(f.sites[1]!, 3)).modelHash);
    const result3 = f.model(f.coord!.store.getRound(3)!.resultModelHash!);
    const [name, before] = [...base3.entries()][0]!;
    expect(result3.get(name)!.data[0]).toBeCloseTo(before.data[0]! + 0.035, 5);
    expect(roundsOnDisk(f)).toEqual([3]);
    // The store still names every accepted update of the pruned rounds (id, site, SHA-256).
    expect(f.coord!.store.updatesForRound(1)).toHaveLength(2);
  });

  it('keeps every round by default', async () => {
    const f = await InprocFederation.create(plan(''), ['site-a', 'site-b']);
    feds.push(f);
    f.connect(['site-a', 'site-b']);
    for (const r of [1, 2]) {
      await uploadAll(f, r);
      await f.closedRounds(r);
    }
    expect(roundsOnDisk(f)).toEqual([1, 2]);
  });
});
