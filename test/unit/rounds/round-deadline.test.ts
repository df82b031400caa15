/** When an upload round ends early (everyone reported, or reported or declined with a quorum) and what its deadline does. */
import { describe, expect, it } from 'vitest';
import type { RoundAggregator } from '../../../coordinator/aggregation/strategy.ts';
import type { OpenRound } from '../../../coordinator/rounds/open-round.ts';
import { deadlineVerdict, earlyCloseReason } from '../../../coordinator/rounds/round-deadline.ts';

function round(selected: string[], reported: string[], declined: string[] = []): OpenRound {
  return {
    row: { round: 3, state: 'open', baseModelHash: 'b'.repeat(64), selected, openedAt: 0, deadlineAt: 1, closedAt: null, resultModelHash: null, note: null },
    aggregator: {} as RoundAggregator,
    reported: new Set(reported),
    declined: declined.length > 0 ? new Set(declined) : undefined,
    closing: false,
    stage: { kind: 'fine-tuning', index: 3 },
  };
}

describe('earlyCloseReason', () => {
  it('closes once every selected site reported, whatever the quorum', () => {
    expect(earlyCloseReason(round(['a', 'b'], ['a', 'b']), 5)).toBe('all selected sites reported');
  });

  it('closes when the rest declined and the quorum reported, and waits while it did not', () => {
    expect(earlyCloseReason(round(['a', 'b', 'c'], ['a', 'b'], ['c']), 2)).toBe('every selected site reported or declined');
    expect(earlyCloseReason(round(['a', 'b', 'c'], ['a'], ['b', 'c']), 2)).toBeUndefined();
  });

  it('waits while a selected site has neither reported nor declined', () => {
    expect(earlyCloseReason(round(['a', 'b', 'c'], ['a', 'b']), 1)).toBeUndefined();
  });
});

describe('deadlineVerdict', () => {
  it('closes on a quorum, saying how many of the selected sites reported', () => {
    expect(deadlineVerdict(round(['a', 'b', 'c'], ['a', 'b']), 2)).toEqual({ close: 'deadline reached with quorum (2 of 3 sites)' });
  });

  it('fails without a quorum, saying how far the round got', () => {
    expect(deadlineVerdict(round(['a', 'b', 'c'], ['a']), 2)).toEqual({ fail: 'deadline reached without quorum: 1 of 3 selected sites reported, 2 needed' });
  });
});
