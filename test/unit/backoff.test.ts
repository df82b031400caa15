import { describe, expect, it } from 'vitest';
import { backoffDelay } from '../../site-agent/agent.ts';

describe('reconnect backoff', () => {
  it('grows exponentially up to the cap, with jitter within [cap/2, cap]', () => {
    for (let attempt = 1; attempt < 12; attempt++) {
      const cap = Math.min(30_000, 500 * 2 ** attempt);
      const samples = Array.from({ length: 200 }, () => backoffDelay(attempt, 30_000));
      expect(Math.min(...samples)).toBeGreaterThanOrEqual(cap / 2);
      expect(Math.max(...samples)).toBeLessThanOrEqual(cap);
      // Jitter: sites that lost the coordinator together do not come back together.
      expect(new Set(samples).size).toBeGreaterThan(20);
    }
  });
});
