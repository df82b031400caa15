/**
 * How often sites heartbeat. Every heartbeat is a call the coordinator authenticates and records, so its rate grows
 * with the federation: at a fixed 5 s, 1,000 sites made 200 calls a second, four in five of all the calls in a round.
 * The coordinator therefore names the interval in each heartbeat answer, from the number of enrolled sites, so that
 * the beats stay near HEARTBEATS_PER_SECOND however many sites there are; a site follows it within bounds it sets
 * itself. Both sides and `medfl status` (which calls a site offline after missed beats) use the functions here.
 */

/** The interval of a small federation, and a site's own when its coordinator names none (an older coordinator). */
export const BASE_HEARTBEAT_MS = 5_000;
/** The heartbeat rate a coordinator plans for: up to 200 enrolled sites beat every 5 s, beyond that less often. */
export const HEARTBEATS_PER_SECOND = 40;
/** The longest interval a coordinator names: a site that went away is still noticed within minutes. */
export const MAX_HEARTBEAT_MS = 60_000;
/** A site that missed this many beats is shown offline. */
export const MISSED_BEATS_OFFLINE = 3;
/**
 * What a site accepts from a coordinator's answer: a compromised coordinator can make it beat no more than once a
 * second and no less than once in two minutes.
 */
export const SITE_HEARTBEAT_BOUNDS_MS = { min: 1_000, max: 120_000 } as const;

/** The interval a coordinator names to its sites when `enrolledSites` are enrolled (whole seconds). */
export function heartbeatIntervalMs(enrolledSites: number): number {
  const spread = Math.ceil(Math.max(0, enrolledSites) / HEARTBEATS_PER_SECOND) * 1000;
  return Math.min(MAX_HEARTBEAT_MS, Math.max(BASE_HEARTBEAT_MS, spread));
}

/** How long after its last beat a site of a federation of `enrolledSites` is shown offline. */
export function offlineAfterMs(enrolledSites: number): number {
  return MISSED_BEATS_OFFLINE * heartbeatIntervalMs(enrolledSites);
}

/**
 * A site's wait before its next heartbeat: the coordinator's named interval (0 or absent: an older coordinator, so
 * `fallbackMs`) within SITE_HEARTBEAT_BOUNDS_MS, spread by ±10 % so that sites which reconnected together after a
 * coordinator restart do not keep beating together. `random` is Math.random unless a caller fixes it.
 */
export function nextHeartbeatDelayMs(namedMs: number | undefined, fallbackMs = BASE_HEARTBEAT_MS, random: () => number = Math.random): number {
  const base = namedMs !== undefined && Number.isFinite(namedMs) && namedMs > 0 ? namedMs : fallbackMs;
  const bounded = Math.min(SITE_HEARTBEAT_BOUNDS_MS.max, Math.max(SITE_HEARTBEAT_BOUNDS_MS.min, base));
  return Math.round(bounded * (0.9 + 0.2 * random()));
}
