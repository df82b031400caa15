/**
 * Revocation of connected sites (coordinator/server/revocation-watch.ts): a revoked site's task stream is closed
 * within a tick, the others stay open, and the check costs one store query per tick however many sites are
 * connected (it used to cost one query per stream per tick: 500 a second at 1,000 sites).
 */
import { EventEmitter } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { federationHandlers, type FederationServiceDeps } from '../../coordinator/server/federation-service.ts';
import { RevocationWatch } from '../../coordinator/server/revocation-watch.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { waitFor } from '../../cli/processes.ts';
import { AUTHENTICATED_SITE_KEY } from '../../shared/protocol/grpc.ts';

const work = mkdtempSync(join(tmpdir(), 'medfl-revocation-watch-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const silent = pino({ level: 'silent' });

/** A task stream as the handler sees it: the calls it makes and the status it ends with. */
function taskStream(site: string): EventEmitter & { metadata: grpc.Metadata; request: unknown; write: () => boolean; closedWith?: { code: number } } {
  const metadata = new grpc.Metadata();
  metadata.set(AUTHENTICATED_SITE_KEY, site);
  const call = Object.assign(new EventEmitter(), { metadata, request: {}, write: () => true, closedWith: undefined as { code: number } | undefined });
  call.on('error', (e: { code: number }) => (call.closedWith = e));
  return call;
}

describe('the revocation watch over open task streams', () => {
  it('closes the revoked site\'s stream with PERMISSION_DENIED, leaves the others open, and reads the store once per tick', async () => {
    const store = new CoordinatorStore(join(work, 'state.db'));
    const sites = Array.from({ length: 50 }, (_, i) => `site-${i}`);
    for (const [i, s] of sites.entries()) {
      store.inviteSite(s, `h${i}`, Date.now() + 60_000);
      store.enrolSite(s, `h${i}`, Buffer.alloc(32, i + 1));
    }
    const disconnected: string[] = [];
    const engine = { siteConnected: () => undefined, siteDisconnected: (s: string) => disconnected.push(s) } as unknown as FederationServiceDeps['engine'];
    const handlers = federationHandlers({ store, engine, models: {} as never, receiver: {} as never, log: silent, revocationCheckMs: 20 });
    const getSite = vi.spyOn(store, 'getSite');
    const lookups = vi.spyOn(store, 'enrolledSiteNames');
    const streams = sites.map((s) => {
      const call = taskStream(s);
      (handlers.SubscribeTasks as (c: unknown) => void)(call);
      return call;
    });

    store.revokeSite('site-7');
    await waitFor(() => streams[7]!.closedWith !== undefined, 5000, 'the revoked site\'s stream to close', 5);
    expect(streams[7]!.closedWith!.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(disconnected).toEqual(['site-7']);
    // A few more ticks: nothing else closes.
    const ticks = lookups.mock.calls.length;
    await waitFor(() => lookups.mock.calls.length >= ticks + 3, 5000, 'three more ticks', 5);
    expect(streams.filter((c) => c.closedWith !== undefined)).toHaveLength(1);
    // One query per tick for all 50 streams, none per stream.
    expect(getSite).not.toHaveBeenCalled();
    expect(lookups.mock.calls.length).toBeLessThan(50);

    for (const c of streams) c.emit('cancelled');
    store.close();
  });
});

describe('RevocationWatch', () => {
  it('keeps watching through a failed lookup, calls each callback once, and stops its timer when nothing is watched', async () => {
    vi.useFakeTimers();
    try {
      let enrolled = new Set(['a', 'b']);
      let fail = false;
      const warn = vi.fn();
      const watch = new RevocationWatch({
        enrolledSites: () => {
          if (fail) throw new Error('SQLITE_BUSY: database is locked');
          return enrolled;
        },
        everyMs: 100,
        log: { warn } as unknown as typeof silent,
      });
      const revokedA = vi.fn();
      const stopB = watch.watch('b', vi.fn());
      watch.watch('a', revokedA);
      fail = true;
      enrolled = new Set(['b']);
      await vi.advanceTimersByTimeAsync(100);
      expect(revokedA).not.toHaveBeenCalled();
      expect(warn).toHaveBeenCalledTimes(1);
      fail = false;
      await vi.advanceTimersByTimeAsync(300);
      expect(revokedA).toHaveBeenCalledTimes(1);
      expect(watch.size).toBe(1);
      stopB();
      expect(watch.size).toBe(0);
      expect(vi.getTimerCount()).toBe(0);
    } finally {
      vi.useRealTimers();
    }
  });
});
