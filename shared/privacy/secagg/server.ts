/**
 * The server's side of secure aggregation. Each phase collects messages and is closed explicitly (the
 * transport decides when: all answered, or a deadline), which fixes the set of clients that go on:
 * U1 (advertised) ⊇ U2 (shared keys) ⊇ U3 (sent a masked input). After unmasking it returns
 * Σ_{u∈U3} x_u mod 2^32 and learns nothing else: for survivors it reconstructs only self-mask seeds, for
 * clients that dropped after sharing only their mask keys (to cancel their pairwise masks).
 */
import { createPublicKey, randomUUID } from 'node:crypto';
import { agree, applyPrg, deriveKey, x25519PrivateFromRaw } from './crypto.ts';
import { combine, decodeShare, SHARE_BYTES, type Share } from './shamir.ts';
import { neighboursOf, randomRing, type NeighbourGraph } from './graph.ts';
import type { AdvertiseKeys, ForwardedShares, MaskedInput, Roster, ShareKeys, UnmaskRequest, UnmaskResponse } from './messages.ts';

type Phase = 'advertise' | 'share' | 'mask' | 'unmask' | 'done';

export interface SecAggServerOptions {
  /** Shamir threshold t: at least t clients must reach each phase, and t shares unmask. */
  threshold: number;
  vectorLength: number;
  session?: string;
  /**
   * SecAgg+: pair each site with only `neighbours` others (even, k = O(log n)) on a random ring; the
   * threshold then counts within a neighbourhood (t ≤ k). Absent: every site with every other.
   */
  neighbours?: number;
}

export class SecAggServer {
  readonly session: string;
  private phase: Phase = 'advertise';
  private readonly keys = new Map<number, { cPk: Buffer; sPk: Buffer }>();
  private u1: number[] = [];
  private graph: NeighbourGraph | undefined;
  private readonly shared = new Map<number, ShareKeys>();
  private u2: number[] = [];
  /** Ids whose masked input was folded into `running` (inputs are summed on arrival: memory stays one vector). */
  private readonly masked = new Set<number>();
  private running: Uint32Array | undefined;
  private u3: number[] = [];
  private readonly unmasks = new Map<number, UnmaskResponse>();

  constructor(private readonly o: SecAggServerOptions) {
    if (!Number.isInteger(o.threshold) || o.threshold < 2) throw new RangeError(`threshold ${o.threshold} must be a whole number ≥ 2`);
    if (!Number.isInteger(o.vectorLength) || o.vectorLength < 1) throw new RangeError(`vector length ${o.vectorLength} must be ≥ 1`);
    if (o.neighbours !== undefined && o.threshold > o.neighbours) throw new RangeError(`threshold ${o.threshold} cannot exceed the neighbourhood size ${o.neighbours}`);
    this.session = o.session ?? randomUUID();
  }

  get threshold(): number {
    return this.o.threshold;
  }

  receiveAdvertise(m: AdvertiseKeys): void {
    this.expect('advertise', 'AdvertiseKeys');
    if (this.keys.has(m.id)) throw new Error(`client ${m.id} advertised twice`);
    if (m.cPk.length !== 32 || m.sPk.length !== 32) throw new Error(`client ${m.id} sent keys of the wrong size`);
    this.keys.set(m.id, { cPk: m.cPk, sPk: m.sPk });
  }

  /** Closes the advertise phase: U1 = everyone who advertised. */
  roster(): Roster {
    this.expect('advertise', 'the roster');
    this.u1 = [...this.keys.keys()].sort((a, b) => a - b);
    this.need(this.u1.length, 'advertised keys');
    if (this.o.neighbours !== undefined) this.graph = randomRing(this.u1, this.o.neighbours);
    this.phase = 'share';
    return {
      type: 'roster',
      session: this.session,
      threshold: this.o.threshold,
      vectorLength: this.o.vectorLength,
      members: this.u1.map((id) => ({ id, ...this.keys.get(id)! })),
      ...(this.graph ? { graph: { k: this.graph.k, ring: [...this.graph.ring] } } : {}),
    };
  }

  receiveShareKeys(m: ShareKeys): void {
    this.expect('share', 'ShareKeys');
    if (!this.u1.includes(m.id)) throw new Error(`client ${m.id} is not on the roster`);
    if (this.shared.has(m.id)) throw new Error(`client ${m.id} shared keys twice`);
    const to = m.sealed.map((s) => s.to).sort((a, b) => a - b);
    const expected = this.nb(m.id);
    if (m.sealed.some((s) => s.from !== m.id) || to.join(',') !== expected.join(',')) throw new Error(`client ${m.id} did not seal exactly one share for each of its neighbours`);
    this.shared.set(m.id, m);
  }

  /** Closes the share phase: U2 = who shared; returns, per member of U2, the shares sealed to it. */
  forwardShares(): Map<number, ForwardedShares> {
    this.expect('share', 'forwarding shares');
    this.u2 = [...this.shared.keys()].sort((a, b) => a - b);
    this.need(this.u2.length, 'shared keys');
    const out = new Map<number, ForwardedShares>();
    for (const to of this.u2) {
      const sealed = this.u2.filter((from) => from !== to && this.nb(to).includes(from)).map((from) => this.shared.get(from)!.sealed.find((s) => s.to === to)!);
      out.set(to, { type: 'forwarded-shares', to, sharers: [...this.u2], sealed });
    }
    this.phase = 'mask';
    return out;
  }

  receiveMaskedInput(m: MaskedInput): void {
    this.expect('mask', 'MaskedInput');
    if (!this.u2.includes(m.id)) throw new Error(`client ${m.id} did not share keys, so its masked input cannot be unmasked`);
    if (this.masked.has(m.id)) throw new Error(`client ${m.id} sent its masked input twice`);
    if (m.y.length !== this.o.vectorLength) throw new Error(`client ${m.id} sent ${m.y.length} values, the session expects ${this.o.vectorLength}`);
    this.masked.add(m.id);
    const sum = (this.running ??= new Uint32Array(this.o.vectorLength));
    const y = m.y;
    for (let i = 0; i < y.length; i++) sum[i] = (sum[i]! + y[i]!) >>> 0;
  }

  /** Closes the masking phase: U3 = who sent a masked input. */
  unmaskRequest(): UnmaskRequest {
    this.expect('mask', 'the unmask request');
    this.u3 = [...this.masked].sort((a, b) => a - b);
    this.need(this.u3.length, 'masked inputs');
    this.phase = 'unmask';
    return { type: 'unmask-request', survivors: [...this.u3] };
  }

  receiveUnmask(m: UnmaskResponse): void {
    this.expect('unmask', 'UnmaskResponse');
    if (!this.u3.includes(m.id)) throw new Error(`client ${m.id} is not a survivor; its unmask shares are not wanted`);
    if (this.unmasks.has(m.id)) throw new Error(`client ${m.id} answered the unmask request twice`);
    const dropped = this.u2.filter((v) => !this.u3.includes(v));
    const holdsFor = (v: number) => v === m.id || this.nb(m.id).includes(v);
    const selfOf = m.selfMaskShares.map((s) => s.of).sort((a, b) => a - b).join(',');
    const keyOf = m.keyShares.map((s) => s.of).sort((a, b) => a - b).join(',');
    if (selfOf !== this.u3.filter(holdsFor).join(',') || keyOf !== dropped.filter(holdsFor).join(',')) throw new Error(`client ${m.id} sent shares for the wrong clients`);
    if ([...m.selfMaskShares, ...m.keyShares].some((s) => s.share.length !== SHARE_BYTES)) throw new Error(`client ${m.id} sent a malformed share`);
    this.unmasks.set(m.id, m);
  }

  /** Unmasks: Σ_{u∈U3} x_u mod 2^32. Needs at least t unmask responses. */
  finish(): { sum: Uint32Array; survivors: number[]; dropped: number[] } {
    this.expect('unmask', 'finishing');
    const responders = [...this.unmasks.keys()];
    if (responders.length < this.o.threshold) {
      throw new Error(`only ${responders.length} unmask response(s), fewer than the threshold ${this.o.threshold}: the sum cannot be recovered (wait for more survivors, or abandon this round)`);
    }
    const sum = this.running!;
    this.running = undefined;

    const sharesOf = (v: number, kind: 'selfMaskShares' | 'keyShares'): Share[] => {
      const holders = responders.filter((r) => r === v || this.nb(v).includes(r));
      if (holders.length < this.o.threshold) {
        throw new Error(`only ${holders.length} of client ${v}'s share holders answered, fewer than the threshold ${this.o.threshold}: the sum cannot be recovered (abandon this round)`);
      }
      return holders.slice(0, this.o.threshold).map((r) => decodeShare(r, this.unmasks.get(r)![kind].find((s) => s.of === v)!.share));
    };

    for (const v of this.u3) {
      const seed = combine(sharesOf(v, 'selfMaskShares'), 32);
      applyPrg(sum, deriveKey(seed, this.session, 'self'), -1);
    }
    const dropped = this.u2.filter((v) => !this.u3.includes(v));
    for (const v of dropped) {
      const raw = combine(sharesOf(v, 'keyShares'), 32);
      const priv = x25519PrivateFromRaw(raw);
      const pub = createPublicKey(priv).export({ format: 'der', type: 'spki' }).subarray(-32);
      if (!Buffer.from(pub).equals(this.keys.get(v)!.sPk)) throw new Error(`the shares of client ${v}'s mask key do not reconstruct the key it advertised (a client sent a bad share)`);
      for (const u of this.u3) {
        if (!this.nb(v).includes(u)) continue;
        const pairKey = deriveKey(agree(priv, this.keys.get(u)!.sPk), this.session, 'pair');
        // u added +PRG if u < v and −PRG if u > v; take it back out.
        applyPrg(sum, pairKey, u < v ? -1 : 1);
      }
    }
    this.phase = 'done';
    return { sum, survivors: [...this.u3], dropped };
  }

  /** The sites `id` pairs with. */
  private nb(id: number): number[] {
    return neighboursOf(id, this.u1, this.graph);
  }

  private need(n: number, what: string): void {
    if (n < this.o.threshold) throw new Error(`only ${n} client(s) ${what}, fewer than the threshold ${this.o.threshold}: abandon this round (the masks could not be removed)`);
  }

  private expect(p: Phase, what: string): void {
    if (this.phase !== p) throw new Error(`secure aggregation server: ${what} belongs to phase '${p}', the session is in '${this.phase}'`);
  }
}
