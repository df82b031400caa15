/**
 * Which connected sites a round opens with: only those enrolled now — not a revoked site whose stream is still open,
 * not an invited one — and the round opens the moment enough enrolled sites are connected. The engine reads the
 * enrolled names in one query per connect (it used to look each connected site up, N² lookups for N connects), and
 * not at all while fewer than minSites are connected (a connection storm's N connects read N² rows).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { parsePlan } from '../../../shared/plan/load.ts';
import { bareEngine, type BareEngine } from '../../helpers/bare-engine.ts';

const plan = parsePlan(
  ['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 1', 'minSites: 2', 'gatherSeconds: 0', 'roundDeadlineSeconds: 60', ''].join('\n'),
  'plan.yaml',
);

let bare: BareEngine | undefined;
let dir = '';
afterEach(() => {
  bare?.close();
  bare = undefined;
  rmSync(dir, { recursive: true, force: true });
});

describe('round eligibility', () => {
  it('opens with the connected enrolled sites only, once enough of them are connected', async () => {
    dir = mkdtempSync(join(tmpdir(), 'medfl-eligibility-'));
    bare = bareEngine(dir, plan);
    const { store, engine, enrol, connect } = bare;
    enrol(['site-a', 'site-b', 'site-c']);
    store.revokeSite('site-b');
    store.inviteSite('site-d', 'd'.repeat(64), Date.now() + 60_000);
    await engine.start();
    connect(['site-a', 'site-b', 'site-d']);
    expect(engine.openRoundNumber).toBeUndefined(); // one enrolled site of three connected: no quorum
    connect(['site-c']);
    expect(engine.openRoundNumber).toBe(1);
    expect([...store.getRound(1)!.selected].sort()).toEqual(['site-a', 'site-c']);
  });

  it('reads the enrolled sites only once minSites are connected, then once per connect, never per connected site', async () => {
    dir = mkdtempSync(join(tmpdir(), 'medfl-eligibility-'));
    bare = bareEngine(dir, parsePlan(['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 1', 'minSites: 20', 'gatherSeconds: 60', ''].join('\n'), 'plan.yaml'));
    const { store, engine, enrol, connect } = bare;
    const sites = Array.from({ length: 30 }, (_, i) => `site-${String(i).padStart(2, '0')}`);
    enrol(sites);
    await engine.start();
    const lookups = vi.spyOn(store, 'getSite');
    const listings = vi.spyOn(store, 'enrolledSiteNames');
    connect(sites.slice(0, 19));
    expect(listings).not.toHaveBeenCalled(); // 19 connected, 20 needed: no round whoever they are
    connect(sites.slice(19, 25));
    expect(listings).toHaveBeenCalledTimes(6);
    expect(engine.openRoundNumber).toBeUndefined(); // a quorum, gathering the other five for 60 s
    expect(lookups).not.toHaveBeenCalled();
  });
});
