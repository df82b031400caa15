/**
 * Verification of a compact EdDSA (Ed25519) JWT against a public KeyObject: the site token's hot path.
 *
 * Why not jose's `jwtVerify` here: jose checks the signature through WebCrypto (`crypto.subtle.verify`), a promise
 * and a wrapped thread-pool job per call. Node's `crypto.verify` on the same KeyObject is the same OpenSSL call
 * without the wrapping: measured (bench/token-verify.ts), 7–23 % less CPU per token and half the event-loop time.
 * The interceptor runs it on libuv's pool (ed25519SignatureVerifies), so the event loop does not wait for the curve
 * arithmetic (~120 µs of a ~130 µs check); verifyEd25519Jwt runs it on the calling thread. jose stays where it is the right tool (sites sign
 * their tokens with it); what it checked for our options is done here:
 *
 * 1. Shape: exactly three '.'-separated segments, each canonical unpadded base64url (stricter than jose, which
 *    accepts '=' padding and non-zero trailing bits, so one signature could be spelt several ways); header and
 *    claims strict UTF-8 JSON objects. The caller bounds the length before any of this.
 * 2. Header: `alg` exactly 'EdDSA'; no `crit` at all and no `b64` (stricter: jose accepts `crit: ["b64"]` and
 *    ignores `b64` without it; site tokens use no JWS extension).
 * 3. Signature: 64 bytes, Ed25519 over the ASCII `header.payload`.
 * 4. Times, as jose with a clock tolerance: `iat`, `nbf` and `exp` are numbers when present; `nbf` ≤ now + tolerance;
 *    `exp` > now − tolerance.
 *
 * Everything else about a site token (audience, iss = sub, required exp and iat, lifetime, revocation, replay) is the
 * interceptor's, unchanged.
 */
import { verify as cryptoVerify, type KeyObject } from 'node:crypto';

/** The only algorithm a site token may name. */
export const SITE_TOKEN_ALG = 'EdDSA';
const ED25519_SIGNATURE_BYTES = 64;

/**
 * Why a token was refused, as the kind of check that failed: the interceptor words its answer from the kind, as it
 * did from jose's error classes (`claim` names the claim for 'claim').
 */
export type JwtCheckKind = 'malformed' | 'algorithm' | 'header' | 'signature' | 'expired' | 'claim';

export class JwtCheckError extends Error {
  constructor(
    readonly kind: JwtCheckKind,
    message: string,
    readonly claim?: string,
  ) {
    super(message);
    this.name = 'JwtCheckError';
  }
}

export type JsonObject = Record<string, unknown>;

/** A token split and decoded, nothing verified yet. */
export interface DecodedJwt {
  header: JsonObject;
  claims: JsonObject;
  /** The ASCII bytes the signature covers: `header.payload` as sent. */
  signingInput: Buffer;
  signature: Buffer;
}

const BASE64URL = /^[A-Za-z0-9_-]*$/;
/** Strict as jose's: invalid UTF-8 is an error, not U+FFFD. */
const utf8 = new TextDecoder('utf-8', { fatal: true });
const malformed = (why: string): JwtCheckError => new JwtCheckError('malformed', why);

function decodeSegment(segment: string, what: string): Buffer {
  if (!BASE64URL.test(segment)) throw malformed(`its ${what} is not base64url (only A-Z a-z 0-9 - _, no padding)`);
  const bytes = Buffer.from(segment, 'base64url');
  // Re-encoding gives back the input only when it was the one canonical spelling of these bytes.
  if (bytes.toString('base64url') !== segment) throw malformed(`its ${what} is not canonical base64url`);
  return bytes;
}

function jsonObject(bytes: Buffer, what: string): JsonObject {
  let value: unknown;
  try {
    value = JSON.parse(utf8.decode(bytes));
  } catch {
    throw malformed(`its ${what} is not UTF-8 JSON`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw malformed(`its ${what} is not a JSON object`);
  return value as JsonObject;
}

/** Splits and decodes a compact JWT; throws JwtCheckError('malformed') for anything but one canonical encoding. */
export function decodeCompactJwt(token: string): DecodedJwt {
  const parts = token.split('.');
  if (parts.length !== 3) throw malformed(`it has ${parts.length} '.'-separated parts, a compact JWT has 3`);
  const [h, p, s] = parts as [string, string, string];
  const header = jsonObject(decodeSegment(h, 'header'), 'header');
  const claims = jsonObject(decodeSegment(p, 'payload'), 'payload');
  const signature = decodeSegment(s, 'signature');
  return { header, claims, signingInput: Buffer.from(token.slice(0, h.length + 1 + p.length), 'latin1'), signature };
}

/** Throws unless the header names EdDSA and asks for no JWS extension. */
export function checkEdDsaHeader(header: JsonObject): void {
  if (header.alg !== SITE_TOKEN_ALG) throw new JwtCheckError('algorithm', `alg '${String(header.alg)}' is not allowed`);
  if (Object.hasOwn(header, 'crit')) throw new JwtCheckError('header', `the 'crit' header parameter is not accepted: site tokens use no JWS extension`);
  if (Object.hasOwn(header, 'b64')) throw new JwtCheckError('header', `the 'b64' header parameter is not accepted: site tokens carry a base64url payload`);
}

function assertEd25519PublicKey(key: KeyObject): void {
  if (key.type !== 'public' || key.asymmetricKeyType !== 'ed25519') throw new TypeError(`expected an Ed25519 public key, got ${key.type} ${key.asymmetricKeyType ?? ''}`.trim());
}

/** True when `jwt`'s signature is a valid Ed25519 signature of its signing input by `key`. */
export function hasValidEd25519Signature(jwt: DecodedJwt, key: KeyObject): boolean {
  assertEd25519PublicKey(key);
  if (jwt.signature.length !== ED25519_SIGNATURE_BYTES) return false;
  return cryptoVerify(null, jwt.signingInput, key, jwt.signature);
}

/**
 * hasValidEd25519Signature's check run on libuv's thread pool (`crypto.verify` with a callback): the same OpenSSL
 * call, but the event loop pays only for handing the job over (~10–20 µs against ~115 µs for the curve arithmetic,
 * bench/token-verify.ts), so other calls do not queue behind it and a second core can take the arithmetic.
 */
export function ed25519SignatureVerifies(jwt: DecodedJwt, key: KeyObject): Promise<boolean> {
  assertEd25519PublicKey(key);
  if (jwt.signature.length !== ED25519_SIGNATURE_BYTES) return Promise.resolve(false);
  // An OpenSSL error is a signature that does not verify, as jose treats it.
  return new Promise((resolve) => cryptoVerify(null, jwt.signingInput, key, jwt.signature, (err, ok) => resolve(!err && ok)));
}

function numericDate(claims: JsonObject, claim: string): number | undefined {
  const value = claims[claim];
  if (value === undefined) return undefined;
  if (typeof value !== 'number') throw new JwtCheckError('claim', `"${claim}" claim must be a number`, claim);
  return value;
}

/** jose's time checks: present `iat`/`nbf`/`exp` are numbers, not before `nbf`, not at or past `exp` (each ± tolerance). */
export function checkTimeClaims(claims: JsonObject, nowSec: number, clockToleranceS: number): void {
  numericDate(claims, 'iat');
  const nbf = numericDate(claims, 'nbf');
  if (nbf !== undefined && nbf > nowSec + clockToleranceS) throw new JwtCheckError('claim', '"nbf" claim timestamp check failed', 'nbf');
  const exp = numericDate(claims, 'exp');
  if (exp !== undefined && exp <= nowSec - clockToleranceS) throw new JwtCheckError('expired', '"exp" claim timestamp check failed', 'exp');
}

/** All of the above in order: the verified claims, or a JwtCheckError. The signature is checked on this thread. */
export function verifyEd25519Jwt(token: string, key: KeyObject, opts: { nowSec: number; clockToleranceS: number }): JsonObject {
  const jwt = decodeCompactJwt(token);
  checkEdDsaHeader(jwt.header);
  if (!hasValidEd25519Signature(jwt, key)) throw new JwtCheckError('signature', 'signature verification failed');
  checkTimeClaims(jwt.claims, opts.nowSec, opts.clockToleranceS);
  return jwt.claims;
}

/** verifyEd25519Jwt with the signature checked on libuv's thread pool (ed25519SignatureVerifies). */
export async function verifyEd25519JwtOffLoop(token: string, key: KeyObject, opts: { nowSec: number; clockToleranceS: number }): Promise<JsonObject> {
  const jwt = decodeCompactJwt(token);
  checkEdDsaHeader(jwt.header);
  if (!(await ed25519SignatureVerifies(jwt, key))) throw new JwtCheckError('signature', 'signature verification failed');
  checkTimeClaims(jwt.claims, opts.nowSec, opts.clockToleranceS);
  return jwt.claims;
}
