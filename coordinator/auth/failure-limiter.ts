/**
 * Limit on failed authentication and enrolment calls, and the collapsing of their warn lines.
 *
 * Keys. Hospitals often reach the coordinator through one NAT address, so a limit per address alone would let
 * one site with a wrong clock (or an attacker on the same network) lock every other site there out. Failures are
 * therefore counted per *caller*: the pair (address, site name the call claims — the token's unverified `iss`, or
 * the name an enrolment gives), with a looser per-address bucket above it that bounds an attacker cycling through
 * invented names. Both are token buckets kept as the time they are full again (GCRA-style, exact in ms).
 *
 * What a full bucket does, checked before any signature work:
 * - a caller whose own bucket is empty is refused with RESOURCE_EXHAUSTED until a token has come back;
 * - when the address bucket is empty, callers at that address that have failed before are refused too; a caller
 *   that has never failed (a site enrolled yesterday) is still heard;
 * - a caller that authenticated successfully within `trustMs` is never refused before verification: its token is
 *   checked as usual, so others' failures — even an impostor using its very name from the same NAT — cannot keep
 *   a real site out. Failures under such a name still count, and once over the limit they are answered
 *   RESOURCE_EXHAUSTED after the check instead of with their reason.
 * - a caller that cannot be named before verification (`claimant` undefined) is never refused before it; its
 *   failures count against the address.
 * - enrolment is one bucket per address at the per-caller rate: nobody is authenticated yet, an honest site enrols
 *   once, and guessing one-time tokens under ever new names must not multiply the tries.
 * Successful calls take no token, so an honest site is never slowed.
 *
 * Logging is per address: the first failure in a window is logged in full; later ones within `summaryMs` are
 * counted and come out as one summary line per address and window (with how many site names were claimed), so
 * 2,000 bad calls — under one name or 2,000 — make a handful of lines, not 2,000.
 */
import { isIP } from 'node:net';
import { METHODS } from '../../shared/protocol/grpc.ts';
import type { Logger } from '../../shared/util/log.ts';

export interface FailureLimitOptions {
  /** Failures one caller (address + claimed site name) may make back to back before it is refused (default 50). */
  burst: number;
  /** Failures forgiven per minute and caller once the burst is used up (default 30, one every 2 s). */
  refillPerMinute: number;
  /** Failures one address may make back to back, over all names claimed from it (default 10 × burst). */
  addressBurst: number;
  /** Failures forgiven per minute and address (default 10 × refillPerMinute). */
  addressRefillPerMinute: number;
  /** How long a caller that authenticated is exempt from refusal before verification (default 15 min). */
  trustMs: number;
  /** Window for collapsing repeated warn lines of one address into a summary (default 60 s). */
  summaryMs: number;
  /** Callers (and addresses) remembered at most; the longest-quiet is forgotten first (bounds memory under churn). */
  maxPeers: number;
}

export const DEFAULT_FAILURE_LIMITS: Omit<FailureLimitOptions, 'addressBurst' | 'addressRefillPerMinute'> = {
  burst: 50,
  refillPerMinute: 30,
  trustMs: 15 * 60_000,
  summaryMs: 60_000,
  maxPeers: 10_000,
};

/** Per-address bucket relative to the per-caller one when not set. */
const ADDRESS_FACTOR = 10;
/** Longest claimed name kept (the rest is cut): a claim is attacker-chosen text. */
const MAX_CLAIMANT_CHARS = 64;
/** Distinct names counted per address and window, at most (the count says "at least" beyond). */
const MAX_NAMES_COUNTED = 1000;

/** What a failed call was, for the log. */
export interface FailureInfo {
  method: string;
  code: string;
  reason: string;
  /** The site name the call claimed (unverified); keys the caller's own bucket. */
  claimant?: string;
  /** Enrolment's name for the claimed site (used as the claimant when `claimant` is absent). */
  site?: string;
  /** Extra fields for the first (full) line. */
  [k: string]: unknown;
}

interface Bucket {
  /** When the bucket is full again: each failure pushes it one refill interval later (never before now). */
  fullAt: number;
}

interface CallerState extends Bucket {
  /** The caller failed at least once while remembered (only such callers are held back by the address bucket). */
  failed: boolean;
  /** Until when a successful authentication exempts the caller from refusal before verification. */
  trustedUntil: number;
}

interface AddressState extends Bucket {
  /** Start of the current log window; undefined: the next failure is logged in full. */
  windowStart: number | undefined;
  /** Failures not logged in full in this window. */
  collapsed: number;
  /** Calls refused (a bucket empty) in this window. */
  refused: number;
  /** Names claimed by failing or refused calls in this window (bounded). */
  names: Set<string>;
  lastReason: string;
  lastMethod: string;
  lastClaimant: string | undefined;
  /** The "refusing" line was written in this window. */
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

const callerKey = (address: string, claimant: string): string => `${address}\u0000${claimant}`;
/** Enrolment's bucket (no valid name can be told from a guess before the one-time token matches, so no trust). */
const ENROLMENT = '\u0001enrolment';

/**
 * The caller bucket a call counts in: its claimed name; for enrolment one bucket per address at the per-caller rate
 * (an honest site enrols once, and guessing tokens under ever new names must not multiply the tries); none when
 * the transport cannot name the claim before verifying.
 */
function bucketOf(method: string, claim: string | undefined): string | undefined {
  if (method === METHODS.enroll) return ENROLMENT;
  return claim;
}
const claimOf = (s: string | undefined): string | undefined => (s === undefined ? undefined : s.slice(0, MAX_CLAIMANT_CHARS));

export class FailureLimiter {
  private readonly callers = new Map<string, CallerState>();
  private readonly addresses = new Map<string, AddressState>();
  private readonly o: FailureLimitOptions;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly log: Logger,
    options: Partial<FailureLimitOptions> = {},
    private readonly now: () => number = Date.now,
  ) {
    // An option left undefined (a CLI flag not given) keeps its default.
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as Partial<FailureLimitOptions>;
    const base = { ...DEFAULT_FAILURE_LIMITS, ...given };
    this.o = {
      ...base,
      addressBurst: given.addressBurst ?? base.burst * ADDRESS_FACTOR,
      addressRefillPerMinute: given.addressRefillPerMinute ?? base.refillPerMinute * ADDRESS_FACTOR,
    };
    for (const [k, v] of Object.entries(this.o)) {
      if (!(Number.isFinite(v) && v > 0)) throw new RangeError(`failure limit ${k} must be a positive number, got ${v}`);
    }
    if (this.o.addressBurst < this.o.burst) throw new RangeError(`failure limit addressBurst (${this.o.addressBurst}) must be at least burst (${this.o.burst})`);
  }

  /**
   * Undefined when the call may go on to be verified; otherwise the message to refuse it with
   * (RESOURCE_EXHAUSTED). `claimant`: the site name the call claims, unverified ('' when it names none);
   * undefined when the transport cannot tell before verifying. A refusal is counted for the summary line but
   * takes no token, so a caller that keeps hammering gets back in at the refill rate and no faster.
   */
  refusal(peer: string, method: string, claimant?: string): string | undefined {
    const address = peerAddress(peer);
    const claim = claimOf(claimant);
    const key = bucketOf(method, claim);
    const message = key === undefined ? undefined : this.callerLimit(address, key, false);
    if (message !== undefined) this.countRefused(address, method, claim);
    return message;
  }

  /**
   * Records one failed call and logs it (in full as `message`, or counted into the address's next summary line).
   * Returns the refusal message instead, counting the call as refused and taking no token, when the caller was
   * already over its limit (a trusted name that failed past the limit: the answer is RESOURCE_EXHAUSTED, not the
   * reason). Transports that ignore the return value answer with the reason, as before.
   */
  failure(peer: string, info: FailureInfo, message = 'site call rejected'): string | undefined {
    const address = peerAddress(peer);
    const claim = claimOf(info.claimant ?? info.site);
    const key = bucketOf(info.method, claim);
    const over = key === undefined ? this.addressLimit(address) : this.callerLimit(address, key, true);
    if (over !== undefined) {
      this.countRefused(address, info.method, claim, info.reason);
      return over;
    }
    const t = this.now();
    const a = this.addressState(address, t);
    a.fullAt = Math.max(a.fullAt, t) + this.interval(this.o.addressRefillPerMinute);
    if (key !== undefined) {
      const c = this.callerState(address, key, t);
      c.fullAt = Math.max(c.fullAt, t) + this.interval(this.o.refillPerMinute);
      c.failed = true;
    }
    a.lastReason = info.reason;
    a.lastMethod = info.method;
    a.lastClaimant = claim;
    if (claim !== undefined && a.names.size < MAX_NAMES_COUNTED) a.names.add(claim);
    if (a.windowStart === undefined || t - a.windowStart >= this.o.summaryMs) {
      this.flushAddress(address, a);
      a.windowStart = t;
      if (claim !== undefined) a.names.add(claim);
      this.log.warn({ ...info, peer }, message);
    } else {
      a.collapsed++;
    }
    const limited = (key === undefined ? undefined : this.callerLimit(address, key, true)) ?? this.addressLimit(address);
    if (limited !== undefined && !a.blockNoted) {
      a.blockNoted = true;
      this.log.warn(
        { peer: address, claimant: claim, burst: this.o.burst, refillPerMinute: this.o.refillPerMinute, addressBurst: this.o.addressBurst, addressRefillPerMinute: this.o.addressRefillPerMinute },
        'too many failed calls from this address: refusing its failing callers until the limit refills',
      );
    }
    this.schedule();
    return undefined;
  }

  /** A call that authenticated as `site` from `peer`: that caller is not refused before verification for `trustMs`. */
  success(peer: string, site: string): void {
    const address = peerAddress(peer);
    const t = this.now();
    const c = this.callerState(address, claimOf(site)!, t);
    c.trustedUntil = t + this.o.trustMs;
    this.schedule();
  }

  /** Writes pending summary lines now (also called on a timer); forgets callers and addresses that are quiet and refilled. */
  flush(): void {
    const t = this.now();
    for (const [key, a] of this.addresses) {
      if (a.windowStart !== undefined && t - a.windowStart >= this.o.summaryMs) {
        this.flushAddress(key, a);
        a.windowStart = undefined;
      }
      if (a.windowStart === undefined && a.fullAt <= t) this.addresses.delete(key);
    }
    for (const [key, c] of this.callers) if (c.fullAt <= t && c.trustedUntil <= t) this.callers.delete(key);
    if (this.addresses.size === 0 && this.callers.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  /** Writes what is pending and stops the timer (coordinator shutdown). */
  close(): void {
    for (const [key, a] of this.addresses) this.flushAddress(key, a);
    this.addresses.clear();
    this.callers.clear();
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Addresses currently remembered (for tests and metrics). */
  get size(): number {
    return this.addresses.size;
  }

  /** Callers (address + claimed name) currently remembered. */
  get callerCount(): number {
    return this.callers.size;
  }

  /**
   * The refusal message when (address, claim) may not be heard; `afterCheck`: the call was verified (and failed),
   * so trust no longer exempts it.
   */
  private callerLimit(address: string, claim: string, afterCheck: boolean): string | undefined {
    const c = this.callers.get(callerKey(address, claim));
    if (c && !afterCheck && c.trustedUntil > this.now()) return undefined;
    const own = c ? this.waitMs(c, this.o.burst, this.o.refillPerMinute) : 0;
    if (own > 0) return refusedFor(claim === ENROLMENT ? address : `${address} naming this site`, own);
    if (!c?.failed) return undefined;
    return this.addressLimit(address);
  }

  private addressLimit(address: string): string | undefined {
    const a = this.addresses.get(address);
    const wait = a ? this.waitMs(a, this.o.addressBurst, this.o.addressRefillPerMinute) : 0;
    return wait > 0 ? refusedFor(address, wait) : undefined;
  }

  /** `reason`: why the call failed, when it was checked (a refusal before the check has none to add). */
  private countRefused(address: string, method: string, claim: string | undefined, reason?: string): void {
    const a = this.addressState(address, this.now());
    a.refused++;
    a.lastMethod = method;
    if (reason !== undefined) a.lastReason = reason;
    a.lastClaimant = claim;
    if (claim !== undefined && a.names.size < MAX_NAMES_COUNTED) a.names.add(claim);
    if (a.windowStart === undefined) a.windowStart = this.now();
    this.schedule();
  }

  private addressState(address: string, t: number): AddressState {
    let a = this.addresses.get(address);
    if (a) {
      this.addresses.delete(address); // re-insert: the map stays ordered by last activity, oldest first
    } else {
      a = { fullAt: t, windowStart: undefined, collapsed: 0, refused: 0, names: new Set(), lastReason: '', lastMethod: '', lastClaimant: undefined, blockNoted: false };
      while (this.addresses.size >= this.o.maxPeers) {
        const oldest = this.addresses.keys().next().value as string;
        this.flushAddress(oldest, this.addresses.get(oldest)!);
        this.addresses.delete(oldest);
      }
    }
    this.addresses.set(address, a);
    return a;
  }

  private callerState(address: string, claim: string, t: number): CallerState {
    const key = callerKey(address, claim);
    let c = this.callers.get(key);
    if (c) {
      this.callers.delete(key);
    } else {
      c = { fullAt: t, failed: false, trustedUntil: 0 };
      while (this.callers.size >= this.o.maxPeers) this.callers.delete(this.callers.keys().next().value as string);
    }
    this.callers.set(key, c);
    return c;
  }

  private flushAddress(address: string, a: AddressState): void {
    a.blockNoted = false;
    const names = a.names.size;
    a.names = new Set();
    if (a.collapsed === 0 && a.refused === 0) return;
    this.log.warn(
      {
        peer: address,
        failures: a.collapsed,
        refusedUnread: a.refused,
        siteNamesClaimed: names >= MAX_NAMES_COUNTED ? `${MAX_NAMES_COUNTED}+` : names,
        lastClaimant: a.lastClaimant,
        lastMethod: a.lastMethod,
        lastReason: a.lastReason,
        windowSeconds: this.o.summaryMs / 1000,
      },
      'more failed calls from this address (collapsed into one line)',
    );
    a.collapsed = 0;
    a.refused = 0;
  }

  /** One token's worth of time at `perMinute`. */
  private interval(perMinute: number): number {
    return 60_000 / perMinute;
  }

  /** How long until the bucket has a token again (≤ 0: it has one now). */
  private waitMs(b: Bucket, burst: number, perMinute: number): number {
    return b.fullAt - this.now() - (burst - 1) * this.interval(perMinute);
  }

  private schedule(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.flush(), Math.max(1000, this.o.summaryMs / 4));
    this.timer.unref();
  }
}

function refusedFor(who: string, waitMs: number): string {
  return `too many failed authentication or enrolment calls from ${who}; such calls are refused for about ${Math.ceil(waitMs / 1000)} s — check the site's clock, key and token before retrying`;
}
