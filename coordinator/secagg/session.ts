/**
 * One round's secure-aggregation session at the coordinator: the library's server state machine
 * (shared/privacy/secagg/server.ts) driven by the gRPC calls of the round's selected sites.
 *
 * Each call hands in a site's message for the current phase and is answered when the phase closes: when
 * every site expected in it has answered, or `phaseMs` after it opened (advertise: after the t-th
 * advertisement, so sites that train slower than the others still get phaseMs) if at least t answered.
 * Fewer than t at any phase, or a bad message set that cannot be unmasked, fails the session with a
 * reason; the round engine then fails the round and starts a new one.
 *
 * The coordinator only holds public keys, sealed shares it cannot open, masked vectors (summed on arrival,
 * and written to disk as received, for audit) and, at the end, the unmasked sum.
 */
import { SecAggServer } from '../../shared/privacy/secagg/server.ts';
import { asAdvertise, asShareKeys, asUnmask, toJson } from '../../shared/privacy/secagg/wire.ts';
import type { Logger } from '../../shared/util/log.ts';

export type SecAggPhase = 'advertise' | 'share' | 'mask' | 'unmask' | 'done' | 'failed';

export interface SecAggResult {
  sum: Uint32Array;
  /** Sites whose masked input is in the sum. */
  survivors: string[];
  /** Sites that shared keys but sent no masked input (their pair masks were removed). */
  dropped: string[];
}

export interface SecAggRoundOptions {
  round: number;
  /** The round's selected sites; ids are their 1-based positions in sorted order. */
  sites: readonly string[];
  threshold: number;
  neighbours?: number;
  vectorLength: number;
  phaseMs: number;
  session: string;
  log: Logger;
  onResult(r: SecAggResult): void;
  onFailure(reason: string): void;
  /** Called with each complete masked vector (the coordinator keeps it on disk for audit). */
  onMasked?(site: string, y: Uint32Array): void;
}

/** A refusal the transport turns into a gRPC error: `code` says which kind. */
export class SecAggRefused extends Error {
  constructor(message: string, readonly code: 'invalid' | 'precondition' | 'aborted') {
    super(message);
  }
}

interface Waiter {
  resolve(json: string): void;
  reject(e: Error): void;
}

export class SecAggRound {
  readonly ids: ReadonlyMap<string, number>;
  private readonly names = new Map<number, string>();
  private readonly server: SecAggServer;
  private phaseNow: SecAggPhase = 'advertise';
  private expected: Set<string>;
  private readonly answered = new Set<string>();
  private readonly waiters = new Map<string, Waiter>();
  private timer: NodeJS.Timeout | undefined;
  private readonly pieces = new Map<string, { y: Uint32Array; next: number }>();
  private failure: string | undefined;
  /** Phase transitions with their times (ms since the session began), for logs and the overhead figures. */
  readonly timeline: { phase: SecAggPhase; atMs: number; sites: number }[] = [];
  private readonly t0 = Date.now();

  constructor(private readonly o: SecAggRoundOptions) {
    const sorted = [...o.sites].sort();
    this.ids = new Map(sorted.map((s, i) => [s, i + 1]));
    for (const [s, i] of this.ids) this.names.set(i, s);
    this.server = new SecAggServer({ threshold: o.threshold, vectorLength: o.vectorLength, session: o.session, ...(o.neighbours !== undefined && o.neighbours < sorted.length ? { neighbours: o.neighbours } : {}) });
    this.expected = new Set(sorted);
    if (sorted.length < o.threshold) queueMicrotask(() => this.fail(`only ${sorted.length} site(s) selected, fewer than the secure-aggregation threshold ${o.threshold}`));
  }

  get phase(): SecAggPhase {
    return this.phaseNow;
  }

  get session(): string {
    return this.o.session;
  }

  /** Ends the session from outside (round deadline, coordinator stopping). */
  abort(reason: string): void {
    if (this.phaseNow === 'done' || this.phaseNow === 'failed') return;
    this.fail(reason);
  }

  advertise(site: string, json: string): Promise<string> {
    return this.submit(site, 'advertise', () => this.server.receiveAdvertise(asAdvertise(this.idOf(site), json)));
  }

  shareKeys(site: string, json: string): Promise<string> {
    return this.submit(site, 'share', () => this.server.receiveShareKeys(asShareKeys(this.idOf(site), json)));
  }

  /**
   * One piece of a site's masked vector, in order from word 0. Resolves with '' for a piece that is not the
   * last; the last piece is answered with the unmask request once the masking phase closes.
   */
  maskedPiece(site: string, offsetWords: number, bytes: Buffer): Promise<string> {
    this.check(site, 'mask');
    if (bytes.length % 4 !== 0) return Promise.reject(new SecAggRefused(`a masked-vector piece of ${bytes.length} bytes is not whole 32-bit words`, 'invalid'));
    let p = this.pieces.get(site);
    if (!p) this.pieces.set(site, (p = { y: new Uint32Array(this.o.vectorLength), next: 0 }));
    const words = bytes.length / 4;
    if (offsetWords !== p.next) return Promise.reject(new SecAggRefused(`masked-vector piece at word ${offsetWords}, expected word ${p.next} (send pieces in order)`, 'invalid'));
    if (words === 0 || p.next + words > this.o.vectorLength) return Promise.reject(new SecAggRefused(`masked-vector piece of ${words} words at ${offsetWords} does not fit the ${this.o.vectorLength}-word vector`, 'invalid'));
    for (let i = 0; i < words; i++) p.y[p.next + i] = bytes.readUInt32LE(4 * i);
    p.next += words;
    if (p.next < this.o.vectorLength) return Promise.resolve('');
    const y = p.y;
    this.pieces.delete(site);
    return this.submit(site, 'mask', () => {
      this.server.receiveMaskedInput({ type: 'masked-input', id: this.idOf(site), y });
      this.o.onMasked?.(site, y);
    });
  }

  unmask(site: string, json: string): Promise<string> {
    return this.submit(site, 'unmask', () => this.server.receiveUnmask(asUnmask(this.idOf(site), json)));
  }

  private idOf(site: string): number {
    const id = this.ids.get(site);
    if (id === undefined) throw new SecAggRefused(`site '${site}' is not in round ${this.o.round}'s secure-aggregation session`, 'precondition');
    return id;
  }

  private check(site: string, phase: SecAggPhase): void {
    if (this.failure) throw new SecAggRefused(`round ${this.o.round}'s secure aggregation failed: ${this.failure}`, 'aborted');
    this.idOf(site);
    if (this.phaseNow !== phase) throw new SecAggRefused(`round ${this.o.round}'s secure aggregation is in phase '${this.phaseNow}', not '${phase}' (this site came too late or out of order; wait for the next round)`, 'precondition');
    if (!this.expected.has(site)) throw new SecAggRefused(`site '${site}' did not take part in the previous phase of round ${this.o.round}'s secure aggregation`, 'precondition');
    if (this.answered.has(site)) throw new SecAggRefused(`site '${site}' already answered phase '${phase}' of round ${this.o.round}`, 'precondition');
  }

  private submit(site: string, phase: SecAggPhase, receive: () => void): Promise<string> {
    try {
      this.check(site, phase);
      receive();
    } catch (e) {
      return Promise.reject(e instanceof SecAggRefused ? e : new SecAggRefused((e as Error).message, 'invalid'));
    }
    this.answered.add(site);
    const reply = new Promise<string>((resolve, reject) => this.waiters.set(site, { resolve, reject }));
    this.o.log.debug({ round: this.o.round, site, phase, answered: this.answered.size, expected: this.expected.size }, 'secure aggregation: message received');
    if (this.answered.size === this.expected.size) queueMicrotask(() => this.close(phase));
    else if (phase !== 'advertise' || this.answered.size === this.o.threshold) this.arm(phase);
    return reply;
  }

  private arm(phase: SecAggPhase): void {
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.phaseNow === phase) this.close(phase);
    }, this.o.phaseMs);
  }

  private close(phase: SecAggPhase): void {
    if (this.phaseNow !== phase || this.failure) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    const missing = [...this.expected].filter((s) => !this.answered.has(s));
    const waiters = new Map(this.waiters);
    this.waiters.clear();
    try {
      let replies: Map<string, string>;
      let next: SecAggPhase;
      if (phase === 'advertise') {
        const roster = toJson(this.server.roster());
        replies = new Map([...waiters.keys()].map((s) => [s, roster]));
        next = 'share';
      } else if (phase === 'share') {
        const fwd = this.server.forwardShares();
        replies = new Map([...waiters.keys()].map((s) => [s, toJson(fwd.get(this.ids.get(s)!)!)]));
        next = 'mask';
      } else if (phase === 'mask') {
        const req = toJson(this.server.unmaskRequest());
        replies = new Map([...waiters.keys()].map((s) => [s, req]));
        next = 'unmask';
      } else {
        const r = this.server.finish();
        this.enter('done', r.survivors.length);
        for (const w of waiters.values()) w.resolve(JSON.stringify({ ok: true }));
        const name = (i: number) => this.names.get(i)!;
        this.o.log.info({ round: this.o.round, survivors: r.survivors.map(name), dropped: r.dropped.map(name), missingUnmask: missing }, 'secure aggregation: sum unmasked');
        this.o.onResult({ sum: r.sum, survivors: r.survivors.map(name), dropped: r.dropped.map(name) });
        return;
      }
      if (missing.length > 0) this.o.log.warn({ round: this.o.round, phase, missing }, 'secure aggregation: phase closed without these sites');
      this.expected = new Set(this.answered);
      this.answered.clear();
      this.enter(next, this.expected.size);
      for (const [s, w] of waiters) w.resolve(replies.get(s)!);
      // A phase whose sites all dropped out already can never fill: let the timer decide.
      this.arm(next);
    } catch (e) {
      for (const w of waiters.values()) w.reject(new SecAggRefused((e as Error).message, 'aborted'));
      this.fail(`phase '${phase}': ${(e as Error).message}${missing.length ? ` (no answer from ${missing.join(', ')})` : ''}`);
    }
  }

  private enter(phase: SecAggPhase, sites: number): void {
    this.phaseNow = phase;
    this.timeline.push({ phase, atMs: Date.now() - this.t0, sites });
  }

  private fail(reason: string): void {
    if (this.failure) return;
    this.failure = reason;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.enter('failed', 0);
    for (const w of this.waiters.values()) w.reject(new SecAggRefused(`round ${this.o.round}'s secure aggregation failed: ${reason}`, 'aborted'));
    this.waiters.clear();
    this.pieces.clear();
    this.o.onFailure(reason);
  }
}
