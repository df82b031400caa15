/**
 * The primitives secure aggregation needs, all from node:crypto: X25519 key agreement, HKDF-SHA256,
 * AES-256-GCM for shares in transit (sealed per recipient), and an AES-256-CTR keystream as the PRG that
 * expands a 32-byte seed into a mask of uint32 words.
 */
import {
  createCipheriv,
  createDecipheriv,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  randomBytes,
  type KeyObject,
} from 'node:crypto';

export interface X25519KeyPair {
  privateKey: KeyObject;
  /** Raw 32-byte public key. */
  publicRaw: Buffer;
  /** Raw 32-byte private scalar (what gets secret-shared). */
  privateRaw: Buffer;
}

const PKCS8_X25519_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_X25519_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

export function generateX25519(): X25519KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('x25519');
  const publicRaw = publicKey.export({ format: 'der', type: 'spki' }).subarray(SPKI_X25519_PREFIX.length);
  const privateRaw = privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(PKCS8_X25519_PREFIX.length);
  return { privateKey, publicRaw: Buffer.from(publicRaw), privateRaw: Buffer.from(privateRaw) };
}

export function x25519PrivateFromRaw(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new RangeError(`an X25519 private key is 32 bytes, got ${raw.length}`);
  return createPrivateKey({ key: Buffer.concat([PKCS8_X25519_PREFIX, raw]), format: 'der', type: 'pkcs8' });
}

export function x25519PublicFromRaw(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new RangeError(`an X25519 public key is 32 bytes, got ${raw.length}`);
  return createPublicKey({ key: Buffer.concat([SPKI_X25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

export function agree(privateKey: KeyObject, publicRaw: Uint8Array): Buffer {
  return diffieHellman({ privateKey, publicKey: x25519PublicFromRaw(publicRaw) });
}

/** 32 bytes from HKDF-SHA256 with a purpose label, bound to the session. */
export function deriveKey(ikm: Uint8Array, session: string, label: string): Buffer {
  return Buffer.from(hkdfSync('sha256', ikm, Buffer.from(`medfl.secagg.v1:${session}`), Buffer.from(label), 32));
}

const ZERO_IV = Buffer.alloc(16);

/** Adds (sign +1) or subtracts (−1) the PRG stream of `key` into `acc`, mod 2^32, streaming in 1 MiB blocks. */
export function applyPrg(acc: Uint32Array, key: Uint8Array, sign: 1 | -1): void {
  const c = createCipheriv('aes-256-ctr', key, ZERO_IV);
  const blockWords = 1 << 18;
  const zeros = Buffer.alloc(blockWords * 4);
  for (let off = 0; off < acc.length; off += blockWords) {
    const n = Math.min(blockWords, acc.length - off);
    const ks = c.update(n === blockWords ? zeros : zeros.subarray(0, n * 4));
    const m = new Uint32Array(ks.buffer, ks.byteOffset, n);
    if (sign === 1) for (let i = 0; i < n; i++) acc[off + i] = (acc[off + i]! + m[i]!) >>> 0;
    else for (let i = 0; i < n; i++) acc[off + i] = (acc[off + i]! - m[i]!) >>> 0;
  }
}

export interface Sealed {
  iv: Buffer;
  ct: Buffer;
  tag: Buffer;
}

export function seal(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Sealed {
  const iv = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, iv);
  c.setAAD(aad);
  const ct = Buffer.concat([c.update(plaintext), c.final()]);
  return { iv, ct, tag: c.getAuthTag() };
}

export function open(key: Uint8Array, s: Sealed, aad: Uint8Array): Buffer {
  const d = createDecipheriv('aes-256-gcm', key, s.iv);
  d.setAAD(aad);
  d.setAuthTag(s.tag);
  try {
    return Buffer.concat([d.update(s.ct), d.final()]);
  } catch {
    throw new Error('a sealed share does not authenticate (tampered in transit, or not meant for this site)');
  }
}
