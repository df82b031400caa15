/**
 * Site identity: each site holds an Ed25519 key it generated itself (the private key never leaves the site);
 * the coordinator learns the raw public key at enrolment. Every later RPC carries a short-lived JWT signed by
 * that key (`authorization: Bearer <jwt>`), verified by coordinator/auth/interceptor.ts.
 *
 * The coordinator also has an Ed25519 key of its own, used to sign task manifests (signManifest/verifyManifest).
 *
 * Key file permissions (decision): loadSiteKey REFUSES a private key file that is group- or world-accessible
 * (any of mode 0o077 set), like ssh does, with an error naming the `chmod 600` fix. A hospital machine is often
 * shared; a silently readable key lets any local user act as the site. The check is skipped on Windows, where
 * POSIX mode bits do not describe access.
 */
import * as grpc from '@grpc/grpc-js';
import { SignJWT } from 'jose';
import {
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  randomUUID,
  sign as cryptoSign,
  verify as cryptoVerify,
  type KeyObject,
} from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/fs-atomic.ts';
import { AUTH_METADATA_KEY } from '../protocol/grpc.ts';

export const ED25519_PUBLIC_KEY_BYTES = 32;
export const SITE_KEY_FILE = 'site.key';
export const SITE_PUBLIC_KEY_FILE = 'site.pub';
/** The coordinator rejects tokens that live longer than this (see interceptor). */
export const MAX_TOKEN_TTL_SECONDS = 300;
export const DEFAULT_TOKEN_TTL_SECONDS = 120;

export interface Ed25519KeyPair {
  /** Raw 32-byte public key, as sent in EnrollRequest.public_key / EnrollResponse.coordinator_public_key. */
  publicKeyRaw: Buffer;
  /** PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----"). */
  privateKeyPem: string;
}

export interface LoadedSiteKey extends Ed25519KeyPair {
  privateKey: KeyObject;
}

export type PrivateKeyInput = KeyObject | string;

function generateEd25519(): Ed25519KeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return {
    publicKeyRaw: rawPublicKey(publicKey),
    privateKeyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
  };
}

export function generateSiteKeyPair(): Ed25519KeyPair {
  return generateEd25519();
}

/** The coordinator's manifest-signing key; same shape as a site key. */
export function generateCoordinatorKey(): Ed25519KeyPair {
  return generateEd25519();
}

/** Raw 32-byte Ed25519 public key of a KeyObject (public or private). */
export function rawPublicKey(key: KeyObject): Buffer {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  const jwk = pub.export({ format: 'jwk' });
  if (jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || typeof jwk.x !== 'string') {
    throw new Error(`expected an Ed25519 key, got ${jwk.kty}/${jwk.crv ?? '?'}`);
  }
  return Buffer.from(jwk.x, 'base64url');
}

/** p = 2^255 − 19, the field prime of Ed25519. */
const ED25519_P = (1n << 255n) - 19n;

/**
 * y coordinates (little-endian hex, sign bit clear) of the 8 points of order dividing 8: the identity (y = 1),
 * the point of order 2 (y = p − 1), the two of order 4 (y = 0) and the four of order 8 (y = ±y₈). With such a
 * key, signatures that ignore the message verify (R = identity, S = 0 forges for the identity key), so the key
 * proves nothing. Compared with the sign bit cleared, so non-canonical "negative zero" x encodings of these
 * points are refused too.
 */
const SMALL_ORDER_Y_HEX = new Set([
  '0100000000000000000000000000000000000000000000000000000000000000',
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  '0000000000000000000000000000000000000000000000000000000000000000',
  '26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05',
  'c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a',
]);

/**
 * Why a raw Ed25519 public key must not be registered, or null when it is acceptable: wrong length, a
 * non-canonical encoding (y ≥ p, an alias of a smaller y that some verifiers treat differently), or a
 * small-order point (see SMALL_ORDER_Y_HEX). A key from generateKeyPairSync never hits these.
 */
export function weakEd25519PublicKeyReason(raw: Uint8Array): string | null {
  if (raw.length !== ED25519_PUBLIC_KEY_BYTES) return `an Ed25519 public key is ${ED25519_PUBLIC_KEY_BYTES} bytes, got ${raw.length}`;
  const y = Buffer.from(raw);
  y[31] = raw[31]! & 0x7f; // the sign bit belongs to x
  if (SMALL_ORDER_Y_HEX.has(y.toString('hex'))) {
    return 'it is a small-order point (signatures with it prove nothing); generate a fresh key pair';
  }
  if (BigInt(`0x${Buffer.from(y).reverse().toString('hex')}`) >= ED25519_P) {
    return 'it is not canonically encoded (y coordinate ≥ 2^255 − 19); generate a fresh key pair';
  }
  return null;
}

/** Ed25519 public KeyObject from the raw 32 bytes the coordinator stores for each site. */
export function publicKeyFromRaw(raw: Uint8Array): KeyObject {
  if (raw.length !== ED25519_PUBLIC_KEY_BYTES) {
    throw new Error(`Ed25519 public key must be ${ED25519_PUBLIC_KEY_BYTES} bytes, got ${raw.length}`);
  }
  // Also guards keys registered before enrolment refused weak ones: such a key must not authenticate anything.
  const weak = weakEd25519PublicKeyReason(raw);
  if (weak !== null) throw new Error(`refusing this Ed25519 public key: ${weak}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

export function toPrivateKey(key: PrivateKeyInput): KeyObject {
  const k = typeof key === 'string' ? createPrivateKey(key) : key;
  if (k.type !== 'private' || k.asymmetricKeyType !== 'ed25519') {
    throw new Error(`expected an Ed25519 private key, got ${k.type} ${k.asymmetricKeyType ?? ''}`.trim());
  }
  return k;
}

/**
 * Writes `<dir>/site.key` (PKCS#8 PEM, mode 0600) and `<dir>/site.pub` (raw public key, base64, for operators).
 * Refuses to replace an existing key unless `overwrite`: a new key silently un-enrols the site.
 */
export function saveSiteKey(dir: string, key: Ed25519KeyPair, opts: { overwrite?: boolean } = {}): void {
  const keyPath = join(dir, SITE_KEY_FILE);
  if (!opts.overwrite && existsSync(keyPath)) {
    throw new Error(`site key ${keyPath} already exists; refusing to replace it (the site would have to re-enrol)`);
  }
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeFileAtomic(keyPath, key.privateKeyPem, 0o600);
  // Creation mode is filtered by umask (never wider than 0600); chmod makes it exactly 0600.
  if (process.platform !== 'win32') chmodSync(keyPath, 0o600);
  writeFileAtomic(join(dir, SITE_PUBLIC_KEY_FILE), key.publicKeyRaw.toString('base64') + '\n', 0o644);
}

/**
 * Throws if a private key file is group- or world-accessible (see file header), naming the `chmod 600` fix.
 * `what` names the file in the message ("site key", "TLS client key").
 */
export function assertOwnerOnly(path: string, what: string): void {
  if (process.platform === 'win32') return;
  const mode = statSync(path).mode & 0o777;
  if (mode & 0o077) {
    throw new Error(
      `${what} ${path} is accessible by group/others (mode 0${mode.toString(8)}); ` +
        `anyone who can read it can act as this site. Run \`chmod 600 ${path}\` and retry.`,
    );
  }
}

/** Loads `<dir>/site.key`; throws if missing, not Ed25519, or group/world accessible (see file header). */
export function loadSiteKey(dir: string): LoadedSiteKey {
  const keyPath = join(dir, SITE_KEY_FILE);
  if (!existsSync(keyPath)) throw new Error(`no site key at ${keyPath} — run \`medfl site enroll\` first`);
  assertOwnerOnly(keyPath, 'site key');
  const privateKeyPem = readFileSync(keyPath, 'utf8');
  const privateKey = toPrivateKey(privateKeyPem);
  return { privateKey, privateKeyPem, publicKeyRaw: rawPublicKey(privateKey) };
}

/** Loads the site key from `dir`, generating and saving one first if there is none. */
export function ensureSiteKey(dir: string): LoadedSiteKey {
  if (!existsSync(join(dir, SITE_KEY_FILE))) saveSiteKey(dir, generateSiteKeyPair());
  return loadSiteKey(dir);
}

export interface SiteTokenOptions {
  siteName: string;
  /** The JWT audience: EnrollResponse.federation_id. */
  federationId: string;
  privateKey: PrivateKeyInput;
  /** 1..300 s; the coordinator rejects longer-lived tokens. */
  ttlSeconds?: number;
}

/** A compact EdDSA JWT: iss = sub = site, aud = federation, iat, exp, random jti (single use). */
export async function signSiteToken(opts: SiteTokenOptions): Promise<string> {
  const ttl = opts.ttlSeconds ?? DEFAULT_TOKEN_TTL_SECONDS;
  if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_TOKEN_TTL_SECONDS) {
    throw new Error(`ttlSeconds must be an integer in 1..${MAX_TOKEN_TTL_SECONDS}, got ${ttl}`);
  }
  const iat = Math.floor(Date.now() / 1000);
  return new SignJWT({})
    .setProtectedHeader({ alg: 'EdDSA', typ: 'JWT' })
    .setIssuer(opts.siteName)
    .setSubject(opts.siteName)
    .setAudience(opts.federationId)
    .setIssuedAt(iat)
    .setExpirationTime(iat + ttl)
    .setJti(randomUUID())
    .sign(toPrivateKey(opts.privateKey));
}

/** Metadata carrying a fresh token, for callers that build Metadata themselves. */
export async function siteAuthMetadata(opts: SiteTokenOptions, base?: grpc.Metadata): Promise<grpc.Metadata> {
  const md = base ?? new grpc.Metadata();
  md.set(AUTH_METADATA_KEY, `Bearer ${await signSiteToken(opts)}`);
  return md;
}

/**
 * Per-call credentials that sign a fresh token for every call (a jti is single-use, so a token cannot be reused
 * across calls or retries). Compose with TLS channel credentials:
 * `grpc.credentials.combineChannelCredentials(tlsCreds, siteCallCredentials(...))`.
 */
export function siteCallCredentials(opts: SiteTokenOptions): grpc.CallCredentials {
  const privateKey = toPrivateKey(opts.privateKey); // parse once, fail early on a bad key
  return grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    siteAuthMetadata({ ...opts, privateKey }).then(
      (md) => callback(null, md),
      (err: unknown) => callback(err instanceof Error ? err : new Error(String(err))),
    );
  });
}

/** Ed25519 signature (64 bytes) over the manifest bytes. */
export function signManifest(coordinatorPrivateKey: PrivateKeyInput, bytes: Uint8Array): Buffer {
  return cryptoSign(null, bytes, toPrivateKey(coordinatorPrivateKey));
}

/** True only for a valid signature; malformed keys or signatures give false rather than throwing. */
export function verifyManifest(publicKeyRaw: Uint8Array, bytes: Uint8Array, signature: Uint8Array): boolean {
  try {
    return cryptoVerify(null, bytes, publicKeyFromRaw(publicKeyRaw), signature);
  } catch {
    return false;
  }
}
