/**
 * What /readyz checks: that the coordinator can still do its job, not only that the process runs (/healthz).
 * The store takes a real write (disk full, read-only file system and a locked database all show up there), NATS is
 * connected when the coordinator was started with it, and the coordinator directory's file system keeps a margin
 * of free space for the next updates and model versions.
 */
import { accessSync, constants, statfsSync } from 'node:fs';
import type { CoordinatorStore } from '../store/store.ts';
import type { EventBus } from '../../shared/events/bus.ts';
import { NatsBus } from '../events/nats-bus.ts';

export interface ReadinessCheck {
  name: 'store' | 'nats' | 'disk';
  ok: boolean;
  detail: string;
}

export interface ReadinessDeps {
  store: Pick<CoordinatorStore, 'setMeta'>;
  bus: EventBus;
  /** The coordinator directory: models, updates and state.db live on its file system. */
  dir: string;
  minFreeBytes: number;
}

/** Meta key the store check overwrites; nothing reads it. */
export const READINESS_PROBE_KEY = 'readiness_probe';

export function readinessChecks(d: ReadinessDeps): ReadinessCheck[] {
  const checks: ReadinessCheck[] = [storeCheck(d), diskCheck(d)];
  if (d.bus instanceof NatsBus) {
    const h = d.bus.health();
    checks.push({ name: 'nats', ok: h.connected, detail: h.connected ? `connected to ${d.bus.describe()}` : `not connected to ${d.bus.describe()} (${h.closed ? 'closed' : 'reconnecting'}); events and ledger entries wait in the outbox` });
  }
  return checks;
}

function storeCheck(d: ReadinessDeps): ReadinessCheck {
  try {
    accessSync(d.dir, constants.W_OK);
    d.store.setMeta(READINESS_PROBE_KEY, new Date().toISOString());
    return { name: 'store', ok: true, detail: 'state database accepted a write' };
  } catch (e) {
    return { name: 'store', ok: false, detail: `cannot write the coordinator state: ${(e as Error).message}` };
  }
}

function diskCheck(d: ReadinessDeps): ReadinessCheck {
  try {
    const s = statfsSync(d.dir);
    const free = Number(s.bavail) * Number(s.bsize);
    const mib = (n: number) => `${Math.floor(n / 1024 / 1024)} MiB`;
    return free >= d.minFreeBytes
      ? { name: 'disk', ok: true, detail: `${mib(free)} free (threshold ${mib(d.minFreeBytes)})` }
      : { name: 'disk', ok: false, detail: `only ${mib(free)} free on the coordinator directory's file system, below the ${mib(d.minFreeBytes)} threshold` };
  } catch (e) {
    return { name: 'disk', ok: false, detail: `cannot read free space: ${(e as Error).message}` };
  }
}
