/**
 * The dashboard's side of the admin endpoint against a real coordinator in this process (real gRPC over TLS, scripted
 * sites uploading hand-made updates): its files with their security headers, /api/status being `medfl status --json`
 * plus the live state, /api/ledger re-verifying the real ledger, /api/events streaming stored and new events, the
 * token accepted as a bearer token or as a browser's Basic password, and the task.withheld counter.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { waitFor } from '../../cli/processes.ts';
import { InprocFederation } from '../aggregation/inproc.ts';
import { statusJson } from '../../coordinator/admin-http/status-json.ts';
import { EVENT_REPLAY } from '../../coordinator/admin-http/server.ts';
import { medflVersion } from '../../shared/util/version.ts';
import { sampleValue, scrape } from '../helpers/prometheus.ts';

const plan = [
  'name: dashboard-api',
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 1',
  'minSites: 2',
  'gatherSeconds: 0',
  'roundDeadlineSeconds: 60',
  'aggregation: { dp: { clipNorm: 5, noiseMultiplier: 1.1, delta: 0.00001 } }',
  '',
].join('\n');

const TOKEN = 'dashboard-api-token-0123456789abcdef';
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;

async function get(url: string, authorization?: string): Promise<Response> {
  return fetch(url, { headers: authorization ? { authorization } : {} });
}

/** Reads server-sent events from `url` until `done` says enough (or the time is up); returns every event's data, parsed. */
async function readEvents(url: string, authorization: string, done: (events: Record<string, unknown>[]) => boolean, onOpen?: () => void): Promise<Record<string, unknown>[]> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), 20_000);
  const res = await fetch(url, { headers: { authorization }, signal: ac.signal });
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
  onOpen?.();
  const events: Record<string, unknown>[] = [];
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buffer += decoder.decode(chunk, { stream: true });
      let cut: number;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
        if (data) events.push(JSON.parse(data) as Record<string, unknown>);
      }
      if (done(events)) break;
    }
  } finally {
    clearTimeout(timer);
    ac.abort();
  }
  return events;
}

describe('dashboard data on the admin endpoint of a coordinator that ran a round', () => {
  let f: InprocFederation;
  let base: string;
  const auth = `Bearer ${TOKEN}`;

  beforeAll(async () => {
    f = await InprocFederation.create(plan, ['site-a', 'site-b'], { admin: { port: 0, token: TOKEN } });
    base = f.coord!.admin!.url;
    const [a, b] = f.connect(['site-a', 'site-b']);
    for (const s of [a!, b!]) {
      const t = await f.task(s, 1);
      const model = f.model(t.modelHash);
      const ack = await f.upload(s, t, encodeSafetensors(makeBundle([...model.values()].map((x) => ({ ...x, data: x.data.map((v) => v + 0.01) })))));
      expect(ack.accepted, ack.reason).toBe(true);
    }
    await f.closedRounds(1);
    await waitFor(() => f.coord!.engine.isFinished, 10_000, 'the federation to finish');
    // What sites report after training (a scripted site sends none): site-b has no validation cases.
    f.coord!.store.recordMetrics(1, 'site-a', { num_train: 4, num_val: 2, train_loss: 0.61, val_dice_mean: 0.42, val_dice_class_1: 0.42 });
    f.coord!.store.recordMetrics(1, 'site-b', { num_train: 4, num_val: 0, train_loss: 0.66 });
  });

  afterAll(async () => {
    await f?.close();
  });

  it('serves the page, its module and its style sheet, with a strict content security policy', async () => {
    const page = await get(`${base}/`, auth);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
    const csp = page.headers.get('content-security-policy') ?? '';
    expect(csp).toContain("default-src 'none'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).not.toContain('unsafe-inline');
    expect(page.headers.get('x-frame-options')).toBe('DENY');
    const html = await page.text();
    expect(html).toContain('<script type="module" src="/dashboard.js"></script>');
    // No inline script or style anywhere: the policy would block it, and a reviewer reads three files, not a bundle.
    expect(html).not.toMatch(/<script(?![^>]*src=)[^>]*>/);
    expect(html).not.toMatch(/<style|style="/);
    const js = await get(`${base}/dashboard.js`, auth);
    expect(js.headers.get('content-type')).toBe('text/javascript; charset=utf-8');
    expect(await js.text()).toBe(readFileSync(new URL('../../coordinator/admin-http/dashboard/dashboard.js', import.meta.url), 'utf8'));
    expect((await get(`${base}/dashboard.css`, auth)).headers.get('content-type')).toBe('text/css; charset=utf-8');
  });

  it('takes the token as a bearer token or as the Basic password, and challenges for both', async () => {
    const refused = await get(`${base}/`);
    expect(refused.status).toBe(401);
    const challenge = refused.headers.get('www-authenticate') ?? '';
    expect(challenge).toMatch(/^Bearer realm="medfl-admin"/);
    expect(challenge).toContain('Basic realm="medfl-admin"');
    expect((await get(`${base}/api/status`, basic('operator', TOKEN))).status).toBe(200);
    expect((await get(`${base}/api/status`, basic('', TOKEN))).status).toBe(200);
    expect((await get(`${base}/api/status`, basic('operator', `${TOKEN}x`))).status).toBe(401);
    expect((await get(`${base}/api/status`, basic(TOKEN, 'operator'))).status).toBe(401);
    expect((await get(`${base}/api/events`)).status).toBe(401);
  });

  it('/api/status is what `medfl status --json` computes, plus the live state', async () => {
    const s = (await (await get(`${base}/api/status`, auth)).json()) as Record<string, any>;
    const store = f.coord!.store;
    const expected = statusJson(store, f.coord!.federationId) as Record<string, any>;
    for (const key of ['schema', 'version', 'federationId', 'currentModel', 'roundsClosed', 'finished', 'privacy', 'rounds', 'models', 'metrics']) expect(s[key], key).toEqual(expected[key]);
    expect(s.sites.map((x: any) => [x.name, x.state, x.validationCases])).toEqual([['site-a', 'enrolled', 2], ['site-b', 'enrolled', 0]]);
    expect(s.finished.rounds).toBe(1);
    expect(s.models.map((m: any) => m.round)).toEqual([0, 1]);
    expect(s.live.phase).toBe('finished');
    expect(s.live.openRound).toBeNull();
    expect(s.live.coordinatorVersion).toBe(medflVersion());
    expect(s.live.plan).toMatchObject({ name: 'dashboard-api', architecture: 'tiny3d', plannedRounds: 1, minSites: 2, strategy: 'fedavg' });
    expect(s.live.connectedSites).toEqual(['site-a', 'site-b']);
    expect(s.live.protocols['site-a'].protocolVersion).toBeGreaterThanOrEqual(2);
    // All rounds released: the plan's ε is the ε spent.
    expect(s.privacy.epsilon).toBeGreaterThan(0);
    expect(s.live.privacyPlan.plannedEpsilon).toBeCloseTo(s.privacy.epsilon, 10);
    expect(s.live.privacyPlan).toMatchObject({ roundsReleased: 1, plannedRounds: 1, delta: 0.00001 });
  });

  it('/api/ledger re-verifies the coordinator\'s ledger and checks it against the store', async () => {
    const l = (await (await get(`${base}/api/ledger`, auth)).json()) as Record<string, any>;
    const lines = readFileSync(join(f.coordDir, 'ledger.jsonl'), 'utf8').trim().split('\n');
    const last = JSON.parse(lines.at(-1)!) as { seq: number; hash: string };
    expect(l).toMatchObject({ ok: true, entries: 2, head: { seq: last.seq, hash: last.hash }, chain: { ok: true }, completeness: { ok: true, updates: 2 } });
  });

  it('/api/events replays the stored events, then streams new ones as they are published', async () => {
    const storedIds = f.coord!.store.listOutbox('event').map((r) => (JSON.parse(r.body) as { id: string }).id);
    expect(storedIds.length).toBeGreaterThan(3);
    const federation = f.coord!.federationId;
    const events = await readEvents(
      `${base}/api/events`,
      auth,
      (es) => es.some((e) => e.type === 'task.withheld'),
      // Published once the stream is open: it can only arrive live.
      () => setTimeout(() => f.coord!.bus.publish({ type: 'task.withheld', federation, at: new Date().toISOString(), round: 1, site: 'site-b', missing: ['some-feature'], protocolVersion: 1 }), 300),
    );
    const replayed = events.slice(0, Math.min(storedIds.length, EVENT_REPLAY));
    expect(replayed.map((e) => e.id)).toEqual(storedIds.slice(-EVENT_REPLAY));
    expect(replayed.map((e) => e.type)).toContain('round.closed');
    expect(events.at(-1)).toMatchObject({ type: 'task.withheld', site: 'site-b', missing: ['some-feature'] });
  });

  it('counts withheld tasks in /metrics and in the status per site', async () => {
    const metrics = await scrape(base, TOKEN);
    expect(sampleValue(metrics, 'medfl_tasks_withheld_total', { site: 'site-b' })).toBe(1);
    expect(sampleValue(metrics, 'medfl_tasks_withheld_total', { site: 'site-a' })).toBe(0);
    const s = (await (await get(`${base}/api/status`, auth)).json()) as { sites: { name: string; tasksWithheld: number }[] };
    expect(s.sites.find((x) => x.name === 'site-b')?.tasksWithheld).toBe(1);
  });
});
