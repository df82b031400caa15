/**
 * Retry pacing shared by every site-side retry loop (reconnects, uploads): exponential backoff with "equal jitter"
 * (half fixed, half random), so a thousand sites refused at once never come back in lockstep, yet each always waits
 * a little.
 */
export function backoffDelay(attempt: number, maxMs: number, baseMs = 500): number {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.round(cap / 2 + (Math.random() * cap) / 2);
}
