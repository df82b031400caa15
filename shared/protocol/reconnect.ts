/**
 * How long a site agent waits, at most, between tries to reach the coordinator (its reconnect backoff cap).
 * Shared because the coordinator's grace for a round resumed after a restart must outlast it.
 */
export const SITE_MAX_RECONNECT_BACKOFF_MS = 30_000;
