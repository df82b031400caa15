/**
 * One site's side of secure aggregation, as a state machine: each method takes the server's last
 * message and returns this client's next one, and refuses to run out of order. The client keeps its
 * secrets (two X25519 private keys, the self-mask seed) and the shares sealed to it; the server only
 * ever sees public keys, sealed shares, the masked vector, and at the end one kind of share per peer.
 */
import { randomBytes } from 'node:crypto';
import { agree, applyPrg, deriveKey, generateX25519, open, seal, type X25519KeyPair } from './crypto.ts';
import { decodeShare, encodeShare, split, SHARE_BYTES } from './shamir.ts';
import { checkGraph, neighboursOf } from './graph.ts';
import {
  SHARE_PLAINTEXT_BYTES,
  type AdvertiseKeys,
  type ForwardedShares,
  type MaskedInput,
  type Roster,
  type ShareKeys,
  type UnmaskRequest,
  type UnmaskResponse,
} from './messages.ts';

type Phase = 'new' | 'advertised' | 'shared' | 'masked' | 'done';

export function shareAad(session: string, from: number, to: number): Buffer {
  return Buffer.from(`medfl.secagg.share:${session}:${from}:${to}`);
}

export class SecAggClient {
  private phase: Phase = 'new';
  private readonly c: X25519KeyPair = generateX25519();
  private readonly s: X25519KeyPair = generateX25519();
  private readonly selfSeed = randomBytes(32);
  private roster: Roster | undefined;
  private sharers: number[] = [];
  /** Sites this one pairs with and shares its secrets with (all others, or its SecAgg+ neighbours). */
  private neighbours: number[] = [];
  /** Per peer: (its share of that peer's mask key, its share of that peer's self-mask seed), both held by this client. */
  private readonly held = new Map<number, { keyShare: Buffer; seedShare: Buffer }>();

  constructor(readonly id: number) {
    if (!Number.isInteger(id) || id < 1) throw new RangeError(`client id ${id} must be a whole number ≥ 1 (it is the Shamir evaluation point)`);
  }

  advertise(): AdvertiseKeys {
    this.expect('new');
    this.phase = 'advertised';
    return { type: 'advertise', id: this.id, cPk: this.c.publicRaw, sPk: this.s.publicRaw };
  }

  shareKeys(roster: Roster): ShareKeys {
    this.expect('advertised');
    const me = roster.members.find((m) => m.id === this.id);
    if (!me || !me.cPk.equals(this.c.publicRaw) || !me.sPk.equals(this.s.publicRaw)) throw new Error(`the roster does not carry client ${this.id}'s own keys: abort (server error or tampering)`);
    const ids = roster.members.map((m) => m.id);
    if (new Set(ids).size !== ids.length) throw new Error('the roster lists a client twice: abort');
    if (roster.graph) checkGraph(roster.graph, ids);
    const maxT = roster.graph ? roster.graph.k : ids.length;
    if (!(roster.threshold >= 2) || roster.threshold > maxT) throw new Error(`threshold ${roster.threshold} is not usable with ${roster.graph ? `neighbourhoods of ${roster.graph.k}` : `${ids.length} clients`}: abort (needs 2 ≤ t ≤ ${maxT})`);
    this.roster = roster;
    this.neighbours = neighboursOf(this.id, ids, roster.graph);
    const holders = roster.members.filter((m) => m.id === this.id || this.neighbours.includes(m.id));
    const keyShares = split(this.s.privateRaw, roster.threshold, holders.map((m) => m.id));
    const seedShares = split(this.selfSeed, roster.threshold, holders.map((m) => m.id));
    const sealed = [];
    for (const [i, m] of holders.entries()) {
      const plain = Buffer.alloc(SHARE_PLAINTEXT_BYTES);
      plain.writeUInt32BE(this.id, 0);
      plain.writeUInt32BE(m.id, 4);
      encodeShare(keyShares[i]!).copy(plain, 8);
      encodeShare(seedShares[i]!).copy(plain, 8 + SHARE_BYTES);
      if (m.id === this.id) {
        this.held.set(this.id, { keyShare: plain.subarray(8, 8 + SHARE_BYTES), seedShare: plain.subarray(8 + SHARE_BYTES) });
        continue;
      }
      const key = deriveKey(agree(this.c.privateKey, m.cPk), roster.session, 'seal');
      sealed.push({ from: this.id, to: m.id, ...seal(key, plain, shareAad(roster.session, this.id, m.id)) });
    }
    this.phase = 'shared';
    return { type: 'share-keys', id: this.id, sealed };
  }

  /** `input`: this site's quantised vector (see quantize.ts), of the roster's vector length. */
  maskedInput(fwd: ForwardedShares, input: Uint32Array): MaskedInput {
    this.expect('shared');
    const roster = this.roster!;
    if (fwd.to !== this.id) throw new Error(`shares addressed to client ${fwd.to} were delivered to ${this.id}: abort`);
    if (input.length !== roster.vectorLength) throw new RangeError(`input has ${input.length} values, the session expects ${roster.vectorLength}`);
    if (!fwd.sharers.includes(this.id)) throw new Error('the server did not count this client among those who shared keys: abort');
    const neighbourSharers = fwd.sharers.filter((v) => this.neighbours.includes(v));
    if (neighbourSharers.length + 1 < roster.threshold) throw new Error(`only ${neighbourSharers.length + 1} of this client's share holders shared keys, fewer than the threshold ${roster.threshold}: abort`);
    const members = new Map(roster.members.map((m) => [m.id, m]));
    for (const v of fwd.sharers) if (!members.has(v)) throw new Error(`sharer ${v} is not on the roster: abort`);
    for (const sh of fwd.sealed) {
      if (sh.to !== this.id || !neighbourSharers.includes(sh.from)) throw new Error(`a sealed share from ${sh.from} to ${sh.to} does not belong here: abort`);
      const key = deriveKey(agree(this.c.privateKey, members.get(sh.from)!.cPk), roster.session, 'seal');
      const plain = open(key, sh, shareAad(roster.session, sh.from, this.id));
      if (plain.readUInt32BE(0) !== sh.from || plain.readUInt32BE(4) !== this.id) throw new Error('a sealed share names the wrong sender or recipient: abort');
      this.held.set(sh.from, { keyShare: plain.subarray(8, 8 + SHARE_BYTES), seedShare: plain.subarray(8 + SHARE_BYTES) });
    }
    for (const v of neighbourSharers) if (!this.held.has(v)) throw new Error(`no share from sharer ${v} reached this client: abort`);
    this.sharers = [...fwd.sharers];

    const y = Uint32Array.from(input);
    applyPrg(y, deriveKey(this.selfSeed, roster.session, 'self'), 1);
    for (const v of neighbourSharers) {
      const pairKey = deriveKey(agree(this.s.privateKey, members.get(v)!.sPk), roster.session, 'pair');
      applyPrg(y, pairKey, this.id < v ? 1 : -1);
    }
    this.phase = 'masked';
    return { type: 'masked-input', id: this.id, y };
  }

  unmask(req: UnmaskRequest): UnmaskResponse {
    this.expect('masked');
    const roster = this.roster!;
    const survivors = new Set(req.survivors);
    if (survivors.size !== req.survivors.length) throw new Error('the unmask request lists a client twice: abort');
    if (survivors.size < roster.threshold) throw new Error(`only ${survivors.size} survivors, fewer than the threshold ${roster.threshold}: refuse to unmask`);
    if (!survivors.has(this.id)) throw new Error('this client is not among the survivors it is asked to unmask: abort');
    for (const v of survivors) if (!this.sharers.includes(v)) throw new Error(`survivor ${v} never shared keys: abort`);
    const selfMaskShares = [];
    const keyShares = [];
    for (const v of this.sharers) {
      if (v !== this.id && !this.neighbours.includes(v)) continue;
      const h = this.held.get(v)!;
      // One kind of share per peer: a survivor's self-mask seed, or a dropped client's mask key; never both.
      if (survivors.has(v)) selfMaskShares.push({ of: v, share: Buffer.from(h.seedShare) });
      else keyShares.push({ of: v, share: Buffer.from(h.keyShare) });
    }
    this.phase = 'done';
    return { type: 'unmask', id: this.id, selfMaskShares, keyShares };
  }

  private expect(p: Phase): void {
    if (this.phase !== p) throw new Error(`secure aggregation client ${this.id}: this step needs phase '${p}', the client is in '${this.phase}'`);
  }
}

export { decodeShare };
