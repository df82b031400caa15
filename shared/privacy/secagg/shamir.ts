/**
 * Shamir t-of-n secret sharing over the prime field GF(p), p = 2^521 − 1 (a Mersenne prime), large
 * enough to hold any 32-byte secret (mask seeds, X25519 private keys) as one field element. A share is
 * (x, f(x)) for a random polynomial f of degree t − 1 with f(0) = secret; any t shares give f(0) by
 * Lagrange interpolation, t − 1 or fewer reveal nothing about it.
 */
import { randomBytes } from 'node:crypto';

export const FIELD_PRIME = (1n << 521n) - 1n;
/** Bytes of one share value, big-endian. */
export const SHARE_BYTES = 66;

export interface Share {
  /** Evaluation point: the holder's id, 1 … n (never 0). */
  x: number;
  y: bigint;
}

function mod(a: bigint): bigint {
  const r = a % FIELD_PRIME;
  return r < 0n ? r + FIELD_PRIME : r;
}

/** Uniform in GF(p): 80 random bytes reduced mod p (bias below 2^-119). */
function randomFieldElement(): bigint {
  return mod(bytesToBigInt(randomBytes(80)));
}

export function bytesToBigInt(b: Uint8Array): bigint {
  let v = 0n;
  for (const byte of b) v = (v << 8n) | BigInt(byte);
  return v;
}

export function bigIntToBytes(v: bigint, length: number): Buffer {
  const out = Buffer.alloc(length);
  let x = v;
  for (let i = length - 1; i >= 0; i--) {
    out[i] = Number(x & 0xffn);
    x >>= 8n;
  }
  if (x !== 0n) throw new RangeError(`value does not fit in ${length} bytes`);
  return out;
}

function modInverse(a: bigint): bigint {
  // Extended Euclid on (a, p).
  let [oldR, r] = [mod(a), FIELD_PRIME];
  let [oldS, s] = [1n, 0n];
  while (r !== 0n) {
    const q = oldR / r;
    [oldR, r] = [r, oldR - q * r];
    [oldS, s] = [s, oldS - q * s];
  }
  if (oldR !== 1n) throw new Error('internal: no inverse (evaluation points must be distinct and non-zero)');
  return mod(oldS);
}

/** Splits `secret` (at most 65 bytes) into shares for holders `xs` (distinct ids ≥ 1); any `t` recover it. */
export function split(secret: Uint8Array, t: number, xs: readonly number[]): Share[] {
  if (!Number.isInteger(t) || t < 1) throw new RangeError(`threshold ${t} must be a whole number ≥ 1`);
  if (xs.length < t) throw new RangeError(`${xs.length} holders cannot meet a threshold of ${t}`);
  if (new Set(xs).size !== xs.length || xs.some((x) => !Number.isInteger(x) || x < 1)) throw new RangeError('holder ids must be distinct whole numbers ≥ 1');
  if (secret.length > SHARE_BYTES - 1) throw new RangeError(`secret of ${secret.length} bytes is too large for the field`);
  const coeffs = [bytesToBigInt(secret)];
  for (let i = 1; i < t; i++) coeffs.push(randomFieldElement());
  return xs.map((x) => {
    // Horner's rule.
    let y = 0n;
    const bx = BigInt(x);
    for (let i = coeffs.length - 1; i >= 0; i--) y = mod(y * bx + coeffs[i]!);
    return { x, y };
  });
}

/** f(0) from the given shares (the caller ensures there are at least t of them). */
export function combine(shares: readonly Share[], secretBytes: number): Buffer {
  if (shares.length === 0) throw new RangeError('no shares to combine');
  if (new Set(shares.map((s) => s.x)).size !== shares.length) throw new RangeError('duplicate share holders');
  let acc = 0n;
  for (const si of shares) {
    let num = 1n;
    let den = 1n;
    for (const sj of shares) {
      if (sj.x === si.x) continue;
      num = mod(num * BigInt(-sj.x));
      den = mod(den * BigInt(si.x - sj.x));
    }
    acc = mod(acc + si.y * num * modInverse(den));
  }
  if (acc >= 1n << BigInt(8 * secretBytes)) {
    // Fewer than t (or inconsistent) shares interpolate to a random field element, almost never this small.
    throw new Error('the shares do not reconstruct a secret: fewer than the threshold, or not from the same split');
  }
  return bigIntToBytes(acc, secretBytes);
}

export function encodeShare(s: Share): Buffer {
  return bigIntToBytes(s.y, SHARE_BYTES);
}

export function decodeShare(x: number, b: Uint8Array): Share {
  if (b.length !== SHARE_BYTES) throw new RangeError(`a share is ${SHARE_BYTES} bytes, got ${b.length}`);
  return { x, y: bytesToBigInt(b) };
}
