/**
 * Issue 17: heartbeats name the site's MedFL release (HeartbeatRequest.software_version, field 5). A heartbeat as an
 * older site encodes it — the same message without the field — is still accepted and leaves the version unknown;
 * a malformed version is refused with a message naming the field.
 */
import * as grpc from '@grpc/grpc-js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { federationHandlers, type FederationServiceDeps } from '../../coordinator/server/federation-service.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { siteVersion } from '../../coordinator/admin-http/status-json.ts';
import { AUTHENTICATED_SITE_KEY, loadProto } from '../../shared/protocol/grpc.ts';

const work = mkdtempSync(join(tmpdir(), 'medfl-hb-version-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Decodes `wire` as the coordinator's gRPC server does and calls its Heartbeat handler for `site`. */
function heartbeat(deps: Pick<FederationServiceDeps, 'store' | 'engine'>, site: string, wire: Buffer): Promise<{ err: Partial<grpc.StatusObject> | null; value: unknown }> {
  const method = loadProto().Federation.service.Heartbeat!;
  const metadata = new grpc.Metadata();
  metadata.set(AUTHENTICATED_SITE_KEY, site);
  const handlers = federationHandlers({ ...deps, models: {} as never, receiver: {} as never, log: pino({ level: 'silent' }) } as FederationServiceDeps);
  return new Promise((resolve) => {
    const call = { request: method.requestDeserialize(wire), metadata } as unknown as grpc.ServerUnaryCall<unknown, unknown>;
    (handlers.Heartbeat as grpc.handleUnaryCall<unknown, unknown>)(call, (err, value) => resolve({ err: err as Partial<grpc.StatusObject> | null, value }));
  });
}

describe('heartbeat software version', () => {
  const store = new CoordinatorStore(join(work, 'state.db'));
  afterAll(() => store.close());
  store.inviteSite('old', 'h1', Date.now() + 60_000);
  store.enrolSite('old', 'h1', Buffer.alloc(32, 1));
  store.inviteSite('new', 'h2', Date.now() + 60_000);
  store.enrolSite('new', 'h2', Buffer.alloc(32, 2));
  const engine = { siteIdle: () => undefined } as unknown as FederationServiceDeps['engine'];
  const encode = (m: Record<string, unknown>) => loadProto().Federation.service.Heartbeat!.requestSerialize(m);

  it('accepts a heartbeat without the field (an older site) and shows its version as unknown', async () => {
    const wire = encode({ state: 'training', progress: 0.5, taskId: 't1', engine: 'cpu' });
    const r = await heartbeat({ store, engine }, 'old', wire);
    expect(r.err).toBeNull();
    expect(r.value).toMatchObject({ features: expect.any(Array) });
    expect(store.getSite('old')).toMatchObject({ activity: 'training', engine: 'cpu', softwareVersion: null });
    expect(siteVersion(store.getSite('old')!)).toBe('unknown');
  });

  it('stores the version a current site names', async () => {
    const r = await heartbeat({ store, engine }, 'new', encode({ state: 'idle', progress: 0, taskId: '', engine: 'onednn', softwareVersion: '0.1.0' }));
    expect(r.err).toBeNull();
    expect(siteVersion(store.getSite('new')!)).toBe('0.1.0');
  });

  it('refuses a malformed version, naming the field, and stores nothing of it', async () => {
    const r = await heartbeat({ store, engine }, 'new', encode({ state: 'idle', progress: 0, taskId: '', engine: 'onednn', softwareVersion: '1.0\n<script>' }));
    expect(r.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(r.err?.details).toMatch(/softwareVersion must be a release name/);
    expect(store.getSite('new')!.softwareVersion).toBe('0.1.0');
  });
});
