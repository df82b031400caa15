/**
 * A site agent's own metrics endpoint: a real agent (in this process, tiny3d on the CPU engine, generated phantom
 * data) trains one round against a real coordinator; its /metrics must then show the task, the phases it went
 * through and the bytes it moved, matching what the coordinator stored.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { pino } from 'pino';
import { InprocFederation } from '../aggregation/inproc.ts';
import { SiteAgent } from '../../site-agent/agent.ts';
import { SiteMetrics } from '../../site-agent/metrics.ts';
import { startSiteMetricsHttp, type SiteMetricsServer } from '../../site-agent/metrics-http.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { getAdmin, sampleValue, scrape, type Sample } from '../helpers/prometheus.ts';

const plan = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 1',
  'minSites: 1',
  'gatherSeconds: 0',
  'roundDeadlineSeconds: 120',
  'local: { steps: 2, batchSize: 2, learningRate: 0.005 }',
  '',
].join('\n');

describe('site agent metrics endpoint', () => {
  let f: InprocFederation;
  let agent: SiteAgent;
  let endpoint: SiteMetricsServer;
  let metrics: Sample[];

  beforeAll(async () => {
    f = await InprocFederation.create(plan, ['site-a']);
    const dataDir = join(f.work, 'data-a');
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 4, valCases: 2, size: [16, 16, 16], seed: 7, intensityShift: 0 });
    const home = new SiteHome(join(f.work, 'site-a'));
    const config = home.config();
    const siteMetrics = new SiteMetrics({ site: config.siteName, federation: config.federationId });
    agent = new SiteAgent({ dir: home.dir, dataDir, log: pino({ level: 'silent' }), exitWhenFinished: true, engine: 'cpu', observer: siteMetrics });
    siteMetrics.follow(() => agent.activity);
    endpoint = await startSiteMetricsHttp(0, siteMetrics, pino({ level: 'silent' }));
    const before = await scrape(endpoint.url);
    expect(sampleValue(before, 'medfl_site_tasks_total', { outcome: 'completed' })).toBe(0);
    await agent.run();
    metrics = await scrape(endpoint.url);
  }, 120_000);

  afterAll(async () => {
    agent?.stop();
    await endpoint?.close();
    await f?.close();
  });

  it('listens on loopback only', () => {
    expect(endpoint.url).toBe(`http://127.0.0.1:${endpoint.port}`);
  });

  it('counts the completed task, the round and the phases it went through', async () => {
    expect(f.coord!.store.closedRoundCount()).toBe(1);
    expect(sampleValue(metrics, 'medfl_site_tasks_total', { outcome: 'completed' })).toBe(1);
    expect(sampleValue(metrics, 'medfl_site_tasks_total', { outcome: 'failed' })).toBe(0);
    expect(sampleValue(metrics, 'medfl_site_round')).toBe(1);
    for (const phase of ['downloading', 'training', 'uploading']) {
      expect(sampleValue(metrics, 'medfl_site_phase_seconds_count', { phase }), phase).toBe(1);
    }
    expect(sampleValue(metrics, 'medfl_site_phase_seconds_sum', { phase: 'training' })).toBeGreaterThan(0);
    expect(sampleValue(metrics, 'medfl_site_phase', { phase: 'idle' })).toBe(1);
    expect(sampleValue(metrics, 'medfl_site_phase', { phase: 'training' })).toBe(0);
    expect(sampleValue(metrics, 'medfl_site_engine_info', { engine: agent.activity.engine! })).toBe(1);
    expect(metrics.every((s) => s.labels.site === 'site-a')).toBe(true);
  });

  it('counts the bytes the coordinator served and stored', () => {
    const store = f.coord!.store;
    const round = store.listRounds()[0]!;
    expect(sampleValue(metrics, 'medfl_site_transfer_bytes_total', { direction: 'download' })).toBe(store.getModel(round.baseModelHash)!.sizeBytes);
    expect(sampleValue(metrics, 'medfl_site_transfer_bytes_total', { direction: 'upload' })).toBe(store.updatesForRound(1)[0]!.sizeBytes);
  });

  it('answers /healthz, and 404 / 405 otherwise', async () => {
    expect((await getAdmin(`${endpoint.url}/healthz`)).status).toBe(200);
    expect((await getAdmin(`${endpoint.url}/readyz`)).status).toBe(404);
    expect((await getAdmin(`${endpoint.url}/metrics`, undefined, 'DELETE')).status).toBe(405);
  });
});
