/**
 * The coordinator's admin HTTP endpoint against a real coordinator (in this process: real gRPC over TLS, real
 * tokens, scripted sites that upload hand-made updates): /metrics must count what happened — rounds, accepted and
 * refused updates, transfers, refused site calls — /healthz and /readyz answer, and the bind and token rules hold.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { connect } from 'node:net';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { CHANNEL_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import { freePort, waitFor } from '../../cli/processes.ts';
import { InprocFederation } from '../aggregation/inproc.ts';
import { PRIVACY_KEY } from '../../coordinator/rounds/round-engine.ts';
import { downloadBytes } from '../helpers/download.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { getAdmin, sampleSum, sampleValue, scrape, type Sample } from '../helpers/prometheus.ts';

const plan = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 2',
  'minSites: 2',
  'gatherSeconds: 0',
  'roundDeadlineSeconds: 60',
  '',
].join('\n');

/** A plain grpc-js client on the coordinator's port with TLS but no site token: its calls must be refused. */
function anonymousCall(f: InprocFederation, authorization: string | undefined, method: 'Heartbeat' | 'DownloadModel', modelHash: string): Promise<number> {
  const { Federation } = loadProto();
  const c = new Federation(`localhost:${f.port}`, pinnedChannelCredentials(new CoordinatorHome(f.coordDir).caPem()), CHANNEL_OPTIONS) as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
  const md = new grpc.Metadata();
  if (authorization !== undefined) md.set('authorization', authorization);
  return new Promise((resolve) => {
    const done = (err: grpc.ServiceError | null) => {
      c.close();
      resolve(err ? err.code : grpc.status.OK);
    };
    if (method === 'Heartbeat') c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' }, md, done);
    else {
      const s = c.DownloadModel({ modelHash, offset: 0 }, md) as grpc.ClientReadableStream<unknown>;
      s.on('data', () => undefined);
      s.on('error', done);
      s.on('end', () => done(null));
    }
  });
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

describe('admin endpoint of a coordinator that ran a federation', () => {
  let f: InprocFederation;
  let base: string;
  let metrics: Sample[];
  const uploaded: number[] = [];
  let downloaded = 0;

  beforeAll(async () => {
    f = await InprocFederation.create(plan, ['site-a', 'site-b'], { admin: { port: 0 } });
    base = f.coord!.admin!.url;
    const [a, b] = f.connect(['site-a', 'site-b']);
    for (const round of [1, 2]) {
      for (const s of [a!, b!]) {
        const t = await f.task(s, round);
        if (round === 1 && s === a) downloaded = (await downloadBytes(s.client, t.modelHash)).length;
        const model = f.model(t.modelHash);
        if (round === 1 && s === b) {
          // Refused by validation: counted as a rejection with reason non_finite, not as a transfer.
          const poisoned = makeBundle([...model.values()].map((x, i) => ({ ...x, data: i === 0 ? x.data.map((v, j) => (j === 0 ? Number.NaN : v)) : x.data })));
          const ack = await f.upload(s, t, encodeSafetensors(poisoned));
          expect(ack.accepted).toBe(false);
        }
        const payload = encodeSafetensors(makeBundle([...model.values()].map((x) => ({ ...x, data: x.data.map((v) => v + 0.01) }))));
        const ack = await f.upload(s, t, payload);
        expect(ack.accepted, ack.reason).toBe(true);
        uploaded.push(payload.length);
      }
    }
    await f.closedRounds(2);
    // Two refusals, a unary call without a token and a model download with a garbage token: both are counted.
    expect(await anonymousCall(f, undefined, 'Heartbeat', '')).toBe(grpc.status.UNAUTHENTICATED);
    expect(await anonymousCall(f, 'Bearer not-a-jwt', 'DownloadModel', f.coord!.engine.currentModelHash)).toBe(grpc.status.UNAUTHENTICATED);
    await waitFor(() => f.coord!.engine.isFinished, 10_000, 'the federation to finish');
    metrics = await scrape(base);
  });

  afterAll(async () => {
    await f?.close();
  });

  it('listens on loopback by default, on a port of its own', () => {
    expect(f.coord!.admin!.host).toBe('127.0.0.1');
    expect(f.coord!.admin!.port).not.toBe(f.port);
  });

  it('counts rounds as the store recorded them', () => {
    const store = f.coord!.store;
    const closed = store.listRounds().filter((r) => r.state === 'closed').length;
    expect(closed).toBe(2);
    expect(sampleValue(metrics, 'medfl_rounds_opened_total')).toBe(store.listRounds().length);
    expect(sampleValue(metrics, 'medfl_rounds_closed_total')).toBe(closed);
    expect(sampleSum(metrics, 'medfl_rounds_failed_total')).toBe(0);
    // Present at 0 before any failure, so an alert on increase() sees the first one.
    expect(sampleValue(metrics, 'medfl_rounds_failed_total', { cause: 'deadline' })).toBe(0);
    expect(sampleValue(metrics, 'medfl_round_duration_seconds_count', { outcome: 'closed' })).toBe(closed);
    expect(sampleValue(metrics, 'medfl_round_duration_seconds_sum', { outcome: 'closed' })).toBeGreaterThan(0);
    expect(sampleValue(metrics, 'medfl_round_open')).toBe(0);
    expect(sampleValue(metrics, 'medfl_federation_finished')).toBe(1);
  });

  it('counts accepted updates per site and the refused one with its reason', () => {
    const store = f.coord!.store;
    for (const site of ['site-a', 'site-b']) {
      const stored = [1, 2].flatMap((r) => store.updatesForRound(r)).filter((u) => u.site === site).length;
      expect(stored).toBe(2);
      expect(sampleValue(metrics, 'medfl_updates_accepted_total', { site })).toBe(stored);
    }
    expect(sampleValue(metrics, 'medfl_updates_rejected_total', { site: 'site-b', reason: 'non_finite' })).toBe(1);
    expect(sampleSum(metrics, 'medfl_updates_rejected_total')).toBe(1);
    expect(sampleValue(metrics, 'medfl_updates_rejected_total', { site: 'site-a', reason: 'norm' })).toBe(0);
  });

  it('measures every accepted upload and the download, in bytes and seconds', () => {
    expect(sampleValue(metrics, 'medfl_transfer_bytes_count', { direction: 'upload' })).toBe(uploaded.length);
    expect(sampleValue(metrics, 'medfl_transfer_bytes_sum', { direction: 'upload' })).toBe(uploaded.reduce((a, b) => a + b, 0));
    expect(sampleValue(metrics, 'medfl_transfer_seconds_count', { direction: 'upload' })).toBe(uploaded.length);
    expect(downloaded).toBeGreaterThan(0);
    expect(sampleValue(metrics, 'medfl_transfer_bytes_count', { direction: 'download' })).toBe(1);
    expect(sampleValue(metrics, 'medfl_transfer_bytes_sum', { direction: 'download' })).toBe(downloaded);
    expect(sampleValue(metrics, 'medfl_transfer_seconds_sum', { direction: 'download' })).toBeGreaterThanOrEqual(0);
  });

  it('shows the transfers running and waiting for a slot: none once the rounds are over', () => {
    for (const direction of ['download', 'upload']) {
      expect(sampleValue(metrics, 'medfl_transfers_running', { direction })).toBe(0);
      expect(sampleValue(metrics, 'medfl_transfers_waiting', { direction })).toBe(0);
    }
  });

  it('counts refused site calls on both transports by reason', () => {
    expect(sampleValue(metrics, 'medfl_auth_failures_total', { reason: 'missing_token' })).toBe(1);
    expect(sampleValue(metrics, 'medfl_auth_failures_total', { reason: 'malformed_token' })).toBe(1);
    expect(sampleSum(metrics, 'medfl_auth_failures_total')).toBe(2);
  });

  it('reads site gauges from the engine and store, and labels everything with the federation', () => {
    expect(sampleValue(metrics, 'medfl_sites_connected')).toBe(2);
    expect(sampleValue(metrics, 'medfl_sites', { state: 'enrolled' })).toBe(2);
    expect(sampleValue(metrics, 'medfl_sites_selected')).toBe(0);
    expect(sampleValue(metrics, 'medfl_store_bytes')).toBeGreaterThan(0);
    const lastSeen = sampleValue(metrics, 'medfl_site_last_seen_timestamp_seconds', { site: 'site-a' })!;
    expect(Math.abs(lastSeen - Date.now() / 1000)).toBeLessThan(120);
    // Default process metrics are there, in this coordinator's own registry.
    expect(sampleValue(metrics, 'process_cpu_seconds_total')).toBeGreaterThan(0);
    const federation = f.coord!.federationId;
    expect(metrics.every((s) => s.labels.federation === federation)).toBe(true);
    // No DP in this plan: no epsilon is made up.
    expect(metrics.some((s) => s.name.startsWith('medfl_privacy_'))).toBe(false);
  });

  it('answers /healthz and /readyz with JSON, and 404 / 405 otherwise', async () => {
    const h = await getAdmin(`${base}/healthz`);
    expect(h.status).toBe(200);
    expect(JSON.parse(h.body)).toMatchObject({ status: 'ok' });
    const r = await getAdmin(`${base}/readyz`);
    expect(r.status, r.body).toBe(200);
    const ready = JSON.parse(r.body) as { status: string; checks: { name: string; ok: boolean }[] };
    expect(ready.status).toBe('ready');
    expect(ready.checks.map((c) => [c.name, c.ok])).toEqual([['store', true], ['disk', true]]);
    expect((await getAdmin(`${base}/metrics`)).headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    expect((await getAdmin(`${base}/nothing-here`)).status).toBe(404);
    expect((await getAdmin(`${base}/metrics`, undefined, 'POST')).status).toBe(405);
  });

  it('moves its counters while running: a later scrape sees a new refusal', async () => {
    expect(await anonymousCall(f, 'Basic abc', 'Heartbeat', '')).toBe(grpc.status.UNAUTHENTICATED);
    const later = await scrape(base);
    expect(sampleValue(later, 'medfl_auth_failures_total', { reason: 'malformed_token' })).toBe(2);
  });
});

describe('admin endpoint of a coordinator with client-level DP', () => {
  let f: InprocFederation | undefined;
  afterAll(async () => {
    await f?.close();
  });

  it('exports the epsilon the round-close transaction stored', async () => {
    const dpPlan = plan.replace('rounds: 2', 'rounds: 1') + 'aggregation: { dp: { clipNorm: 1, noiseMultiplier: 1.0, delta: 0.00001 } }\n';
    f = await InprocFederation.create(dpPlan, ['site-a', 'site-b'], { admin: { port: 0 } });
    const before = await scrape(f.coord!.admin!.url);
    expect(sampleValue(before, 'medfl_privacy_epsilon_spent')).toBe(0);
    for (const s of f.connect(['site-a', 'site-b'])) {
      const t = await f.task(s, 1);
      const ack = await f.upload(s, t, encodeSafetensors(makeBundle([...f.model(t.modelHash).values()].map((x) => ({ ...x, data: x.data.map((v) => v + 0.001) })))));
      expect(ack.accepted, ack.reason).toBe(true);
    }
    await f.closedRounds(1);
    const spent = JSON.parse(f.coord!.store.getMeta(PRIVACY_KEY)!) as { epsilon: number; rounds: number };
    expect(spent.epsilon).toBeGreaterThan(0);
    const after = await scrape(f.coord!.admin!.url);
    expect(sampleValue(after, 'medfl_privacy_epsilon_spent')).toBeCloseTo(spent.epsilon, 9);
    expect(sampleValue(after, 'medfl_privacy_dp_rounds')).toBe(1);
  });
});

describe('admin endpoint settings', () => {
  const started: RunningCoordinator[] = [];
  let nats: NatsServer | undefined;
  afterAll(async () => {
    for (const c of started) await c.stop();
    await nats?.stop();
  });

  async function coordinatorDir(): Promise<string> {
    const dir = join(mkdtempSync(join(tmpdir(), 'medfl-admin-')), 'coordinator');
    const home = await CoordinatorHome.init(dir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(home.planPath, plan);
    return dir;
  }

  async function start(dir: string, extra: Partial<Parameters<typeof startCoordinator>[0]>): Promise<RunningCoordinator> {
    const c = await startCoordinator({ dir, port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }), ...extra });
    started.push(c);
    return c;
  }

  it('refuses a non-loopback address without a token, before anything listens', async () => {
    const dir = await coordinatorDir();
    const grpcPort = await freePort();
    const adminPort = await freePort();
    await expect(startCoordinator({ dir, port: grpcPort, host: '127.0.0.1', log: pino({ level: 'silent' }), admin: { host: '0.0.0.0', port: adminPort } })).rejects.toThrow(
      /may listen on '0\.0\.0\.0' \(not loopback\) only with an admin token/,
    );
    expect(await listening(grpcPort)).toBe(false);
    expect(await listening(adminPort)).toBe(false);
    await expect(start(dir, { admin: { host: '::', port: 0 } })).rejects.toThrow(/only with an admin token/);
    await expect(start(dir, { admin: { port: 0, token: 'short' } })).rejects.toThrow(/at least 16 characters/);
  });

  it('with a token: listens beyond loopback and refuses a missing or wrong token with 401', async () => {
    const token = 'correct-horse-battery-staple-0123';
    const c = await start(await coordinatorDir(), { admin: { host: '0.0.0.0', port: 0, token } });
    const base = `http://127.0.0.1:${c.admin!.port}`;
    for (const wrong of [undefined, 'correct-horse-battery-staple-0124', token.slice(0, -1), `${token}x`]) {
      for (const path of ['/metrics', '/healthz', '/readyz']) {
        const r = await getAdmin(`${base}${path}`, wrong);
        expect(r.status, `${path} with ${wrong}`).toBe(401);
        expect(r.headers.get('www-authenticate')).toMatch(/^Bearer/);
        expect(r.body).not.toMatch(/medfl_/);
      }
    }
    const ok = await getAdmin(`${base}/metrics`, token);
    expect(ok.status).toBe(200);
    // Each refusal above was counted (4 tokens × 3 paths).
    expect(sampleValue(await scrape(base, token), 'medfl_admin_auth_failures_total')).toBe(12);
    expect((await getAdmin(`${base}/readyz`, token)).status).toBe(200);
  });

  it('/readyz is 503 and names the disk check when free space is below the threshold', async () => {
    const c = await start(await coordinatorDir(), { admin: { port: 0, minFreeBytes: Number.MAX_SAFE_INTEGER } });
    const r = await getAdmin(`${c.admin!.url}/readyz`);
    expect(r.status).toBe(503);
    const body = JSON.parse(r.body) as { status: string; checks: { name: string; ok: boolean; detail: string }[] };
    expect(body.status).toBe('not ready');
    expect(body.checks.find((x) => x.name === 'disk')).toMatchObject({ ok: false, detail: expect.stringMatching(/below the .* threshold/) });
    expect(body.checks.find((x) => x.name === 'store')).toMatchObject({ ok: true });
    // Alive all the same.
    expect((await getAdmin(`${c.admin!.url}/healthz`)).status).toBe(200);
  });

  it('/readyz follows the NATS connection: ready while connected, 503 once the server is gone', async () => {
    nats = await startNats({ jetstream: false });
    const c = await start(await coordinatorDir(), { natsUrl: nats.url, admin: { port: 0 } });
    const first = await getAdmin(`${c.admin!.url}/readyz`);
    expect(first.status, first.body).toBe(200);
    expect((JSON.parse(first.body) as { checks: { name: string; ok: boolean }[] }).checks).toContainEqual(expect.objectContaining({ name: 'nats', ok: true }));
    await nats.stop();
    let last = first;
    // The client notices the closed connection at once; allow 15 s on a loaded machine.
    for (let i = 0; i < 150 && last.status !== 503; i++) {
      await new Promise((r) => setTimeout(r, 100));
      last = await getAdmin(`${c.admin!.url}/readyz`);
    }
    expect(last.status, last.body).toBe(503);
    expect((JSON.parse(last.body) as { checks: { name: string; ok: boolean }[] }).checks).toContainEqual(expect.objectContaining({ name: 'nats', ok: false }));
  });

  it('stops listening when the coordinator stops', async () => {
    const c = await start(await coordinatorDir(), { admin: { port: 0 } });
    const port = c.admin!.port;
    expect(await listening(port)).toBe(true);
    await c.stop();
    started.splice(started.indexOf(c), 1);
    expect(await listening(port)).toBe(false);
  });
});
