/**
 * How far V8 lets the old generation grow past what survived the last full collection before it starts the next
 * one, for a process that streams large amounts of Buffer memory through a small heap: the coordinator, whose
 * transfers move gigabytes a round through a heap of a few tens of MB.
 *
 * Why: V8 counts Buffer memory allocated since the last full collection against that limit, and for a small heap it
 * marks quickly it picks a limit of about 1.7× the survivors. Every 10–20 MB moved then started a full collection:
 * 65–85 of them over two 1,000-site rounds of `bench:sites` (1 MB model), 21–43 with this setting. Full
 * collections are still started by V8's separate trigger for Buffer memory (every 64 MB that outlives young
 * collections) and near the heap's size limit, so the garbage this lets accumulate stays bounded.
 */
import { setFlagsFromString } from 'node:v8';

/** The old generation may grow to (1 + this / 100) times what survived the last full collection: 4×, V8's own ceiling. */
export const STREAMING_HEAP_GROWING_PERCENT = 300;

/** The V8 flag that sets it; public so a test can check that this Node's V8 still knows it. */
export const STREAMING_HEAP_FLAG = `--heap-growing-percent=${STREAMING_HEAP_GROWING_PERCENT}`;

/**
 * Applies the setting to this process. V8 reads it each time it recomputes its limits (after every full collection),
 * so calling this at start, before the transfers begin, is enough; a V8 that no longer knows the flag prints an
 * "unrecognized flag" line and carries on with its own limits.
 */
export function growHeapForStreaming(): void {
  setFlagsFromString(STREAMING_HEAP_FLAG);
}
