/**
 * Enrolment at the service layer (the Enrollment handlers over a real store): weak Ed25519 keys are refused
 * before the token is used, a forged signature for such a key authenticates nothing, and a caller without the
 * right token cannot tell which site names exist.
 */
import * as grpc from '@grpc/grpc-js';
import { base64url } from 'jose';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { enrollmentHandlers } from '../../coordinator/server/enrollment-service.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { verifySiteToken, type SiteDirectory } from '../../coordinator/auth/interceptor.ts';
import { InProcessBus } from '../../shared/events/bus.ts';
import { AUTH_METADATA_KEY } from '../../shared/protocol/grpc.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { generateSiteKeyPair, signSiteToken, weakEd25519PublicKeyReason } from '../../shared/security/site-identity.ts';

const FED = 'fed-enrol-keys';
const TOKEN = 'site-w.' + 'k'.repeat(32);
const hex = (h: string) => Buffer.from(h, 'hex');

/** The 8 small-order points of Ed25519, canonical encodings (identity, order 2, two of order 4, four of order 8). */
const SMALL_ORDER = [
  '0100000000000000000000000000000000000000000000000000000000000000',
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  '0000000000000000000000000000000000000000000000000000000000000000',
  '0000000000000000000000000000000000000000000000000000000000000080',
  '26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05',
  '26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85',
  'c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a',
  'c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa',
];
/** y ≥ p = 2^255 − 19 (p itself ≡ 0, p + 1 ≡ the identity, 2^255 − 1), and x = "−0" for y = 1. */
const NON_CANONICAL = [
  'edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  'eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  'ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  'f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff',
  '0100000000000000000000000000000000000000000000000000000000000080',
];

let work: string;
let store: CoordinatorStore;
let handlers: grpc.UntypedServiceImplementation;

beforeEach(() => {
  work = mkdtempSync(join(tmpdir(), 'medfl-enrol-keys-'));
  store = new CoordinatorStore(join(work, 'state.db'));
  store.inviteSite('site-w', sha256Hex(TOKEN), Date.now() + 60_000);
  handlers = enrollmentHandlers({ store, federationId: FED, coordinatorPublicKey: generateSiteKeyPair().publicKeyRaw, bus: new InProcessBus(), log: pino({ level: 'silent' }) });
});
afterEach(() => {
  store.close();
  rmSync(work, { recursive: true, force: true });
});

/** One Enroll call through the service handler, as grpc-js would make it. */
function enroll(req: Record<string, unknown>): Promise<{ err: Partial<grpc.StatusObject> | null; res?: Record<string, unknown> }> {
  return new Promise((resolve) => {
    const enrollFn = handlers.Enroll as (call: { request: unknown }, cb: (err: Partial<grpc.StatusObject> | null, res?: Record<string, unknown>) => void) => void;
    enrollFn({ request: req }, (err, res) => resolve({ err, res }));
  });
}

/** The coordinator's view of enrolled sites (as coordinator.ts builds it from the store). */
const directory = (): SiteDirectory => ({
  getSite(name) {
    const s = store.getSite(name);
    if (!s || !s.publicKey || s.state === 'invited') return undefined;
    return { publicKeyRaw: s.publicKey, revoked: s.state === 'revoked' };
  },
  consumeJti: (jti, exp) => store.consumeJti(jti, exp),
});

/** A token "signed" with R = identity, S = 0: it verifies under the identity key for any message. */
function forgedToken(site: string): string {
  const now = Math.floor(Date.now() / 1000);
  const enc = (o: object) => base64url.encode(JSON.stringify(o));
  const header = enc({ alg: 'EdDSA', typ: 'JWT' });
  const payload = enc({ iss: site, sub: site, aud: FED, iat: now, exp: now + 60, jti: `forged-${Math.random()}` });
  return `${header}.${payload}.${base64url.encode(Buffer.concat([hex(SMALL_ORDER[0]!), Buffer.alloc(32)]))}`;
}

const bearer = (token: string) => {
  const md = new grpc.Metadata();
  md.set(AUTH_METADATA_KEY, `Bearer ${token}`);
  return md;
};

describe('weak Ed25519 keys at enrolment', () => {
  it.each([...SMALL_ORDER.map((h) => ['small-order', h]), ...NON_CANONICAL.map((h) => ['non-canonical', h])])('refuses a %s key %s, leaving the token unused', async (kind, h) => {
    const { err } = await enroll({ siteName: 'site-w', token: TOKEN, publicKey: hex(h) });
    expect(err).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(err!.details).toMatch(kind === 'small-order' ? /public_?[kK]ey: weak Ed25519 key refused: it is a small-order point/ : /public_?[kK]ey: weak Ed25519 key refused: it is (a small-order point|not canonically encoded)/);
    expect(err!.details).toMatch(/the token was not used/);
    expect(store.getSite('site-w')).toMatchObject({ state: 'invited', publicKey: null });
  });

  it('a forged signature for the identity key cannot authenticate: the key is refused, the site stays unenrolled, and a proper key still enrols', async () => {
    const { err } = await enroll({ siteName: 'site-w', token: TOKEN, publicKey: hex(SMALL_ORDER[0]!) });
    expect(err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    await expect(verifySiteToken(bearer(forgedToken('site-w')), { federationId: FED, directory: directory() })).rejects.toThrow(/unknown site 'site-w'/);

    // The token was not spent on the refused key.
    const good = generateSiteKeyPair();
    const ok = await enroll({ siteName: 'site-w', token: TOKEN, publicKey: good.publicKeyRaw });
    expect(ok.err).toBeNull();
    expect(ok.res).toMatchObject({ siteName: 'site-w', federationId: FED });
    const real = await signSiteToken({ siteName: 'site-w', federationId: FED, privateKey: good.privateKeyPem });
    await expect(verifySiteToken(bearer(real), { federationId: FED, directory: directory() })).resolves.toBe('site-w');
    await expect(verifySiteToken(bearer(forgedToken('site-w')), { federationId: FED, directory: directory() })).rejects.toThrow(/signature does not verify/);
  });

  it('a weak key already in the store (enrolled before this check) authenticates nothing', async () => {
    expect(store.enrolSite('site-w', sha256Hex(TOKEN), hex(SMALL_ORDER[0]!))).toEqual({ ok: true });
    await expect(verifySiteToken(bearer(forgedToken('site-w')), { federationId: FED, directory: directory() })).rejects.toThrow(
      /site 'site-w' has an unusable registered key \(refusing this Ed25519 public key: it is a small-order point.*re-enrol the site/,
    );
  });

  it('generated keys pass the check', () => {
    for (let i = 0; i < 20; i++) expect(weakEd25519PublicKeyReason(generateSiteKeyPair().publicKeyRaw)).toBeNull();
    expect(weakEd25519PublicKeyReason(Buffer.alloc(31))).toMatch(/32 bytes, got 31/);
  });
});

describe('enrolment errors to an unauthenticated caller', () => {
  it('read the same for an unknown site and a wrong token, so they do not reveal which sites exist', async () => {
    store.inviteSite('site-x', sha256Hex('site-x.' + 'x'.repeat(32)), Date.now() + 60_000);
    store.revokeSite('site-x');
    const key = generateSiteKeyPair().publicKeyRaw;
    const unknown = await enroll({ siteName: 'site-nobody', token: 'site-nobody.' + 'k'.repeat(32), publicKey: key });
    const wrong = await enroll({ siteName: 'site-w', token: 'site-w.' + 'z'.repeat(32), publicKey: key });
    const revokedWrong = await enroll({ siteName: 'site-x', token: 'site-x.' + 'z'.repeat(32), publicKey: key });
    for (const r of [unknown, wrong, revokedWrong]) expect(r.err?.code).toBe(grpc.status.UNAUTHENTICATED);
    const scrub = (d: string | undefined, name: string) => (d ?? '').replaceAll(name, 'NAME');
    expect(scrub(unknown.err?.details, 'site-nobody')).toBe(scrub(wrong.err?.details, 'site-w'));
    expect(scrub(revokedWrong.err?.details, 'site-x')).toBe(scrub(wrong.err?.details, 'site-w'));
    expect(wrong.err?.details).not.toMatch(/no site named|revoked/);
  });
});
