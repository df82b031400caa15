/**
 * The EdDSA JWT check (coordinator/auth/ed25519-jwt.ts, with the signature checked on this thread and on libuv's
 * pool) against jose's jwtVerify with the options the
 * interceptor used to pass (algorithms ['EdDSA'], 30 s clock tolerance, a fixed current date): on random tokens,
 * valid and broken, both give the same verdict and, when they accept, the same claims. The only tokens where they
 * may differ are the ones the module refuses on purpose and jose lets through: a segment that is not the one
 * canonical unpadded base64url spelling, and a header with `crit` or `b64`.
 */
import fc from 'fast-check';
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { jwtVerify } from 'jose';
import { describe, expect, it } from 'vitest';
import { JwtCheckError, verifyEd25519Jwt, verifyEd25519JwtOffLoop } from '../../coordinator/auth/ed25519-jwt.ts';

const NOW = 1_900_000_000;
const TOLERANCE = 30;
const RUNS = 400;

const site = generateKeyPairSync('ed25519');
const other = generateKeyPairSync('ed25519');
const BASE64URL_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

const b64 = (s: string | Buffer): string => Buffer.from(s).toString('base64url');

function signed(header: string, payload: string, key: KeyObject): string {
  const input = `${header}.${payload}`;
  return `${input}.${b64(sign(null, Buffer.from(input), key))}`;
}

/** The module's documented stricter refusals, decided here from the token alone. */
function refusedOnPurpose(token: string): boolean {
  const segments = token.split('.');
  if (segments.length !== 3) return false;
  if (segments.some((s) => !/^[A-Za-z0-9_-]*$/.test(s) || Buffer.from(s, 'base64url').toString('base64url') !== s)) return true;
  try {
    const header = JSON.parse(Buffer.from(segments[0]!, 'base64url').toString('utf8')) as Record<string, unknown>;
    return Object.hasOwn(header, 'crit') || Object.hasOwn(header, 'b64');
  } catch {
    return false;
  }
}

type Verdict = { ok: true; claims: unknown } | { ok: false; why: string };

/** The same check with the signature on libuv's pool (what the interceptor runs); must agree with the synchronous one. */
async function oursOffLoop(token: string, key: KeyObject): Promise<Verdict> {
  try {
    return { ok: true, claims: await verifyEd25519JwtOffLoop(token, key, { nowSec: NOW, clockToleranceS: TOLERANCE }) };
  } catch (e) {
    if (!(e instanceof JwtCheckError)) throw e;
    return { ok: false, why: `${e.kind}: ${e.message}` };
  }
}

function ours(token: string, key: KeyObject): Verdict {
  try {
    return { ok: true, claims: verifyEd25519Jwt(token, key, { nowSec: NOW, clockToleranceS: TOLERANCE }) };
  } catch (e) {
    if (!(e instanceof JwtCheckError)) throw e;
    return { ok: false, why: `${e.kind}: ${e.message}` };
  }
}

async function jose(token: string, key: KeyObject): Promise<Verdict> {
  try {
    const { payload } = await jwtVerify(token, key, { algorithms: ['EdDSA'], clockTolerance: TOLERANCE, currentDate: new Date(NOW * 1000) });
    return { ok: true, claims: payload };
  } catch (e) {
    return { ok: false, why: (e as Error).message };
  }
}

const timeClaim = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: NOW - 500, max: NOW + 500 }) },
  { weight: 1, arbitrary: fc.constantFrom<unknown>('1900000000', null, true, 1.5e9 + 0.5, [NOW]) },
);

const wildClaimsArb = fc.record(
  {
    iss: fc.constantFrom('alpha', 'beta', ''),
    sub: fc.constant('alpha'),
    aud: fc.constantFrom<unknown>('fed', ['fed']),
    iat: timeClaim,
    nbf: timeClaim,
    exp: timeClaim,
    jti: fc.uuid(),
    extra: fc.jsonValue({ maxDepth: 2 }),
  },
  { requiredKeys: ['jti'] },
);

const wildHeaderArb = fc.record(
  {
    alg: fc.constantFrom<unknown>('EdDSA', 'EdDSA', 'EdDSA', 'EdDSA', 'none', 'HS256', 'Ed25519', 'ES256', 'eddsa', '', null),
    typ: fc.constantFrom('JWT', 'jwt', 'at+jwt'),
    kid: fc.string({ maxLength: 8 }),
    crit: fc.constantFrom<unknown>(['b64'], ['exp'], [], 'b64'),
    b64: fc.boolean(),
  },
  { requiredKeys: [] },
);

/** Mostly what a site sends (times near now, some just outside the tolerance), sometimes anything. */
const claimsArb = fc.oneof(
  {
    weight: 3,
    arbitrary: fc.record({
      iss: fc.constant('alpha'),
      iat: fc.integer({ min: NOW - 100, max: NOW + 40 }),
      exp: fc.integer({ min: NOW - 60, max: NOW + 300 }),
      jti: fc.uuid(),
    }),
  },
  { weight: 1, arbitrary: wildClaimsArb },
);

const headerArb = fc.oneof({ weight: 3, arbitrary: fc.constant<Record<string, unknown>>({ alg: 'EdDSA', typ: 'JWT' }) }, { weight: 2, arbitrary: wildHeaderArb });

/** How a signed token is broken afterwards (or not). */
const mutationArb = fc.oneof(
  { weight: 6, arbitrary: fc.constant({ kind: 'none' as const }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('replace' as const), at: fc.nat(), char: fc.constantFrom(...`${BASE64URL_CHARS}.=+/ `) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), char: fc.constantFrom(...`${BASE64URL_CHARS}.=+/ `) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('delete' as const), at: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('append' as const), tail: fc.constantFrom('=', '==', 'A', 'AA', '.', '.e30', '.x.y') }) },
);

type Mutation = { kind: 'none' } | { kind: 'replace' | 'insert'; at: number; char: string } | { kind: 'delete'; at: number } | { kind: 'append'; tail: string };

function mutate(token: string, m: Mutation): string {
  switch (m.kind) {
    case 'none':
      return token;
    case 'replace': {
      const at = m.at % token.length;
      return token.slice(0, at) + m.char + token.slice(at + 1);
    }
    case 'insert': {
      const at = m.at % (token.length + 1);
      return token.slice(0, at) + m.char + token.slice(at);
    }
    case 'delete': {
      const at = m.at % token.length;
      return token.slice(0, at) + token.slice(at + 1);
    }
    case 'append':
      return token + m.tail;
  }
}

describe('ed25519-jwt against jose', () => {
  it('gives jose’s verdict and claims on random tokens, valid and broken', async () => {
    let accepted = 0;
    let refused = 0;
    await fc.assert(
      fc.asyncProperty(headerArb, claimsArb, fc.nat(4).map((n) => n === 0), mutationArb, async (header, claims, byOtherKey, mutation) => {
        const token = mutate(signed(b64(JSON.stringify(header)), b64(JSON.stringify(claims)), byOtherKey ? other.privateKey : site.privateKey), mutation);
        const mine = ours(token, site.publicKey);
        expect(await oursOffLoop(token, site.publicKey)).toEqual(mine);
        const theirs = await jose(token, site.publicKey);
        if (mine.ok) accepted++;
        else refused++;
        if (!theirs.ok || !refusedOnPurpose(token)) {
          expect({ ok: mine.ok, claims: mine.ok ? mine.claims : undefined }, `token ${token}: ours ${JSON.stringify(mine)}, jose ${JSON.stringify(theirs)}`).toEqual({
            ok: theirs.ok,
            claims: theirs.ok ? theirs.claims : undefined,
          });
        } else {
          expect(mine.ok, `token ${token} is refused on purpose`).toBe(false);
        }
      }),
      { numRuns: RUNS },
    );
    // The generators must exercise both outcomes, or the comparison proves little.
    expect(accepted).toBeGreaterThan(RUNS / 20);
    expect(refused).toBeGreaterThan(RUNS / 4);
  });

  it('agrees at the edges of the clock tolerance', async () => {
    const header = b64(JSON.stringify({ alg: 'EdDSA' }));
    for (const [claim, offset] of [
      ['exp', -TOLERANCE],
      ['exp', -TOLERANCE + 1],
      ['nbf', TOLERANCE],
      ['nbf', TOLERANCE + 1],
      ['iat', TOLERANCE + 100],
    ] as const) {
      const token = signed(header, b64(JSON.stringify({ [claim]: NOW + offset })), site.privateKey);
      const mine = ours(token, site.publicKey);
      const theirs = await jose(token, site.publicKey);
      expect(mine.ok, `${claim} now${offset >= 0 ? '+' : ''}${offset}`).toBe(theirs.ok);
    }
  });

  it('refuses a key that is not an Ed25519 public key instead of checking with it', () => {
    const token = signed(b64(JSON.stringify({ alg: 'EdDSA' })), b64('{}'), site.privateKey);
    expect(() => verifyEd25519Jwt(token, site.privateKey, { nowSec: NOW, clockToleranceS: TOLERANCE })).toThrow(TypeError);
    expect(() => verifyEd25519Jwt(token, generateKeyPairSync('x25519').publicKey, { nowSec: NOW, clockToleranceS: TOLERANCE })).toThrow(TypeError);
    expect(verifyEd25519Jwt(token, site.publicKey, { nowSec: NOW, clockToleranceS: TOLERANCE })).toEqual({});
  });
});
