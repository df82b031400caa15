/**
 * Hostile site tokens, one row each, through the interceptor's whole check (verifySiteToken, ed25519-jwt.ts
 * underneath): every one is refused with the AuthError code and the wording a site or an operator got before the
 * signature check moved off jose, and none reaches the replay window. Tokens are built byte by byte here (not with
 * jose), so encodings no signer would produce can be tried.
 */
import * as grpc from '@grpc/grpc-js';
import { createHmac, randomUUID, sign, type KeyObject } from 'node:crypto';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { AuthError, verifySiteToken } from '../../coordinator/auth/interceptor.ts';
import { AUTH_METADATA_KEY } from '../../shared/protocol/grpc.ts';
import { generateSiteKeyPair, signSiteToken, toPrivateKey } from '../../shared/security/site-identity.ts';
import { MemorySiteDirectory } from '../helpers/memory-site-directory.ts';

const FED = 'fed-hostile';
const NOW = 1_900_000_000;
const U = grpc.status.UNAUTHENTICATED;

const alpha = generateSiteKeyPair();
const beta = generateSiteKeyPair();
const stranger = generateSiteKeyPair();
const alphaKey = toPrivateKey(alpha.privateKeyPem);

const b64 = (s: string | Buffer): string => Buffer.from(s).toString('base64url');
const json = (o: unknown): string => b64(JSON.stringify(o));

function claims(over: Record<string, unknown> = {}): Record<string, unknown> {
  return { iss: 'alpha', sub: 'alpha', aud: FED, iat: NOW, exp: NOW + 120, jti: randomUUID(), ...over };
}

/** `header.payload.signature` with an Ed25519 signature over exactly the first two segments as given. */
function signed(header: string, payload: string, key: KeyObject = alphaKey): string {
  const input = `${header}.${payload}`;
  return `${input}.${b64(sign(null, Buffer.from(input), key))}`;
}

const good = (over: Record<string, unknown> = {}): string => signed(json({ alg: 'EdDSA', typ: 'JWT' }), json(claims(over)));

function bearer(token: string): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set(AUTH_METADATA_KEY, `Bearer ${token}`);
  return md;
}

function directory(): MemorySiteDirectory {
  const d = new MemorySiteDirectory(() => NOW);
  d.addSite('alpha', alpha.publicKeyRaw);
  d.addSite('beta', beta.publicKeyRaw);
  return d;
}

/** Swaps one character of a base64url segment for another that still decodes (so the token stays well-formed). */
function tamper(segment: string, at: number): string {
  const c = segment[at]!;
  return segment.slice(0, at) + (c === 'A' ? 'B' : 'A') + segment.slice(at + 1);
}

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** Claims whose standard base64 holds '+' or '/', which base64url spells '-' and '_'. */
function standardBase64Claims(): string {
  for (let i = 0; ; i++) {
    const std = Buffer.from(JSON.stringify(claims({ jti: `~~~?${i}` }))).toString('base64').replace(/=+$/, '');
    if (/[+/]/.test(std)) return std;
  }
}

/** What the log says of a signature that does not verify; the caller is told only HIDDEN (it cannot tell an unknown name). */
const BAD_SIGNATURE = /token signature does not verify with the key registered for site 'alpha'/;
const HIDDEN = /^token not accepted for site '(alpha|zeta)': no enrolled site of that name holds the key that signed it/;

interface Row {
  name: string;
  token: () => string;
  code?: grpc.status;
  message: RegExp;
  /** Set up the directory first (replays, revocation). */
  before?: (d: MemorySiteDirectory) => Promise<void> | void;
}

const ROWS: Row[] = [
  {
    name: "alg 'none' with an empty signature",
    token: () => `${json({ alg: 'none', typ: 'JWT' })}.${json(claims())}.`,
    message: /token alg 'none' is not allowed: site tokens must be signed with EdDSA/,
  },
  {
    name: 'alg HS256 keyed with the site public key (algorithm confusion)',
    token: () => {
      const input = `${json({ alg: 'HS256', typ: 'JWT' })}.${json(claims())}`;
      return `${input}.${b64(createHmac('sha256', alpha.publicKeyRaw).update(input).digest())}`;
    },
    message: /token alg 'HS256' is not allowed/,
  },
  { name: "alg 'Ed25519' (jose's other name for it)", token: () => signed(json({ alg: 'Ed25519' }), json(claims())), message: /token alg 'Ed25519' is not allowed/ },
  { name: "alg 'eddsa' (case differs)", token: () => signed(json({ alg: 'eddsa' }), json(claims())), message: /token alg 'eddsa' is not allowed/ },
  { name: 'no alg at all', token: () => signed(json({ typ: 'JWT' }), json(claims())), message: /token alg 'undefined' is not allowed/ },
  { name: 'signed by another enrolled site, claiming alpha', token: () => signed(json({ alg: 'EdDSA' }), json(claims()), toPrivateKey(beta.privateKeyPem)), message: BAD_SIGNATURE },
  { name: 'signed by a key no site holds', token: () => signed(json({ alg: 'EdDSA' }), json(claims()), toPrivateKey(stranger.privateKeyPem)), message: BAD_SIGNATURE },
  {
    name: 'tampered payload (one character, still valid base64url)',
    token: () => {
      const [h, p, s] = good().split('.') as [string, string, string];
      return `${h}.${tamper(p, 10)}.${s}`;
    },
    message: /malformed token|token signature does not verify/,
  },
  {
    name: 'payload swapped for another valid one, signature kept',
    token: () => {
      const [h, , s] = good().split('.') as [string, string, string];
      return `${h}.${json(claims({ exp: NOW + 60 }))}.${s}`;
    },
    message: BAD_SIGNATURE,
  },
  {
    name: 'tampered header (a kid added after signing)',
    token: () => {
      const [, p, s] = good().split('.') as [string, string, string];
      return `${json({ alg: 'EdDSA', typ: 'JWT', kid: 'x' })}.${p}.${s}`;
    },
    message: BAD_SIGNATURE,
  },
  {
    name: 'signature with one bit flipped',
    token: () => {
      const [h, p, s] = good().split('.') as [string, string, string];
      const sig = Buffer.from(s, 'base64url');
      sig[5]! ^= 1;
      return `${h}.${p}.${b64(sig)}`;
    },
    message: BAD_SIGNATURE,
  },
  { name: 'signature cut to 63 bytes', token: () => { const [h, p, s] = good().split('.') as [string, string, string]; return `${h}.${p}.${b64(Buffer.from(s, 'base64url').subarray(0, 63))}`; }, message: BAD_SIGNATURE },
  { name: 'empty signature with alg EdDSA', token: () => { const [h, p] = good().split('.') as [string, string]; return `${h}.${p}.`; }, message: BAD_SIGNATURE },
  { name: 'trailing garbage after the signature (canonical: 65 bytes)', token: () => `${good()}AA`, message: BAD_SIGNATURE },
  { name: 'trailing garbage after the signature (not base64url)', token: () => `${good()}!`, message: /malformed token: its signature is not base64url/ },
  { name: 'an extra segment', token: () => `${good()}.${b64('more')}`, message: /malformed token: it has 4 '\.'-separated parts, a compact JWT has 3/ },
  { name: 'five segments (JWE shape)', token: () => `${good()}.a.b`, message: /malformed token: it has 5 '\.'-separated parts/ },
  { name: 'two segments', token: () => good().split('.').slice(0, 2).join('.'), message: /malformed token: it has 2 '\.'-separated parts/ },
  { name: "padded signature ('=')", token: () => `${good()}=`, message: /malformed token: its signature is not base64url/ },
  {
    name: 'non-canonical signature (same bytes, other trailing bits)',
    token: () => {
      const t = good();
      // 64 bytes are 86 characters; the last one carries 4 unused bits, which must be zero.
      return t.slice(0, -1) + ALPHABET[ALPHABET.indexOf(t.at(-1)!) | 1]!;
    },
    message: /malformed token: its signature is not canonical base64url/,
  },
  {
    name: 'non-canonical header (signed as sent)',
    token: () => {
      // {"alg":"EdDSA","x":12} is 22 bytes = 30 characters, the last carrying 4 unused bits.
      const h = json({ alg: 'EdDSA', x: 12 });
      const odd = h.slice(0, -1) + ALPHABET[ALPHABET.indexOf(h.at(-1)!) | 1]!;
      return signed(odd, json(claims()));
    },
    message: /malformed token: its header is not canonical base64url/,
  },
  { name: "standard base64 ('+' or '/') in the payload", token: () => signed(json({ alg: 'EdDSA' }), standardBase64Claims()), message: /malformed token: its payload is not base64url/ },
  { name: 'header longer than the token limit', token: () => signed(json({ alg: 'EdDSA', pad: 'x'.repeat(5000) }), json(claims())), message: /malformed token: longer than 4096 characters/ },
  { name: 'a large header under the limit (signed by another key)', token: () => signed(json({ alg: 'EdDSA', pad: 'x'.repeat(2500) }), json(claims()), toPrivateKey(beta.privateKeyPem)), message: BAD_SIGNATURE },
  { name: 'header is a JSON array', token: () => signed(b64('["EdDSA"]'), json(claims())), message: /malformed token: its header is not a JSON object/ },
  { name: 'payload is not JSON', token: () => signed(json({ alg: 'EdDSA' }), b64('iss=alpha')), message: /malformed token: its payload is not UTF-8 JSON/ },
  { name: 'payload is not UTF-8', token: () => signed(json({ alg: 'EdDSA' }), b64(Buffer.from([0x7b, 0x22, 0xff, 0x22, 0x3a, 0x31, 0x7d]))), message: /malformed token: its payload is not UTF-8 JSON/ },
  { name: "crit ['b64'] with b64: false (unencoded payload)", token: () => signed(json({ alg: 'EdDSA', crit: ['b64'], b64: false }), json(claims())), message: /invalid token: the 'crit' header parameter is not accepted/ },
  { name: 'crit naming an unknown extension', token: () => signed(json({ alg: 'EdDSA', crit: ['exp'], exp: 1 }), json(claims())), message: /invalid token: the 'crit' header parameter is not accepted/ },
  { name: 'b64: false without crit', token: () => signed(json({ alg: 'EdDSA', b64: false }), json(claims())), message: /invalid token: the 'b64' header parameter is not accepted/ },
  { name: 'expired', token: () => good({ iat: NOW - 400, exp: NOW - 120 }), message: /token expired at \d{4}-\d\d-\d\dT.*\(coordinator time .*\) — check the site clock/ },
  { name: 'expired just past the clock tolerance', token: () => good({ iat: NOW - 200, exp: NOW - 30 }), message: /token expired at/ },
  { name: 'not yet valid (nbf ahead of the tolerance)', token: () => good({ nbf: NOW + 31 }), message: /token claim 'nbf' is invalid: "nbf" claim timestamp check failed — check the site clock/ },
  { name: 'nbf not a number', token: () => good({ nbf: '0' }), message: /token claim 'nbf' is invalid: "nbf" claim must be a number/ },
  { name: 'exp not a number', token: () => good({ exp: `${NOW + 60}` }), message: /token claim 'exp' is invalid: "exp" claim must be a number/ },
  { name: 'iat not a number', token: () => good({ iat: null }), message: /token claim 'iat' is invalid: "iat" claim must be a number/ },
  { name: 'issued in the future', token: () => good({ iat: NOW + 120, exp: NOW + 180 }), message: /token issued in the future .* check the site clock/ },
  { name: 'lifetime over 5 minutes', token: () => good({ iat: NOW, exp: NOW + 301 }), message: /token lifetime 301 s exceeds the 300 s maximum/ },
  { name: 'exp far away (1e400 parses as Infinity)', token: () => signed(json({ alg: 'EdDSA' }), b64(JSON.stringify(claims()).replace(/"exp":\d+/, '"exp":1e400'))), message: /token lifetime Infinity s exceeds/ },
  { name: 'no exp', token: () => good({ exp: undefined }), message: /token has no 'exp' claim/ },
  { name: 'no iat', token: () => good({ iat: undefined }), message: /token has no 'iat' claim/ },
  { name: 'no iss', token: () => good({ iss: undefined }), message: /token has no 'iss' \(site name\) claim/ },
  { name: 'wrong audience', token: () => good({ aud: 'other-fed' }), message: /token audience 'other-fed' is not this federation 'fed-hostile'/ },
  { name: 'audience as an array holding this federation', token: () => good({ aud: [FED] }), message: /token audience 'fed-hostile' is not this federation/ },
  { name: 'sub differs from iss', token: () => good({ sub: 'beta' }), message: /'sub' 'beta' differs from 'iss' 'alpha'/ },
  { name: 'unknown site (signed by its own key)', token: () => signed(json({ alg: 'EdDSA' }), json(claims({ iss: 'zeta', sub: 'zeta' })), toPrivateKey(stranger.privateKeyPem)), message: /unknown site 'zeta' — enrol it/ },
  { name: 'no jti', token: () => good({ jti: undefined }), message: /token has no usable 'jti' claim/ },
  { name: 'jti longer than 128 characters', token: () => good({ jti: 'j'.repeat(129) }), message: /token has no usable 'jti' claim/ },
  {
    name: 'replayed jti',
    token: () => good({ jti: 'spent-once' }),
    before: async (d) => {
      await verifySiteToken(bearer(good({ jti: 'spent-once' })), { federationId: FED, directory: d, nowSec: NOW });
    },
    message: /token replayed \(jti seen before\) — every call needs a freshly signed token/,
  },
  { name: 'revoked site', token: () => good(), before: (d) => d.revoke('alpha'), code: grpc.status.PERMISSION_DENIED, message: /site 'alpha' is revoked — ask the coordinator admin to re-enrol it/ },
];

afterEach(() => {
  vi.restoreAllMocks();
});

describe('hostile site tokens', () => {
  it('a well-formed token passes, so each refusal below is for its own reason', async () => {
    await expect(verifySiteToken(bearer(good()), { federationId: FED, directory: directory(), nowSec: NOW })).resolves.toBe('alpha');
    const fromSigner = await signSiteToken({ siteName: 'alpha', federationId: FED, privateKey: alpha.privateKeyPem });
    await expect(verifySiteToken(bearer(fromSigner), { federationId: FED, directory: directory() })).resolves.toBe('alpha');
  });

  it.each(ROWS)('$name', async (row) => {
    const d = directory();
    await row.before?.(d);
    const spentBefore = d.jtiCount;
    const error = await verifySiteToken(bearer(row.token()), { federationId: FED, directory: d, nowSec: NOW }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error, 'the token must be refused').toBeInstanceOf(AuthError);
    const e = error as AuthError;
    expect(grpc.status[e.code]).toBe(grpc.status[row.code ?? U]);
    expect(e.message).toMatch(row.message);
    // A bad signature and an unknown name read the same to the caller.
    if (/does not verify|unknown site/.test(e.message)) expect(e.callerMessage).toMatch(HIDDEN);
    else expect(e.callerMessage).toBe(e.message);
    expect(d.jtiCount, 'a refused token must not spend a token id').toBe(spentBefore);
  });

  it('an unknown name and a wrong key are told the same thing', async () => {
    const opts = { federationId: FED, directory: directory(), nowSec: NOW };
    const unknown = (await verifySiteToken(bearer(signed(json({ alg: 'EdDSA' }), json(claims({ iss: 'zeta', sub: 'zeta' })), toPrivateKey(stranger.privateKeyPem))), opts).catch((e: AuthError) => e)) as AuthError;
    const wrongKey = (await verifySiteToken(bearer(signed(json({ alg: 'EdDSA' }), json(claims()), toPrivateKey(stranger.privateKeyPem))), opts).catch((e: AuthError) => e)) as AuthError;
    expect(unknown.callerMessage.replaceAll("'zeta'", 'NAME')).toBe(wrongKey.callerMessage.replaceAll("'alpha'", 'NAME'));
  });

  it('checks the signature without WebCrypto (one synchronous crypto.verify per call)', async () => {
    const subtle = vi.spyOn(globalThis.crypto.subtle, 'verify');
    await expect(verifySiteToken(bearer(good()), { federationId: FED, directory: directory(), nowSec: NOW })).resolves.toBe('alpha');
    await expect(verifySiteToken(bearer(signed(json({ alg: 'EdDSA' }), json(claims({ iss: 'zeta', sub: 'zeta' })))), { federationId: FED, directory: directory(), nowSec: NOW })).rejects.toThrow();
    expect(subtle).not.toHaveBeenCalled();
  });
});
