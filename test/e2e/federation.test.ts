/**
 * End to end, as admins run it: a coordinator process and three site-agent processes over TLS + tokens,
 * events on a real nats-server with JetStream, two rounds of real training. Also checks, from each
 * site's wire audit, that only the plan's shared tensors and aggregate metrics left the sites.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect, JSONCodec, type NatsConnection } from 'nats';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';

describe('a local federation of separate processes', () => {
  let fed: TestFederation;
  let nats: NatsServer;
  let nc: NatsConnection;
  const events: FederationEvent[] = [];
  const plan = TEST_PLAN({ rounds: 2, minSites: 2 });

  beforeAll(async () => {
    nats = await startNats({ jetstream: true });
    nc = await connect({ servers: nats.url });
    const codec = JSONCodec<FederationEvent>();
    const sub = nc.subscribe('medfl.>');
    void (async () => {
      for await (const m of sub) events.push(codec.decode(m.data));
    })();
    fed = await makeFederation({ sites: 3, plan });
    await fed.startCoordinator(['--nats', nats.url]);
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 150_000)));
    expect(codes).toEqual([0, 0, 0]);
  });

  afterAll(async () => {
    fed?.killAll();
    await nc?.close();
    await nats?.stop();
  });

  it('runs both rounds with all three sites and changes the global model each round', () => {
    const store = fed.store();
    const rounds = store.listRounds();
    expect(rounds.map((r) => [r.round, r.state, r.selected])).toEqual([
      [1, 'closed', fed.sites],
      [2, 'closed', fed.sites],
    ]);
    const initial = rounds[0].baseModelHash;
    const h1 = rounds[0].resultModelHash!;
    const h2 = rounds[1].resultModelHash!;
    expect(rounds[1].baseModelHash).toBe(h1);
    expect(new Set([initial, h1, h2]).size).toBe(3);
    expect(store.getMeta('current_model')).toBe(h2);
    // Every version is an immutable file named by its own hash.
    for (const h of [initial, h1, h2]) {
      expect(sha256Hex(readFileSync(join(fed.coordDir, 'models', `${h}.safetensors`)))).toBe(h);
    }
    expect(store.updatesForRound(1).map((u) => u.site).sort()).toEqual(fed.sites);
    store.close();
  });

  it('keeps per-site metrics for every round: samples, loss, validation Dice', () => {
    const store = fed.store();
    const metrics = store.listMetrics();
    for (const round of [1, 2]) {
      for (const site of fed.sites) {
        const keys = metrics.filter((m) => m.round === round && m.site === site).map((m) => m.key);
        expect(keys).toEqual(expect.arrayContaining(['num_train', 'train_loss', 'train_loss_first', 'val_dice_mean']));
      }
    }
    const loss = (r: number) => metrics.filter((m) => m.round === r && m.key === 'train_loss').map((m) => m.value);
    expect(loss(1).every(Number.isFinite)).toBe(true);
    store.close();
  });

  it('published the round events on NATS and kept them in the JetStream stream', async () => {
    const types = events.map((e) => e.type);
    expect(types.filter((t) => t === 'round.started')).toHaveLength(2);
    expect(types.filter((t) => t === 'update.accepted')).toHaveLength(6);
    expect(types.filter((t) => t === 'round.closed')).toHaveLength(2);
    expect(types).toContain('federation.finished');
    const store = fed.store();
    const closed = events.filter((e) => e.type === 'round.closed').map((e) => e.model);
    expect(closed).toEqual(store.listRounds().map((r) => r.resultModelHash));
    store.close();
    const jsm = await nc.jetstreamManager();
    const info = await jsm.streams.info('MEDFL_EVENTS');
    expect(info.state.messages).toBeGreaterThanOrEqual(events.filter((e) => e.type !== 'site.enrolled').length - 1);
  });

  it('sent nothing but the shared tensors and aggregate metrics from any site', () => {
    const shared = sharedParams(architectureFor(parsePlan(plan).model), parsePlan(plan).share).map((p) => p.name).sort();
    expect(shared.length).toBeGreaterThan(0);
    expect(shared.every((n) => n.startsWith('encoder.'))).toBe(true);
    const allowedMethods = new Set(['Heartbeat', 'SubscribeTasks', 'DownloadModel', 'UploadUpdate', 'ReportMetrics'].map((m) => `/medfl.v1.Federation/${m}`));
    const allowedMetrics = /^(num_train|num_val|train_loss|train_loss_first|train_seconds|val_dice_mean|val_dice_class_\d+)$/;
    for (const site of fed.sites) {
      const calls = readFileSync(join(fed.work, 'logs', `${site}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      const uploads = calls.filter((c) => c.method.endsWith('/UploadUpdate'));
      expect(uploads).toHaveLength(2);
      for (const c of calls) expect(allowedMethods.has(c.method)).toBe(true);
      for (const u of uploads) {
        const tensors = u.payload!.tensors as { name: string }[];
        expect(tensors.map((t) => t.name).sort()).toEqual(shared);
        // Only a header, data chunks and the hash trailer: no other field rides along.
        const kinds = (u.messages as Record<string, unknown>[]).map((m) => Object.keys(m).sort().join('+'));
        expect(kinds[0]).toBe('header');
        expect(kinds.at(-1)).toBe('trailer');
        expect(new Set(kinds.slice(1, -1))).toEqual(new Set(['data+offset']));
        // The agents heard the coordinator offer the trailer, so they hashed while sending: the header's hash is
        // empty and the trailer's is the payload's.
        const first = u.messages[0] as { header: Record<string, unknown> };
        expect(Object.keys(first.header).sort()).toEqual(['baseModelHash', 'numSamples', 'round', 'sha256', 'taskId', 'totalSize', 'updateId']);
        expect(first.header.sha256).toBe('');
        expect((u.messages.at(-1) as { trailer: { sha256: string } }).trailer.sha256).toBe(u.payload!.sha256);
      }
      for (const c of calls.filter((x) => x.method.endsWith('/ReportMetrics'))) {
        const values = (c.messages[0] as { values: Record<string, number> }).values;
        for (const k of Object.keys(values)) expect(k).toMatch(allowedMetrics);
      }
      // No path, file name or case identifier of the site's data appears anywhere in what it sent.
      const text = JSON.stringify(calls);
      for (const needle of [fed.dataDir(site), 'imagesTr', 'labelsTr', '.nii', 'train-0', 'val-0']) expect(text).not.toContain(needle);
    }
  });
});
