/**
 * Messages of the secure-aggregation protocol (Bonawitz et al. 2017, semi-honest variant), in order:
 *   client → server  AdvertiseKeys      two X25519 public keys (one for sealing shares, one for masks)
 *   server → clients Roster             everyone who advertised (U1), the threshold, the session id
 *   client → server  ShareKeys          for every other member, its Shamir shares of this client's mask
 *                                       key and self-mask seed, sealed (AES-256-GCM) for that member only
 *   server → client  ForwardedShares    the sealed shares addressed to this client; who shared (U2)
 *   client → server  MaskedInput        y = x + PRG(b) + Σ± PRG(s_uv)  mod 2^32
 *   server → clients UnmaskRequest      who sent a masked input (U3 ⊆ U2)
 *   client → server  UnmaskResponse     a share of b_v for every v in U3, a share of v's mask key for every
 *                                       v in U2 \ U3 — never both for one v
 * Transport-agnostic: plain objects; `wireBytes()` gives each one's size in a compact binary encoding
 * (what the benchmark reports).
 */
import type { Sealed } from './crypto.ts';
import { SHARE_BYTES } from './shamir.ts';
import type { NeighbourGraph } from './graph.ts';

export interface AdvertiseKeys {
  type: 'advertise';
  id: number;
  /** X25519 public key for sealing shares to this client. */
  cPk: Buffer;
  /** X25519 public key for pairwise masks. */
  sPk: Buffer;
}

export interface Roster {
  type: 'roster';
  session: string;
  threshold: number;
  vectorLength: number;
  members: { id: number; cPk: Buffer; sPk: Buffer }[];
  /** SecAgg+: pair masks and shares only along this k-regular graph; absent = complete graph (classic SecAgg). */
  graph?: NeighbourGraph;
}

export interface SealedShare extends Sealed {
  from: number;
  to: number;
}

export interface ShareKeys {
  type: 'share-keys';
  id: number;
  sealed: SealedShare[];
}

export interface ForwardedShares {
  type: 'forwarded-shares';
  to: number;
  /** U2: the clients whose ShareKeys the server accepted (including the recipient). */
  sharers: number[];
  sealed: SealedShare[];
}

export interface MaskedInput {
  type: 'masked-input';
  id: number;
  y: Uint32Array;
}

export interface UnmaskRequest {
  type: 'unmask-request';
  /** U3: the clients whose masked input the server received. */
  survivors: number[];
}

export interface UnmaskResponse {
  type: 'unmask';
  id: number;
  /** Shares of survivors' self-mask seeds b_v. */
  selfMaskShares: { of: number; share: Buffer }[];
  /** Shares of dropped clients' mask private keys. */
  keyShares: { of: number; share: Buffer }[];
}

export type SecAggMessage = AdvertiseKeys | Roster | ShareKeys | ForwardedShares | MaskedInput | UnmaskRequest | UnmaskResponse;

/** Plaintext of one sealed share: from (4) to (4) mask-key share, self-mask-seed share. */
export const SHARE_PLAINTEXT_BYTES = 8 + 2 * SHARE_BYTES;
const SEALED_BYTES = 8 + 12 + SHARE_PLAINTEXT_BYTES + 16;

/** Size of the message in a compact binary encoding (ids as u32, keys raw, vectors as u32 words). */
export function wireBytes(m: SecAggMessage): number {
  switch (m.type) {
    case 'advertise':
      return 1 + 4 + 32 + 32;
    case 'roster':
      return 1 + 16 + 4 + 4 + m.members.length * (4 + 32 + 32) + (m.graph ? 4 + 4 * m.graph.ring.length : 0);
    case 'share-keys':
      return 1 + 4 + m.sealed.length * SEALED_BYTES;
    case 'forwarded-shares':
      return 1 + 4 + 4 * m.sharers.length + m.sealed.length * SEALED_BYTES;
    case 'masked-input':
      return 1 + 4 + 4 * m.y.length;
    case 'unmask-request':
      return 1 + 4 * m.survivors.length;
    case 'unmask':
      return 1 + 4 + (m.selfMaskShares.length + m.keyShares.length) * (4 + SHARE_BYTES);
  }
}
