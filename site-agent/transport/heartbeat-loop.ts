/**
 * A site's heartbeats: one now, then the next after the interval the coordinator named in the last answer
 * (shared/protocol/heartbeat.ts bounds it and spreads it by ±10 %), or after the site's own interval where the
 * coordinator named none (an older one) or the beat failed. One beat at a time: a slow answer delays the next.
 */
import { BASE_HEARTBEAT_MS, nextHeartbeatDelayMs } from '../../shared/protocol/heartbeat.ts';

export interface HeartbeatLoopOptions {
  /** Sends one heartbeat; resolves with the interval the coordinator named (0 or undefined: none), rejects on failure. */
  beat: () => Promise<number | undefined>;
  /** Told of a failed beat (the loop goes on). */
  onError?: (e: unknown) => void;
  /** The site's own interval (default BASE_HEARTBEAT_MS). */
  fallbackMs?: number;
  /** Math.random unless fixed. */
  random?: () => number;
}

/** Starts beating at once; the returned function stops the loop (a beat in flight is not waited for). */
export function startHeartbeatLoop(o: HeartbeatLoopOptions): () => void {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const fallbackMs = o.fallbackMs ?? BASE_HEARTBEAT_MS;
  const once = async () => {
    let namedMs: number | undefined;
    try {
      namedMs = await o.beat();
    } catch (e) {
      o.onError?.(e);
    }
    if (!stopped) timer = setTimeout(() => void once(), nextHeartbeatDelayMs(namedMs, fallbackMs, o.random));
  };
  void once();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
