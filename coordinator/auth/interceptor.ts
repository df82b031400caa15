/**
 * Server interceptor that authenticates every Federation call by the site's bearer JWT (Enroll is exempt: its
 * one-time token is checked by the enrolment handler itself).
 *
 * Sequencing: verification happens in the listener's onReceiveMetadata hook and is async (the signature is checked on
 * libuv's thread pool, ed25519-jwt.ts; recording the token id waits for its commit). grpc-js does not
 * hand metadata to the handler until we call `next(metadata)`, and every built-in handler only starts reading
 * request messages (startRead) after it has the metadata. So until verification succeeds no handler code runs and
 * no request message is read, for unary, server-stream and client-stream methods alike. On failure we never call
 * `next`: we end the call with sendStatus, and the handler is never invoked.
 *
 * On success the client-sent AUTHENTICATED_SITE_KEY header is removed and replaced by the verified site name:
 * handlers read `call.metadata.get(AUTHENTICATED_SITE_KEY)[0]` and a site can only act as itself.
 *
 * mTLS (`clientCaPem` set, coordinator --mtls): the TLS layer asks for a client certificate but lets the handshake
 * complete without one, so that Enroll stays reachable for a site that has no certificate yet (see
 * serverCredentials' requestClientCert). Every other method is checked here, before the token: the connection must
 * carry a client certificate that TLS verified against the federation CA (grpc-js reports sslPeerCertificate only
 * then), that we verify again by hand (CA signature, dates, clientAuth), and whose CN is the site the token
 * authenticates, so a site cannot use another site's certificate. Revocation needs no CRL: a revoked site's token
 * is refused whatever certificate it presents.
 */
import * as grpc from '@grpc/grpc-js';
import { X509Certificate, generateKeyPairSync, type KeyObject } from 'node:crypto';
import type { Logger } from 'pino';
import { AUTH_METADATA_KEY, AUTHENTICATED_SITE_KEY, METHODS } from '../../shared/protocol/grpc.ts';
import { publicKeyFromRaw } from '../../shared/security/site-identity.ts';
import { verifyClientCertificate } from '../../shared/security/pki.ts';
import type { FailureLimiter } from './failure-limiter.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import { checkEdDsaHeader, checkTimeClaims, decodeCompactJwt, ed25519SignatureVerifies, JwtCheckError, type DecodedJwt } from './ed25519-jwt.ts';

/** Longest token lifetime (exp - iat) accepted, seconds. */
export const MAX_TOKEN_LIFETIME_S = 300;
/** Allowed clock difference between site and coordinator, seconds. */
export const CLOCK_TOLERANCE_S = 30;
/** Far above a real token (~300 bytes); stops a huge header from costing parse time. */
const MAX_TOKEN_CHARS = 4096;
const MAX_JTI_CHARS = 128;

export interface SiteRecord {
  publicKeyRaw: Buffer;
  revoked: boolean;
}

export interface SiteDirectory {
  getSite(name: string): SiteRecord | undefined;
  /**
   * Records a token id; returns (or resolves to) false if it was seen before (replay). Entries may be forgotten
   * after `expiresAtSec` (+ clock tolerance): an expired token is rejected anyway. A promise lets the directory
   * answer once the id is durable (the store commits ids in groups: coordinator/store/token-window.ts).
   * The interceptor passes `<site>/<jti>`, so one site cannot burn another site's ids.
   */
  consumeJti(jti: string, expiresAtSec: number): boolean | Promise<boolean>;
}

export interface AuthInterceptorOptions {
  /** The `aud` every token must carry. */
  federationId: string;
  directory: SiteDirectory;
  log?: Logger;
  /**
   * mTLS: the federation CA (PEM). When set, every call but Enroll must come over a connection with a client
   * certificate from this CA whose CN is the calling site. The server must request client certificates
   * (serverCredentials with requestClientCert or requireClientCert and this CA).
   */
  clientCaPem?: string;
  /**
   * Per-peer limit on failed calls (failure-limiter.ts): a peer over it is refused with RESOURCE_EXHAUSTED before
   * its token is parsed, and its failures are logged collapsed. Absent: no limit, one warn line per failure.
   */
  limiter?: FailureLimiter;
  /** Told of every failed check (an AuthError, or the coordinator's own error), e.g. for metrics; must not throw. */
  onFailure?: (error: unknown) => void;
}

/**
 * Verification failure: the gRPC status to end the call with and a message naming cause and fix (`message`, for the
 * coordinator's log and metrics). `callerMessage` is what the caller is told; it says less where the full reason
 * would tell an unauthenticated caller something (whether a site name is enrolled).
 */
export class AuthError extends Error {
  readonly callerMessage: string;
  constructor(
    readonly code: grpc.status.UNAUTHENTICATED | grpc.status.PERMISSION_DENIED | grpc.status.UNAVAILABLE,
    message: string,
    callerMessage?: string,
  ) {
    super(message);
    this.name = 'AuthError';
    this.callerMessage = callerMessage ?? message;
  }
}

/**
 * What a failed check ends the call with, as the caller may see it (`message` = `callerMessage`): an AuthError's
 * caller message; anything else is the coordinator's own fault (its site directory could not be read or written:
 * disk full, database locked), so UNAVAILABLE, which sites retry, and never an authentication failure.
 */
export function authFailure(err: unknown): AuthError {
  if (err instanceof AuthError) return err.callerMessage === err.message ? err : new AuthError(err.code, err.callerMessage);
  const why = isStorageFault(err) ? `its storage failed (${describeStorageFault(err)})` : `an internal error (${err instanceof Error ? err.message : String(err)})`;
  return new AuthError(grpc.status.UNAVAILABLE, `the coordinator could not check this call's token: ${why}; try again later`);
}

const unauth = (msg: string, callerMessage?: string): AuthError => new AuthError(grpc.status.UNAUTHENTICATED, msg, callerMessage);
const isoSec = (sec: number): string => new Date(sec * 1000).toISOString();

/**
 * One answer for "no such site", "its registered key is unusable" and "the signature does not verify", so a caller
 * without a site's key cannot tell an enrolled name from an invented one (the log keeps the real reason).
 */
export function notAcceptedFor(site: string): string {
  return `token not accepted for site '${site}': no enrolled site of that name holds the key that signed it — check the site's enrolment, and re-enrol the site if its key was replaced`;
}

/** A key no site holds: a token naming an unknown site is verified against it, so both cases cost one verification. */
let decoyKey: KeyObject | undefined;
function decoy(): KeyObject {
  decoyKey ??= generateKeyPairSync('ed25519').publicKey;
  return decoyKey;
}

/**
 * Site keys as KeyObjects, by their raw bytes. Building one per call (a JWK import) cost about as much as verifying
 * the signature; every site call would pay it. Keyed by the bytes, not the site,
 * so a re-enrolled site's new key is another entry and a revoked or replaced key is never looked up for it again.
 * Keys refused as weak are not kept (they throw every time).
 */
const siteKeys = new Map<string, KeyObject>();
/** Far above any federation's site count; past it the cache starts again rather than growing without bound. */
const MAX_CACHED_SITE_KEYS = 100_000;

function siteKey(raw: Buffer): KeyObject {
  const id = raw.toString('base64');
  let key = siteKeys.get(id);
  if (!key) {
    key = publicKeyFromRaw(raw);
    if (siteKeys.size >= MAX_CACHED_SITE_KEYS) siteKeys.clear();
    siteKeys.set(id, key);
  }
  return key;
}

/** The site a call's token claims, unverified ('' when none can be read): keys the failure limiter, nothing else. */
export function claimedSite(metadata: grpc.Metadata): string {
  const values = metadata.get(AUTH_METADATA_KEY);
  if (values.length !== 1) return '';
  const m = /^Bearer\s+(\S+)$/i.exec(String(values[0]).trim());
  if (!m || m[1]!.length > MAX_TOKEN_CHARS) return '';
  try {
    const iss = decodeCompactJwt(m[1]!).claims.iss;
    return typeof iss === 'string' ? iss : '';
  } catch {
    return '';
  }
}

/**
 * Verifies a bearer token from request metadata; returns the site name it authenticates.
 * Exported so other transports (or tests) can share the exact rules.
 */
export async function verifySiteToken(
  metadata: grpc.Metadata,
  opts: {
    federationId: string;
    directory: SiteDirectory;
    nowSec?: number;
    /** mTLS: the site named by the client certificate (its CN); the token must be that site's. */
    certificateSite?: string;
  },
): Promise<string> {
  const values = metadata.get(AUTH_METADATA_KEY);
  if (values.length === 0) {
    throw unauth(`missing '${AUTH_METADATA_KEY}: Bearer <token>' metadata — site calls must be made with the site's call credentials`);
  }
  if (values.length > 1) throw unauth(`more than one '${AUTH_METADATA_KEY}' header; send exactly one bearer token`);
  const header = String(values[0]);
  const m = /^Bearer\s+(\S+)$/i.exec(header.trim());
  if (!m) throw unauth(`'${AUTH_METADATA_KEY}' metadata is not of the form 'Bearer <token>'`);
  const token = m[1]!;
  if (token.length > MAX_TOKEN_CHARS) throw unauth(`malformed token: longer than ${MAX_TOKEN_CHARS} characters`);

  // Unverified peek, only to pick the algorithm check and the key; nothing here is trusted yet.
  let jwt: DecodedJwt;
  try {
    jwt = decodeCompactJwt(token);
  } catch (e) {
    throw unauth(`malformed token: ${(e as Error).message} — expected a compact JWT signed with the site key`);
  }
  try {
    checkEdDsaHeader(jwt.header);
  } catch (e) {
    if (e instanceof JwtCheckError && e.kind === 'algorithm') {
      throw unauth(`token alg '${String(jwt.header.alg)}' is not allowed: site tokens must be signed with EdDSA (the site's Ed25519 key)`);
    }
    throw unauth(`invalid token: ${(e as Error).message}`);
  }
  // The claims, as the site sent them; trusted only once the signature below has verified.
  const payload = jwt.claims;
  const site = payload.iss;
  if (typeof site !== 'string' || site === '') throw unauth(`token has no 'iss' (site name) claim`);
  const nowSec = opts.nowSec ?? Math.floor(Date.now() / 1000);
  const record = opts.directory.getSite(site);
  const hidden = notAcceptedFor(site);
  if (!record) {
    await ed25519SignatureVerifies(jwt, decoy());
    throw unauth(`unknown site '${site}' — enrol it with \`medfl site enroll\` (token from \`medfl coordinator site add\`)`, hidden);
  }

  let key: KeyObject;
  try {
    key = siteKey(record.publicKeyRaw);
  } catch (e) {
    await ed25519SignatureVerifies(jwt, decoy());
    throw unauth(`site '${site}' has an unusable registered key (${(e as Error).message}) — re-enrol the site`, hidden);
  }

  if (!(await ed25519SignatureVerifies(jwt, key))) {
    throw unauth(
      `token signature does not verify with the key registered for site '${site}' — ` +
        `the site key changed or someone else is using this name; re-enrol the site if its key was replaced`,
      hidden,
    );
  }
  try {
    checkTimeClaims(payload, nowSec, CLOCK_TOLERANCE_S);
  } catch (e) {
    if (!(e instanceof JwtCheckError)) throw e;
    if (e.kind === 'expired') {
      const exp = typeof payload.exp === 'number' ? isoSec(payload.exp) : '?';
      throw unauth(`token expired at ${exp} (coordinator time ${isoSec(nowSec)}) — check the site clock (NTP)`);
    }
    throw unauth(`token claim '${e.claim}' is invalid: ${e.message} — check the site clock (NTP)`);
  }

  // Signature verified: the claims below are the site's own statements.
  if (payload.aud !== opts.federationId) {
    const aud = Array.isArray(payload.aud) ? payload.aud.join(',') : String(payload.aud);
    throw unauth(`token audience '${aud}' is not this federation '${opts.federationId}' — the site is configured for another coordinator/federation`);
  }
  if (payload.sub !== site) throw unauth(`token 'sub' '${String(payload.sub)}' differs from 'iss' '${site}'; a site may only act as itself`);
  if (typeof payload.iat !== 'number') throw unauth(`token has no 'iat' claim`);
  if (typeof payload.exp !== 'number') throw unauth(`token has no 'exp' claim — site tokens must expire within ${MAX_TOKEN_LIFETIME_S} s`);
  if (payload.iat > nowSec + CLOCK_TOLERANCE_S) {
    throw unauth(`token issued in the future (${isoSec(payload.iat)}, coordinator time ${isoSec(nowSec)}) — check the site clock (NTP)`);
  }
  if (payload.exp - payload.iat > MAX_TOKEN_LIFETIME_S) {
    throw unauth(`token lifetime ${payload.exp - payload.iat} s exceeds the ${MAX_TOKEN_LIFETIME_S} s maximum — sign short-lived tokens`);
  }
  if (record.revoked) {
    throw new AuthError(grpc.status.PERMISSION_DENIED, `site '${site}' is revoked — ask the coordinator admin to re-enrol it`);
  }
  if (opts.certificateSite !== undefined && opts.certificateSite !== site) {
    throw unauth(
      `the client certificate names site '${opts.certificateSite}' but the token is for site '${site}' — ` +
        `a site must present its own certificate: check tls-client.pem in the site directory, or re-enrol the site`,
    );
  }
  const jti = payload.jti;
  if (typeof jti !== 'string' || jti === '' || jti.length > MAX_JTI_CHARS) throw unauth(`token has no usable 'jti' claim (unique token id)`);
  // Last: only an otherwise valid token consumes its id.
  if (!(await opts.directory.consumeJti(`${site}/${jti}`, payload.exp))) {
    throw unauth(`token replayed (jti seen before) — every call needs a freshly signed token`);
  }
  return site;
}

/** Message for a call without a usable client certificate on an mTLS coordinator: cause and fix. */
export const CLIENT_CERT_REQUIRED =
  'this coordinator requires a client certificate (mTLS); none issued by its CA was presented — ' +
  're-enrol the site or check tls-client.pem (and tls-client.key) in the site directory';

/**
 * mTLS check of one call: returns the site named by the client certificate. grpc-js reports the peer certificate
 * only when TLS verified it against the CA the server was given (a missing, foreign, expired or non-client
 * certificate reads as absent); we verify it again by hand, since TLS was told not to reject the handshake.
 */
export function clientCertificateSite(call: Pick<grpc.ServerInterceptingCallInterface, 'getAuthContext'>, ca: X509Certificate, nowMs = Date.now()): string {
  const peer = call.getAuthContext().sslPeerCertificate;
  if (!peer?.raw) throw unauth(CLIENT_CERT_REQUIRED);
  try {
    return verifyClientCertificate(peer.raw, ca, nowMs);
  } catch (e) {
    throw unauth(`${(e as Error).message} — this coordinator requires a client certificate (mTLS) issued by its CA; re-enrol the site or check tls-client.pem`);
  }
}

/**
 * The whole check of one site call — client certificate first under mTLS (cheap, and no token id is consumed by
 * a call that fails it), then the token — returning the site it authenticates or throwing an AuthError.
 */
export function siteCallAuthenticator(opts: AuthInterceptorOptions): (metadata: grpc.Metadata, authContext: grpc.ServerInterceptingCallInterface["getAuthContext"]) => Promise<string> {
  const { federationId, directory } = opts;
  const clientCa = opts.clientCaPem ? new X509Certificate(opts.clientCaPem) : undefined;
  return async (metadata, authContext) => {
    try {
      const certificateSite = clientCa ? clientCertificateSite({ getAuthContext: authContext }, clientCa) : undefined;
      return await verifySiteToken(metadata, { federationId, directory, certificateSite });
    } catch (e) {
      opts.onFailure?.(e);
      throw e;
    }
  };
}

export function createAuthInterceptor(opts: AuthInterceptorOptions): grpc.ServerInterceptor {
  const { log } = opts;
  const authenticate = siteCallAuthenticator(opts);
  return (method, call) => {
    if (method.path === METHODS.enroll) {
      // No site is authenticated on Enroll; still drop a client-sent identity header.
      const listener = new grpc.ServerListenerBuilder()
        .withOnReceiveMetadata((md, next) => {
          md.remove(AUTHENTICATED_SITE_KEY);
          next(md);
        })
        .build();
      return new grpc.ServerInterceptingCall(call, { start: (next) => next(listener) });
    }

    let done = false; // guards against ending the call twice (e.g. client cancelled during verification)
    const intercepting: grpc.ServerInterceptingCall = new grpc.ServerInterceptingCall(call, {
      start: (next) => {
        const listener = new grpc.ServerListenerBuilder()
          .withOnReceiveMetadata((metadata, nextMd) => {
            const peer = call.getPeer();
            // Failures are counted per (address, claimed site) so that one failing caller cannot lock out the other
            // sites behind its NAT address (failure-limiter.ts); the claim is unverified and keys nothing else.
            const claimant = opts.limiter ? claimedSite(metadata) : '';
            const refusal = opts.limiter?.refusal(peer, method.path, claimant);
            if (refusal !== undefined) {
              done = true;
              intercepting.sendStatus({ code: grpc.status.RESOURCE_EXHAUSTED, details: refusal, metadata: new grpc.Metadata() });
              return;
            }
            authenticate(metadata, () => call.getAuthContext())
              .then(
                (site) => {
                  if (done) return;
                  opts.limiter?.success(peer, site);
                  metadata.remove(AUTHENTICATED_SITE_KEY);
                  metadata.set(AUTHENTICATED_SITE_KEY, site);
                  log?.debug({ site, method: method.path }, 'site call authenticated');
                  nextMd(metadata);
                },
                (err: unknown) => {
                  if (done) return;
                  done = true;
                  const e = authFailure(err);
                  // The log keeps the whole reason; the caller gets only what it may know (e.callerMessage).
                  const reason = err instanceof AuthError ? err.message : e.message;
                  const info = { method: method.path, code: grpc.status[e.code], reason, claimant };
                  // The coordinator's own fault (UNAVAILABLE) is not the peer's: it does not count against it.
                  let over: string | undefined;
                  if (opts.limiter && e.code !== grpc.status.UNAVAILABLE) over = opts.limiter.failure(peer, info);
                  else log?.warn({ ...info, peer }, 'site call rejected');
                  if (over !== undefined) intercepting.sendStatus({ code: grpc.status.RESOURCE_EXHAUSTED, details: over, metadata: new grpc.Metadata() });
                  else intercepting.sendStatus({ code: e.code, details: e.callerMessage, metadata: new grpc.Metadata() });
                },
              );
          })
          .withOnCancel(() => {
            done = true;
          })
          .build();
        next(listener);
      },
    });
    return intercepting;
  };
}
