/**
 * The Governance service on a real coordinator (in-process, TLS, token interceptor): a site fetches and
 * verifies the ledger, a call without a site token is refused, and a decline becomes a task.declined event.
 */
import { afterAll, describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { declineTask } from '../../site-agent/policy.ts';
import { SiteConnection } from '../../site-agent/transport/connection.ts';
import { loadGovernanceService } from '../../shared/privacy/governance-proto.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { fetchLedgerLines, siteLedger } from '../../cli/audit.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

let coord: RunningCoordinator | undefined;
afterAll(async () => coord?.stop());

describe('Governance service', () => {
  it('serves the ledger to enrolled sites only and publishes declines', async () => {
    const work = mkdtempSync(join(tmpdir(), 'medfl-gov-'));
    const coordDir = join(work, 'coordinator');
    const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
    // A quorum nobody meets: the federation just waits while we talk to it.
    writeFileSync(home.planPath, TEST_PLAN({ rounds: 1, minSites: 5, gather: 0 }));
    coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }) });
    const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
    const siteDir = join(work, 'site-a');
    await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteDir });
    const events: FederationEvent[] = [];
    coord.bus.subscribe((e) => events.push(e));

    // An empty ledger verifies; the site remembers the head it saw.
    expect(await fetchLedgerLines(new SiteHome(siteDir))).toEqual([]);
    const r = await siteLedger({ dir: siteDir });
    expect(r.ok).toBe(true);
    expect(r.own).toEqual([]);

    // No token: the interceptor refuses the call before the handler.
    const Governance = loadGovernanceService();
    const anon = new Governance(`localhost:${coord.port}`, pinnedChannelCredentials(home.caPem())) as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
    const code = await new Promise<number | undefined>((resolve) => {
      const s = anon.FetchLedger({ fromSeq: 1 }) as grpc.ClientReadableStream<unknown>;
      s.on('data', () => undefined);
      s.on('error', (e: grpc.ServiceError) => resolve(e.code));
      s.on('end', () => resolve(undefined));
    });
    anon.close();
    expect(code).toBe(grpc.status.UNAUTHENTICATED);

    // A decline is recorded and published under the caller's verified site name.
    const connection = new SiteConnection(new SiteHome(siteDir));
    const ok = await declineTask(connection, { round: 1, taskId: 'r1-site-a', reason: 'site policy requires differential privacy' }, pino({ level: 'silent' }));
    connection.close();
    expect(ok).toBe(true);
    expect(events.find((e) => (e.type as string) === 'task.declined')).toMatchObject({ site: 'site-a', round: 1, reason: 'site policy requires differential privacy' });
  }, 60_000);
});
