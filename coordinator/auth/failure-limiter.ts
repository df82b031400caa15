/**
 * Per-peer limit on failed authentication and enrolment calls, and the collapsing of their warn lines.
 *
 * Each peer (an IP address; the port is dropped) has a token bucket of `burst` failures that refills at
 * `refillPerMinute` (kept as the time the bucket is full again, GCRA-style, so the arithmetic is exact in ms).
 * A failure takes a token; a peer whose bucket is empty is refused with RESOURCE_EXHAUSTED before its token is
 * even parsed, until a token has come back. Successful calls take nothing, so an honest
 * site is never slowed; a site that keeps failing (a wrong clock, a stale key) is held to the refill rate.
 *
 * Logging: the first failure of a peer is logged in full; later ones within `summaryMs` are counted and come
 * out as one summary line per peer and window, so 2,000 bad calls make a handful of lines, not 2,000.
 */
import { isIP } from 'node:net';
import type { Logger } from '../../shared/util/log.ts';

export interface FailureLimitOptions {
  /** Failures a peer may make back to back before it is refused (default 50). */
  burst: number;
  /** Failures forgiven per minute once the burst is used up (default 30, one every 2 s). */
  refillPerMinute: number;
  /** Window for collapsing repeated warn lines of one peer into a summary (default 60 s). */
  summaryMs: number;
  /** Peers remembered at most; the longest-quiet is forgotten first (bounds memory under address churn). */
  maxPeers: number;
}

export const DEFAULT_FAILURE_LIMITS: FailureLimitOptions = { burst: 50, refillPerMinute: 30, summaryMs: 60_000, maxPeers: 10_000 };

/** What a failed call was, for the log. */
export interface FailureInfo {
  method: string;
  code: string;
  reason: string;
  /** Extra fields for the first (full) line, e.g. the site an enrolment named. */
  [k: string]: unknown;
}

interface PeerState {
  /** When the bucket is full again: each failure pushes it one refill interval later (never before now). */
  fullAt: number;
  /** Start of the current log window; undefined: the next failure is logged in full. */
  windowStart: number | undefined;
  /** Failures not logged in full in this window. */
  collapsed: number;
  /** Calls refused unread (bucket empty) in this window. */
  refused: number;
  lastReason: string;
  lastMethod: string;
  /** The "refusing this address" line was written in this window. */
  blockNoted: boolean;
}

/**
 * The address part of a grpc-js peer string (`1.2.3.4:5678`, `::1:5678`, `::ffff:1.2.3.4:5678`), or the string
 * itself when it holds no address; IPv4-mapped IPv6 reads as IPv4, so one client is one peer either way.
 */
export function peerAddress(peer: string): string {
  const m = /^\[?(.*?)\]?:(\d+)$/.exec(peer);
  let host = m && isIP(m[1]!) ? m[1]! : peer;
  if (host.startsWith('::ffff:') && isIP(host.slice(7)) === 4) host = host.slice(7);
  return host;
}

export class FailureLimiter {
  private readonly peers = new Map<string, PeerState>();
  private readonly o: FailureLimitOptions;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly log: Logger,
    options: Partial<FailureLimitOptions> = {},
    private readonly now: () => number = Date.now,
  ) {
    // An option left undefined (a CLI flag not given) keeps its default.
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
    this.o = { ...DEFAULT_FAILURE_LIMITS, ...given };
    for (const [k, v] of Object.entries(this.o)) {
      if (!(Number.isFinite(v) && v > 0)) throw new RangeError(`failure limit ${k} must be a positive number, got ${v}`);
    }
  }

  /**
   * Undefined when `peer` may call; otherwise the message to refuse it with (RESOURCE_EXHAUSTED). A refusal
   * is counted for the summary line but takes no token, so a peer that keeps hammering gets back in at the
   * refill rate and no faster.
   */
  refusal(peer: string, method: string): string | undefined {
    const key = peerAddress(peer);
    const s = this.peers.get(key);
    if (!s) return undefined;
    const waitMs = this.waitMs(s);
    if (waitMs <= 0) return undefined;
    s.refused++;
    s.lastMethod = method;
    this.schedule();
    const wait = Math.ceil(waitMs / 1000);
    return `too many failed authentication or enrolment calls from ${key}; calls from this address are refused for about ${wait} s — check the site's clock, key and token before retrying`;
  }

  /** Records one failed call of `peer` and logs it (in full as `message`, or counted into the peer's next summary line). */
  failure(peer: string, info: FailureInfo, message = 'site call rejected'): void {
    const key = peerAddress(peer);
    const t = this.now();
    let s = this.peers.get(key);
    if (s) {
      this.peers.delete(key); // re-insert: the map stays ordered by last activity, oldest first
    } else {
      s = { fullAt: t, windowStart: undefined, collapsed: 0, refused: 0, lastReason: '', lastMethod: '', blockNoted: false };
      this.evict();
    }
    this.peers.set(key, s);
    s.fullAt = Math.max(s.fullAt, t) + this.intervalMs;
    s.lastReason = info.reason;
    s.lastMethod = info.method;
    if (s.windowStart === undefined || t - s.windowStart >= this.o.summaryMs) {
      this.flushPeer(key, s);
      s.windowStart = t;
      this.log.warn({ ...info, peer }, message);
    } else {
      s.collapsed++;
    }
    if (this.waitMs(s) > 0 && !s.blockNoted) {
      s.blockNoted = true;
      this.log.warn({ peer: key, burst: this.o.burst, refillPerMinute: this.o.refillPerMinute }, 'too many failed calls from this address: refusing its calls until the limit refills');
    }
    this.schedule();
  }

  /** Writes pending summary lines now (also called on a timer); forgets peers that are quiet and refilled. */
  flush(): void {
    const t = this.now();
    for (const [key, s] of this.peers) {
      if (s.windowStart !== undefined && t - s.windowStart >= this.o.summaryMs) {
        this.flushPeer(key, s);
        s.windowStart = undefined;
      }
      if (s.windowStart === undefined && s.fullAt <= t) this.peers.delete(key);
    }
    if (this.peers.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  /** Writes what is pending and stops the timer (coordinator shutdown). */
  close(): void {
    for (const [key, s] of this.peers) this.flushPeer(key, s);
    this.peers.clear();
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Peers currently remembered (for tests and metrics). */
  get size(): number {
    return this.peers.size;
  }

  private flushPeer(key: string, s: PeerState): void {
    s.blockNoted = false;
    if (s.collapsed === 0 && s.refused === 0) return;
    this.log.warn(
      { peer: key, failures: s.collapsed, refusedUnread: s.refused, lastMethod: s.lastMethod, lastReason: s.lastReason, windowSeconds: this.o.summaryMs / 1000 },
      'more failed calls from this address (collapsed into one line)',
    );
    s.collapsed = 0;
    s.refused = 0;
  }

  /** One token's worth of time. */
  private get intervalMs(): number {
    return 60_000 / this.o.refillPerMinute;
  }

  /** How long until the peer has a token again (≤ 0: it has one now). */
  private waitMs(s: PeerState): number {
    return s.fullAt - this.now() - (this.o.burst - 1) * this.intervalMs;
  }

  private evict(): void {
    while (this.peers.size >= this.o.maxPeers) {
      const oldest = this.peers.keys().next().value as string;
      this.flushPeer(oldest, this.peers.get(oldest)!);
      this.peers.delete(oldest);
    }
  }

  private schedule(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.flush(), Math.max(1000, this.o.summaryMs / 4));
    this.timer.unref();
  }
}
