/**
 * Issue 15: what counts as a storage fault (retryable, reported as UNAVAILABLE) — checked on errors produced for
 * real: ENOSPC from writing to /dev/full, SQLITE_FULL from a database capped with max_page_count — and what
 * `medfl status` says about the coordinator's disk.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import { statusJson, statusReport, storageCondition, storageLines, LOW_STORAGE_BYTES } from '../../cli/status.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { sqliteFullError } from '../support/fillable-store.ts';

const caught = (f: () => void): unknown => {
  try {
    f();
  } catch (e) {
    return e;
  }
  throw new Error('expected a failure');
};

describe('storage faults', () => {
  it('are recognised by code, by message when the code was lost, and through a cause', () => {
    const enospc = caught(() => writeFileSync('/dev/full', 'x'));
    expect((enospc as NodeJS.ErrnoException).code).toBe('ENOSPC');
    expect(isStorageFault(enospc)).toBe(true);
    const full = sqliteFullError();
    expect(isStorageFault(full)).toBe(true);
    expect(describeStorageFault(full)).toBe('SQLITE_FULL: database or disk is full');
    // The file-writer thread passes on only the message.
    expect(isStorageFault(new Error((enospc as Error).message))).toBe(true);
    expect(isStorageFault(new Error('upload failed', { cause: full }))).toBe(true);
  });

  it('are not the caller\'s faults or ordinary bugs', () => {
    expect(isStorageFault(caught(() => writeFileSync(join(tmpdir(), 'no-such-dir-medfl', 'x'), 'x')))).toBe(false); // ENOENT
    expect(isStorageFault(new Error('update does not match the plan'))).toBe(false);
    expect(isStorageFault(caught(() => JSON.parse('{')))).toBe(false);
    expect(isStorageFault(undefined)).toBe(false);
  });
});

describe('medfl status and the coordinator disk', () => {
  it('reads free space from the filesystem and flags it low under the threshold', () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-status-'));
    const c = storageCondition(dir)!;
    expect(c.totalBytes).toBeGreaterThan(0);
    expect(c.freeBytes).toBeGreaterThanOrEqual(0);
    expect(c.freeBytes).toBeLessThanOrEqual(c.totalBytes);
    expect(storageCondition(join(dir, 'missing'))).toBeUndefined();
    const low = { freeBytes: LOW_STORAGE_BYTES / 4, totalBytes: 100 * LOW_STORAGE_BYTES, low: true };
    expect(storageLines(low)[0]).toMatch(/^storage: 0\.25 GiB free of 100\.0 GiB \(0%\) .* LOW: .*carries on once space is freed/);
    expect(storageLines({ freeBytes: 50 * LOW_STORAGE_BYTES, totalBytes: 100 * LOW_STORAGE_BYTES, low: false })[0]).not.toMatch(/LOW/);
    const store = new CoordinatorStore(join(dir, 'state.db'));
    expect(statusReport(store, 'fed-1', low)).toMatch(/storage: 0\.25 GiB free .* LOW/);
    expect(statusJson(store, 'fed-1', Date.now(), low)).toMatchObject({ storage: low });
    expect(statusReport(store, 'fed-1')).not.toMatch(/storage:/);
    store.close();
  });
});
