/** A round opens once minSites enrolled sites are connected, after the gather wait for the missing ones. */
import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { OpeningQuorum } from '../../../coordinator/rounds/opening-quorum.ts';
import { parsePlan } from '../../../shared/plan/load.ts';

const planWith = (lines: string[]) => parsePlan(['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 2', ...lines, ''].join('\n'), 'plan.yaml');

describe('OpeningQuorum', () => {
  afterEach(() => vi.useRealTimers());

  it('waits for minSites, asking again after waitForSitesSeconds, then gathers the missing sites for gatherSeconds', () => {
    vi.useFakeTimers();
    const retry = vi.fn();
    const quorum = new OpeningQuorum({ plan: planWith(['minSites: 2', 'gatherSeconds: 5', 'waitForSitesSeconds: 30']), log: pino({ level: 'silent' }), connectedCount: () => 1, retry });
    expect(quorum.ready(['a'], () => ['b', 'c'])).toBe(false);
    vi.advanceTimersByTime(30_000);
    expect(retry).toHaveBeenCalledTimes(1);
    // Quorum: a short gather for site c first, then the round may open without it.
    expect(quorum.ready(['a', 'b'], () => ['c'])).toBe(false);
    vi.advanceTimersByTime(4_000);
    expect(quorum.ready(['a', 'b'], () => ['c'])).toBe(false);
    vi.advanceTimersByTime(1_000);
    expect(retry).toHaveBeenCalledTimes(2);
    expect(quorum.ready(['a', 'b'], () => ['c'])).toBe(true);
    quorum.stop();
  });

  it('opens at once when every enrolled site is connected', () => {
    const quorum = new OpeningQuorum({ plan: planWith(['minSites: 2', 'gatherSeconds: 5']), log: pino({ level: 'silent' }), connectedCount: () => 2, retry: () => undefined });
    expect(quorum.ready(['a', 'b'], () => [])).toBe(true);
  });

  it('selects sitesPerRound of the eligible sites, sorted, or all of them', () => {
    const some = new OpeningQuorum({ plan: planWith(['minSites: 1', 'sitesPerRound: 2']), log: pino({ level: 'silent' }), connectedCount: () => 4, retry: () => undefined });
    const picked = some.select(['d', 'c', 'b', 'a']);
    expect(picked).toHaveLength(2);
    expect(picked).toEqual([...picked].sort());
    const all = new OpeningQuorum({ plan: planWith(['minSites: 1']), log: pino({ level: 'silent' }), connectedCount: () => 3, retry: () => undefined });
    expect(all.select(['a', 'b', 'c'])).toEqual(['a', 'b', 'c']);
  });
});
