/**
 * `medfl coordinator start --admin-port` as an operator runs it: a coordinator process and two site-agent processes
 * that really train, one round; then /metrics over HTTP must match what the coordinator's store recorded, with the
 * token from --admin-token-file required on every request. Also the CLI's refusal of a non-loopback admin address
 * without a token.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { spawnSync } from 'node:child_process';
import { freePort, spawnMedfl } from '../../cli/processes.ts';
import { medflVersion } from '../../shared/util/version.ts';
import { getAdmin, sampleSum, sampleValue, scrape, type Sample } from '../helpers/prometheus.ts';

describe('admin endpoint of a coordinator process after a real federation round', () => {
  let fed: TestFederation;
  let base: string;
  let metrics: Sample[];
  const token = 'e2e-admin-token-7f3a9c21b5d04e68';

  beforeAll(async () => {
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 1, minSites: 2 }) });
    const adminPort = await freePort();
    base = `http://127.0.0.1:${adminPort}`;
    const tokenFile = join(fed.work, 'admin-token');
    writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
    await fed.startCoordinator(['--admin-port', String(adminPort), '--admin-token-file', tokenFile]);
    await fed.enrollAll();
    const codes = await Promise.all(fed.sites.map((s) => exited(fed.startSite(s), 150_000)));
    expect(codes).toEqual([0, 0]);
    metrics = await scrape(base, token);
  }, 180_000);

  afterAll(() => fed?.killAll());

  it('prints where the admin endpoint listens', () => {
    expect(readFileSync(fed.logPath('coordinator'), 'utf8')).toContain(`admin endpoint ${base} (/metrics, /healthz, /readyz)`);
  });

  it('counts the round and the updates as the store has them', () => {
    const store = fed.store();
    try {
      expect(store.closedRoundCount()).toBe(1);
      expect(sampleValue(metrics, 'medfl_rounds_opened_total')).toBe(1);
      expect(sampleValue(metrics, 'medfl_rounds_closed_total')).toBe(store.closedRoundCount());
      expect(sampleValue(metrics, 'medfl_round_duration_seconds_count', { outcome: 'closed' })).toBe(1);
      const updates = store.updatesForRound(1);
      expect(updates.map((u) => u.site).sort()).toEqual(fed.sites);
      for (const site of fed.sites) expect(sampleValue(metrics, 'medfl_updates_accepted_total', { site })).toBe(1);
      expect(sampleSum(metrics, 'medfl_updates_rejected_total')).toBe(0);
      // Uploads: one per site, their bytes exactly what was stored.
      expect(sampleValue(metrics, 'medfl_transfer_bytes_count', { direction: 'upload' })).toBe(updates.length);
      expect(sampleValue(metrics, 'medfl_transfer_bytes_sum', { direction: 'upload' })).toBe(updates.reduce((a, u) => a + u.sizeBytes, 0));
      // Downloads: each site fetched the round's base model once.
      const model = store.getModel(store.listRounds()[0]!.baseModelHash)!;
      expect(sampleValue(metrics, 'medfl_transfer_bytes_count', { direction: 'download' })).toBe(fed.sites.length);
      expect(sampleValue(metrics, 'medfl_transfer_bytes_sum', { direction: 'download' })).toBe(fed.sites.length * model.sizeBytes);
      expect(sampleValue(metrics, 'medfl_federation_finished')).toBe(1);
      expect(sampleValue(metrics, 'medfl_sites', { state: 'enrolled' })).toBe(2);
    } finally {
      store.close();
    }
  });

  it('shows the MedFL release each site named in its heartbeats: status --json, the dashboard data and /metrics', async () => {
    const st = spawnSync(process.execPath, ['bin/medfl.js', 'status', '--dir', fed.coordDir, '--json'], { encoding: 'utf8', env: { ...process.env, MEDFL_LOG_LEVEL: 'warn' }, timeout: 60_000 });
    expect(st.status, st.stderr).toBe(0);
    const fromCli = (JSON.parse(st.stdout) as { sites: { name: string; version: string | null }[] }).sites.map((s) => [s.name, s.version]);
    expect(fromCli).toEqual(fed.sites.map((s) => [s, medflVersion()]));
    const api = await getAdmin(`${base}/api/status`, token);
    expect(api.status).toBe(200);
    expect((JSON.parse(api.body) as { sites: { name: string; version: string | null }[] }).sites.map((s) => [s.name, s.version])).toEqual(fromCli);
    for (const site of fed.sites) expect(sampleValue(metrics, 'medfl_site_info', { site, version: medflVersion() }), site).toBe(1);
  });

  it('is ready, and wants the token on every request', async () => {
    const ready = await getAdmin(`${base}/readyz`, token);
    expect(ready.status, ready.body).toBe(200);
    expect((await getAdmin(`${base}/readyz`)).status).toBe(401);
    expect((await getAdmin(`${base}/metrics`, 'e2e-admin-token-7f3a9c21b5d04e69')).status).toBe(401);
  });
});

describe('medfl coordinator start --admin-host', () => {
  let fed: TestFederation;
  afterAll(() => fed?.killAll());

  it('refuses a non-loopback admin address without a token, and starts nothing', async () => {
    fed = await makeFederation({ sites: 1, plan: TEST_PLAN({ rounds: 1, minSites: 1 }) });
    const log = fed.logPath('refused');
    const c = spawnMedfl(['coordinator', 'start', '--dir', fed.coordDir, '--port', String(fed.port), '--bind', '127.0.0.1', '--admin-port', String(await freePort()), '--admin-host', '0.0.0.0'], log, { MEDFL_ADMIN_TOKEN: '' });
    fed.children.push(c);
    expect(await exited(c, 30_000)).toBe(1);
    const out = readFileSync(log, 'utf8');
    expect(out).toMatch(/medfl: admin endpoint: host: the admin endpoint may listen on '0\.0\.0\.0' \(not loopback\) only with an admin token/);
    expect(out).not.toContain('listening on port');
  });
});
