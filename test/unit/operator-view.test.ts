/**
 * The operator's rough edges, each on the real code: a site that ended with the federation shown as finished (not
 * "offline (was training)"), a site without validation cases found at start and shown as such, and no false "engine
 * was requested" in a site's engine line.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { outboxRows } from '../../coordinator/events/outbox.ts';
import { eventFacts, siteStatus, statusJson, OFFLINE_AFTER_MS } from '../../coordinator/admin-http/status-json.ts';
import { metricsTable, sitesTable, statusReport } from '../../cli/status.ts';
import { validationNotice } from '../../site-agent/validation-notice.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';

const work = mkdtempSync(join(tmpdir(), 'medfl-operator-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const FED = 'fed-operator';
const T0 = Date.parse('2025-01-01T10:00:00Z');

/** A store after a one-round federation: site-a and site-b exited with it, site-c dropped out mid-round earlier. */
function finishedFederation(dir: string): CoordinatorStore {
  const store = new CoordinatorStore(join(dir, 'state.db'));
  for (const name of ['site-a', 'site-b', 'site-c']) {
    store.inviteSite(name, `hash-${name}`, T0 + 3_600_000, T0);
    expect(store.enrolSite(name, `hash-${name}`, Buffer.alloc(32, 1), T0).ok).toBe(true);
  }
  store.openRound({ round: 1, baseModelHash: 'a'.repeat(64), selected: ['site-a', 'site-b', 'site-c'], openedAt: T0, deadlineAt: T0 + 300_000 });
  store.addModel({ hash: 'b'.repeat(64), path: 'm', round: 1, sizeBytes: 10, createdAt: T0 + 60_000 });
  store.closeRound(1, { hash: 'b'.repeat(64), path: 'm', round: 1, sizeBytes: 10, createdAt: T0 + 60_000 }, T0 + 60_000);
  const finishAt = T0 + 61_000;
  store.addOutbox(outboxRows({ type: 'federation.finished', federation: FED, at: new Date(finishAt).toISOString(), model: 'b'.repeat(64), rounds: 1 }));
  // Their last heartbeats: just before the finish (a, still training when the aggregate was written), at it (b), long before (c).
  store.touchSite('site-a', 'training', 'cpu', finishAt - 4_000);
  store.touchSite('site-b', 'idle', 'cpu', finishAt);
  store.touchSite('site-c', 'training', 'cpu', T0 + 5_000);
  store.recordMetrics(1, 'site-a', { num_train: 4, num_val: 2, train_loss: 0.5, val_dice_mean: 0.4 });
  store.recordMetrics(1, 'site-b', { num_train: 4, num_val: 0, train_loss: 0.6 });
  return store;
}

describe('finished sites', () => {
  it('a site that went quiet with the federation\'s end is finished; one that dropped out earlier is offline', () => {
    const store = finishedFederation(mkdtempSync(join(work, 'fin-')));
    try {
      const now = T0 + 10 * 60_000;
      const facts = eventFacts(store);
      expect(facts.finish).toEqual({ at: T0 + 61_000, rounds: 1 });
      const sites = store.listSites();
      expect(sites.map((s) => siteStatus(s, now, facts.finish))).toEqual(['finished', 'finished', 'offline']);
      // Within the heartbeat window a site is online, finished or not.
      expect(siteStatus(sites[1]!, T0 + 61_000 + OFFLINE_AFTER_MS - 1, facts.finish)).toBe('online');

      const table = sitesTable(sites, now, { finish: facts.finish });
      const row = (name: string) => table.split('\n').find((l) => l.includes(name))!;
      expect(row('site-a')).toMatch(/│ finished │/);
      expect(row('site-a')).not.toContain('was training');
      expect(row('site-c')).toMatch(/│ offline\s+│.*\(was training\)/);

      const json = statusJson(store, FED, now) as { finished: unknown; sites: { name: string; status: string }[] };
      expect(json.finished).toEqual({ at: new Date(T0 + 61_000).toISOString(), rounds: 1 });
      expect(json.sites.map((s) => s.status)).toEqual(['finished', 'finished', 'offline']);
      expect(statusReport(store, FED)).toContain(`rounds closed: 1 — federation finished ${new Date(T0 + 61_000).toISOString()}`);
    } finally {
      store.close();
    }
  });

  it('a finish that more rounds came after no longer counts', () => {
    const store = finishedFederation(mkdtempSync(join(work, 'more-')));
    try {
      store.openRound({ round: 2, baseModelHash: 'b'.repeat(64), selected: ['site-a'], openedAt: T0 + 120_000, deadlineAt: T0 + 420_000 });
      expect(eventFacts(store).finish).toBeUndefined();
      expect(siteStatus(store.listSites()[0]!, T0 + 10 * 60_000, undefined)).toBe('offline');
    } finally {
      store.close();
    }
  });
});

describe('a site without validation data', () => {
  it('is shown as such in the sites table, the metrics table and status --json', () => {
    const store = finishedFederation(mkdtempSync(join(work, 'noval-')));
    try {
      const report = statusReport(store, FED);
      expect(report.split('\n').find((l) => l.includes('site-b') && l.includes('│'))).toContain('NONE (no validation Dice)');
      expect(report.split('\n').find((l) => l.includes('site-a') && l.includes('│'))).toContain('2 cases');
      expect(report).toContain('no validation data at site-b: no validation Dice from this site');
      const metrics = metricsTable(store.listMetrics());
      expect(metrics.split('\n').find((l) => l.includes('site-b'))).toContain('no val data');
      const json = statusJson(store, FED) as { sites: { name: string; validationCases: number | null }[] };
      expect(json.sites.map((s) => [s.name, s.validationCases])).toEqual([['site-a', 2], ['site-b', 0], ['site-c', null]]);
    } finally {
      store.close();
    }
  });

  it('is found before the agent connects, with the fix in the message', async () => {
    const none = join(work, 'data-none');
    await writePhantomSite(none, { siteName: 'n', cases: 4, valCases: 0, size: [8, 8, 8], seed: 1, intensityShift: 0 });
    const n = await validationNotice(none);
    expect(n).toMatchObject({ validationCases: 0, trainingCases: 4 });
    expect(n.warning).toMatch(/^no validation cases in .*data-none: this site will report no validation Dice/);
    expect(n.warning).toContain('imagesTs/ + labelsTs/');

    const held = join(work, 'data-held');
    await writePhantomSite(held, { siteName: 'h', cases: 4, valCases: 2, size: [8, 8, 8], seed: 2, intensityShift: 0 });
    expect(await validationNotice(held)).toEqual({ validationCases: 2, trainingCases: 4 });

    // Enough labelled training cases: a share is held back, as training will do.
    const carved = join(work, 'data-carved');
    await writePhantomSite(carved, { siteName: 'c', cases: 6, valCases: 0, size: [8, 8, 8], seed: 3, intensityShift: 0 });
    const c = await validationNotice(carved);
    expect(c.warning).toBeUndefined();
    expect(c.validationCases).toBe(1);
    expect(c.trainingCases).toBe(5);
  });
});

describe('the engine line at site start', () => {
  it('says "requested" of no engine when the choice was automatic, and keeps why each one was passed over', async () => {
    const saved = process.env.MEDFL_KERNELS;
    delete process.env.MEDFL_KERNELS;
    try {
      // The real automatic choice on this machine, as a Med3D site makes it (tfjs-node-gpu is not installed here).
      const sel = await selectConvKernels({ force: 'auto' });
      expect(sel.tried.filter((a) => a.reason !== undefined && /was requested/.test(a.reason))).toEqual([]);
      const gpu = sel.tried.find((a) => a.name === 'tfjs-node-gpu');
      expect(gpu?.ok).toBe(false);
      expect(gpu?.reason).toMatch(/tfjs-node-gpu/);
    } finally {
      if (saved !== undefined) process.env.MEDFL_KERNELS = saved;
    }
  });

  it('names the setting when the admin did ask for kernels that cannot load', async () => {
    await expect(selectConvKernels({ force: 'tfjs-node-gpu' })).rejects.toThrow(/MEDFL_KERNELS=tfjs-node-gpu but .*tfjs-node-gpu/);
  });
});

