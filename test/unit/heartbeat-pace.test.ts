/**
 * Heartbeats are paced by the coordinator (shared/protocol/heartbeat.ts): every 5 s up to 200 enrolled sites, less
 * often beyond so that ~40 beats a second reach it however large the federation; each answer names the interval, a
 * site follows it within bounds of its own, and `medfl status` waits three intervals before it calls a site offline.
 */
import * as grpc from '@grpc/grpc-js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { federationHandlers, type FederationServiceDeps } from '../../coordinator/server/federation-service.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { federationOfflineAfterMs, siteStatus } from '../../coordinator/admin-http/status-json.ts';
import { AUTHENTICATED_SITE_KEY, loadProto } from '../../shared/protocol/grpc.ts';
import { BASE_HEARTBEAT_MS, heartbeatIntervalMs, nextHeartbeatDelayMs, offlineAfterMs } from '../../shared/protocol/heartbeat.ts';
import { startHeartbeatLoop } from '../../site-agent/transport/heartbeat-loop.ts';
import { createDashboardSource } from '../../coordinator/admin-http/dashboard-data.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';

const work = mkdtempSync(join(tmpdir(), 'medfl-hb-pace-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('the interval a coordinator names', () => {
  it('is 5 s up to 200 enrolled sites, then keeps ~40 beats a second, at most one a minute per site', () => {
    expect([0, 1, 200].map(heartbeatIntervalMs)).toEqual([5000, 5000, 5000]);
    expect(heartbeatIntervalMs(201)).toBe(6000);
    expect(heartbeatIntervalMs(1000)).toBe(25_000);
    expect(heartbeatIntervalMs(100_000)).toBe(60_000);
    // Beats per second at 1,000 and 2,000 sites stay at the planned rate.
    expect(1000 / (heartbeatIntervalMs(1000) / 1000)).toBe(40);
    expect(2000 / (heartbeatIntervalMs(2000) / 1000)).toBe(40);
    expect(offlineAfterMs(3)).toBe(15_000);
    expect(offlineAfterMs(1000)).toBe(75_000);
  });
});

describe('what a site does with it', () => {
  it('follows the named interval within 1 s … 2 min, ±10 %, and uses its own where none is named', () => {
    const mid = () => 0.5; // no spread
    expect(nextHeartbeatDelayMs(25_000, BASE_HEARTBEAT_MS, mid)).toBe(25_000);
    expect(nextHeartbeatDelayMs(0, 7000, mid)).toBe(7000); // an older coordinator (proto3 default)
    expect(nextHeartbeatDelayMs(undefined, 7000, mid)).toBe(7000); // the beat failed
    expect(nextHeartbeatDelayMs(Number.NaN, 7000, mid)).toBe(7000);
    // A compromised coordinator can neither flood it nor silence it.
    expect(nextHeartbeatDelayMs(1, BASE_HEARTBEAT_MS, mid)).toBe(1000);
    expect(nextHeartbeatDelayMs(4_000_000_000, BASE_HEARTBEAT_MS, mid)).toBe(120_000);
    expect(nextHeartbeatDelayMs(20_000, BASE_HEARTBEAT_MS, () => 0)).toBe(18_000);
    expect(nextHeartbeatDelayMs(20_000, BASE_HEARTBEAT_MS, () => 0.999999)).toBe(22_000);
  });
});

describe('the site heartbeat loop', () => {
  afterEach(() => vi.useRealTimers());

  it('beats at once, then after each named interval; after a failure at its own interval; not after stop', async () => {
    vi.useFakeTimers();
    const named = [25_000, 0, undefined, 30_000];
    const beats: number[] = [];
    const errors: unknown[] = [];
    const stop = startHeartbeatLoop({
      fallbackMs: 5000,
      random: () => 0.5,
      beat: async () => {
        beats.push(Date.now());
        const n = named.shift();
        if (n === undefined) throw new Error('UNAVAILABLE');
        return n;
      },
      onError: (e) => errors.push(e),
    });
    const t0 = Date.now();
    await vi.advanceTimersByTimeAsync(0);
    expect(beats).toEqual([t0]);
    await vi.advanceTimersByTimeAsync(24_999);
    expect(beats).toHaveLength(1); // the coordinator asked for 25 s
    await vi.advanceTimersByTimeAsync(1);
    expect(beats).toEqual([t0, t0 + 25_000]);
    await vi.advanceTimersByTimeAsync(5000); // 0 named: its own 5 s
    expect(beats).toHaveLength(3);
    await vi.advanceTimersByTimeAsync(5000); // that beat failed: its own 5 s again
    expect(beats).toHaveLength(4);
    expect(errors).toHaveLength(1);
    stop();
    await vi.advanceTimersByTimeAsync(120_000);
    expect(beats).toHaveLength(4);
  });
});

/** Calls the coordinator's Heartbeat handler as its gRPC server does and decodes the answer as a site's client does. */
async function answer(handlers: grpc.UntypedServiceImplementation, site: string): Promise<Record<string, unknown>> {
  const method = loadProto().Federation.service.Heartbeat!;
  const metadata = new grpc.Metadata();
  metadata.set(AUTHENTICATED_SITE_KEY, site);
  const request = method.requestDeserialize(method.requestSerialize({ state: 'idle', progress: 0, taskId: 't', engine: 'cpu' }));
  const value = await new Promise<unknown>((resolve, reject) =>
    (handlers.Heartbeat as grpc.handleUnaryCall<unknown, unknown>)({ request, metadata } as unknown as grpc.ServerUnaryCall<unknown, unknown>, (err, v) => (err ? reject(err) : resolve(v))),
  );
  return method.responseDeserialize(method.responseSerialize(value)) as Record<string, unknown>;
}

describe('the coordinator names the interval in every heartbeat answer', () => {
  const store = new CoordinatorStore(join(work, 'state.db'));
  afterAll(() => store.close());
  const enrol = (from: number, to: number) => {
    for (let i = from; i < to; i++) {
      store.inviteSite(`site-${i}`, `h${i}`, Date.now() + 60_000);
      store.enrolSite(`site-${i}`, `h${i}`, Buffer.alloc(32, 1));
    }
  };
  const handlers = () =>
    federationHandlers({ store, engine: { siteIdle: () => undefined } as never, models: {} as never, receiver: {} as never, log: pino({ level: 'silent' }) } as FederationServiceDeps);

  it('from the sites enrolled, on the wire as a site decodes it', async () => {
    enrol(0, 3);
    expect((await answer(handlers(), 'site-0')).nextHeartbeatMs).toBe(5000);
    enrol(3, 401);
    expect((await answer(handlers(), 'site-0')).nextHeartbeatMs).toBe(heartbeatIntervalMs(401));
    expect(heartbeatIntervalMs(401)).toBe(11_000);
  });

  it('counts the sites again at most every 10 s, not on every beat', async () => {
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const h = handlers();
      const before = (await answer(h, 'site-0')).nextHeartbeatMs;
      enrol(401, 700);
      expect((await answer(h, 'site-0')).nextHeartbeatMs).toBe(before);
      vi.setSystemTime(Date.now() + 10_001);
      expect((await answer(h, 'site-0')).nextHeartbeatMs).toBe(heartbeatIntervalMs(700));
    } finally {
      vi.useRealTimers();
    }
  });

  it('an answer without the field (an older coordinator) decodes as 0: the site keeps its own interval', () => {
    const method = loadProto().Federation.service.Heartbeat!;
    const old = method.responseDeserialize(method.responseSerialize({ serverTimeMs: 1, features: [] })) as { nextHeartbeatMs?: number };
    expect(old.nextHeartbeatMs ?? 0).toBe(0);
    expect(nextHeartbeatDelayMs(old.nextHeartbeatMs, 5000, () => 0.5)).toBe(5000);
  });
});

describe('offline, for people', () => {
  it('waits three of the federation’s intervals: 15 s for a few sites, 75 s for 1,000', () => {
    const site = { name: 'a', state: 'enrolled', lastSeenAt: 1_000_000, leftAt: null } as Parameters<typeof siteStatus>[0];
    const few = federationOfflineAfterMs([site, site, site]);
    const many = federationOfflineAfterMs(Array.from({ length: 1000 }, () => site));
    expect([few, many]).toEqual([15_000, 75_000]);
    // Revoked and invited sites do not beat, so they do not lengthen it.
    expect(federationOfflineAfterMs([site, ...Array.from({ length: 999 }, () => ({ state: 'revoked' as const }))])).toBe(15_000);
    const now = 1_000_000 + 30_000;
    expect(siteStatus(site, now, undefined, few)).toBe('offline');
    expect(siteStatus(site, now, undefined, many)).toBe('online');
  });
});

describe('the dashboard, live', () => {
  it('shows a site whose task stream closed as offline at once, not only after three long intervals', () => {
    const store = new CoordinatorStore(join(work, 'dash.db'));
    try {
      for (const s of ['here', 'gone']) {
        store.inviteSite(s, `h-${s}`, Date.now() + 60_000);
        store.enrolSite(s, `h-${s}`, Buffer.alloc(32, 1));
        store.touchSite(s, 'idle', 'cpu', Date.now() - 1000);
      }
      const engine = { openRoundNumber: undefined, isFinished: false, connectedSites: () => ['here'], connectedCapabilities: () => new Map() };
      const plan = PlanSchema.parse({ name: 'p', model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2 }, rounds: 1, minSites: 2, local: { steps: 1, batchSize: 1, learningRate: 0.01 } });
      const source = createDashboardSource({ store, federationId: 'fed', plan, engine: engine as never, bus: { subscribe: () => () => undefined } as never, ledger: {} as never, coordinatorPublicKey: new Uint8Array(32), dir: work });
      const sites = (source.status() as { sites: { name: string; status: string }[] }).sites;
      expect(Object.fromEntries(sites.map((s) => [s.name, s.status]))).toEqual({ here: 'online', gone: 'offline' });
    } finally {
      store.close();
    }
  });
});

describe('a site whose task stream closed', () => {
  it('is offline in `medfl status` at once, until it calls again; only its own stream counts, not an older one it replaced', async () => {
    const { EventEmitter } = await import('node:events');
    const store = new CoordinatorStore(join(work, 'left.db'));
    try {
      store.inviteSite('s', 'h-s', Date.now() + 60_000);
      store.enrolSite('s', 'h-s', Buffer.alloc(32, 1));
      let current: unknown;
      const engine = {
        siteConnected: (_site: string, sink: unknown) => void (current = sink),
        // As the round engine: true only for the site's current stream.
        siteDisconnected: (_site: string, sink: unknown) => sink === current,
      };
      const h = federationHandlers({ store, engine: engine as never, models: {} as never, receiver: {} as never, log: pino({ level: 'silent' }) } as FederationServiceDeps);
      const stream = () => {
        const call = Object.assign(new EventEmitter(), { request: {}, metadata: new grpc.Metadata(), write: () => true, destroy: () => undefined });
        call.metadata.set(AUTHENTICATED_SITE_KEY, 's');
        (h.SubscribeTasks as grpc.handleServerStreamingCall<unknown, unknown>)(call as never);
        return call;
      };
      const status = () => siteStatus(store.getSite('s')!, Date.now(), undefined, 75_000);
      const older = stream();
      const newer = stream();
      expect(status()).toBe('online');
      older.emit('cancelled'); // replaced by the newer stream: the site has not left
      expect(store.getSite('s')!.leftAt).toBeNull();
      expect(status()).toBe('online');
      await new Promise((r) => setTimeout(r, 5));
      newer.emit('cancelled');
      expect(status()).toBe('offline'); // in this process at once, from the pending bookkeeping
      // Written for other processes (medfl status) with the next bookkeeping commit.
      store.close();
      const other = new CoordinatorStore(join(work, 'left.db'));
      try {
        expect(other.getSite('s')!.leftAt).not.toBeNull();
        expect(siteStatus(other.getSite('s')!, Date.now(), undefined, 75_000)).toBe('offline');
        // It comes back: its next call makes it online again.
        other.touchSite('s', 'idle', 'cpu', Date.now() + 1);
        expect(siteStatus(other.getSite('s')!, Date.now() + 2, undefined, 75_000)).toBe('online');
      } finally {
        other.close();
      }
    } finally {
      try {
        store.close();
      } catch {
        // closed above
      }
    }
  });
});
