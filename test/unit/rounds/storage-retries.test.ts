/** Work put off by a storage failure runs again later, once per kind of work, until it goes through; stop() ends it. */
import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { StorageRetries } from '../../../coordinator/rounds/storage-retries.ts';

const log = pino({ level: 'silent' });

describe('StorageRetries', () => {
  afterEach(() => vi.useRealTimers());

  it('retries until the work goes through, then reports no fault; a second failure of pending work adds no retry', async () => {
    vi.useFakeTimers();
    const retries = new StorageRetries(log, 1000);
    let calls = 0;
    const work = () => {
      calls++;
      if (calls < 2) throw new Error('SQLITE_FULL: database or disk is full');
    };
    retries.later('close-1', 'closing round 1', new Error('SQLITE_FULL: database or disk is full'), work);
    retries.later('close-1', 'closing round 1', new Error('again'), work);
    expect(retries.fault?.what).toBe('closing round 1');
    await vi.advanceTimersByTimeAsync(1000);
    expect(calls).toBe(1);
    expect(retries.fault).toBeDefined();
    await vi.advanceTimersByTimeAsync(1000);
    expect(calls).toBe(2);
    expect(retries.fault).toBeUndefined();
    await vi.advanceTimersByTimeAsync(5000);
    expect(calls).toBe(2);
  });

  it('runs nothing after stop()', async () => {
    vi.useFakeTimers();
    const retries = new StorageRetries(log, 1000);
    const work = vi.fn();
    retries.later('open', 'opening the next round', new Error('disk full'), work);
    retries.stop();
    retries.later('tasks', 'sending tasks', new Error('disk full'), work);
    await vi.advanceTimersByTimeAsync(5000);
    expect(work).not.toHaveBeenCalled();
  });
});
