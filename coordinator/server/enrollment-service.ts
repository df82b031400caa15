/**
 * medfl.v1.Enrollment: a site trades its one-time token for a place in the federation by registering
 * its own Ed25519 public key. The token is stored only as a hash and works once.
 *
 * mTLS: the site also sends a PKCS#10 request for its own TLS client key; the coordinator checks the request's
 * signature, ignores the subject it asks for and returns a client certificate from the federation CA with
 * CN = the enrolling site's name. The certificate is signed before the token is consumed (so a failure there
 * leaves the token usable) and only handed out once the token checks out. When the coordinator runs with
 * --mtls, a request without a CSR is refused before the token is touched: that site could not connect anyway.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import type { CoordinatorStore } from '../store/store.ts';
import type { EventBus } from '../../shared/events/bus.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import type { Logger } from '../../shared/util/log.ts';
import { METHODS } from '../../shared/protocol/grpc.ts';
import { SITE_NAME_PATTERN } from '../../shared/protocol/site-names.ts';
import type { FailureLimiter } from '../auth/failure-limiter.ts';
import { weakEd25519PublicKeyReason } from '../../shared/security/site-identity.ts';
import {
  CLIENT_CERT_VALID_DAYS,
  InvalidCsrError,
  MAX_CSR_PEM_CHARS,
  issueClientCertificateFromCsr,
  type CertificateAuthority,
} from '../../shared/security/pki.ts';

const EnrollSchema = z.object({
  siteName: z.string().regex(SITE_NAME_PATTERN, 'site names are 1–64 characters of [a-z0-9-], starting with a letter'),
  token: z.string().min(16).max(200),
  publicKey: z
    .instanceof(Buffer)
    .refine((b) => b.length === 32, 'public_key must be a raw 32-byte Ed25519 key')
    // A small-order or non-canonical key would let anyone forge this site's tokens; checked before the token is touched.
    .superRefine((b, ctx) => {
      const weak = b.length === 32 ? weakEd25519PublicKeyReason(b) : null;
      if (weak !== null) ctx.addIssue({ code: 'custom', message: `weak Ed25519 key refused: ${weak} (the token was not used)` });
    }),
  clientCsrPem: z.string().max(MAX_CSR_PEM_CHARS, `client_csr_pem must be at most ${MAX_CSR_PEM_CHARS} characters`).default(''),
});

export function enrollmentHandlers(d: {
  store: CoordinatorStore;
  federationId: string;
  coordinatorPublicKey: Buffer;
  bus: EventBus;
  log: Logger;
  /** CA with its private key: signs site TLS client certificates. Absent: sites enrol without one. */
  ca?: CertificateAuthority;
  /** The coordinator runs with --mtls: a site must leave enrolment with a client certificate. */
  requireClientCert?: boolean;
  clientCertValidDays?: number;
  /** Per-peer limit on failed calls, shared with the auth interceptor: refused enrolments count as failures. */
  limiter?: FailureLimiter;
}): grpc.UntypedServiceImplementation {
  async function enroll(request: unknown): Promise<{ ok: true; response: Record<string, unknown> } | { ok: false; error: Partial<grpc.StatusObject> }> {
    const r = EnrollSchema.safeParse(request);
    if (!r.success) {
      return { ok: false, error: { code: grpc.status.INVALID_ARGUMENT, details: `bad enrolment request: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` } };
    }
    const { siteName, token, publicKey, clientCsrPem } = r.data;

    let clientCertPem = '';
    if (clientCsrPem === '') {
      if (d.requireClientCert) {
        return {
          ok: false,
          error: {
            code: grpc.status.FAILED_PRECONDITION,
            details: 'this coordinator requires a client certificate (mTLS) but the enrolment request carries no certificate request (client_csr_pem) — update the site agent and enrol again (the token was not used)',
          },
        };
      }
    } else if (!d.ca) {
      if (d.requireClientCert) {
        return {
          ok: false,
          error: { code: grpc.status.FAILED_PRECONDITION, details: 'this coordinator requires mTLS but cannot issue client certificates: its CA key (pki/ca.key) is missing — ask the coordinator admin (the token was not used)' },
        };
      }
      d.log.warn({ site: siteName }, 'no CA key (pki/ca.key): enrolling the site without a TLS client certificate');
    } else {
      try {
        clientCertPem = await issueClientCertificateFromCsr(d.ca, clientCsrPem, { siteName, validDays: d.clientCertValidDays ?? CLIENT_CERT_VALID_DAYS });
      } catch (e) {
        if (e instanceof InvalidCsrError) {
          return { ok: false, error: { code: grpc.status.INVALID_ARGUMENT, details: `bad enrolment request: client_csr_pem: ${e.message} (the token was not used)` } };
        }
        d.log.error({ site: siteName, err: e }, 'could not issue a client certificate');
        return { ok: false, error: { code: grpc.status.INTERNAL, details: `the coordinator could not issue a client certificate: ${(e as Error).message} (the token was not used)` } };
      }
    }

    const outcome = d.store.enrolSite(siteName, sha256Hex(token), publicKey);
    if (!outcome.ok) {
      // Counted (and its warn line collapsed) below, with the peer, when a limiter is set.
      if (!d.limiter) d.log.warn({ site: siteName, code: outcome.code }, 'enrolment refused');
      const code = outcome.code === 'revoked' ? grpc.status.PERMISSION_DENIED : grpc.status.UNAUTHENTICATED;
      return { ok: false, error: { code, details: outcome.message } };
    }
    d.log.info({ site: siteName, clientCert: clientCertPem !== '' }, 'site enrolled');
    d.bus.publish({ type: 'site.enrolled', federation: d.federationId, at: new Date().toISOString(), site: siteName });
    return { ok: true, response: { siteName, federationId: d.federationId, coordinatorPublicKey: d.coordinatorPublicKey, clientCertPem } };
  }

  return {
    Enroll(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const refusal = d.limiter?.refusal(call.getPeer(), METHODS.enroll);
      if (refusal !== undefined) return cb({ code: grpc.status.RESOURCE_EXHAUSTED, details: refusal });
      enroll(call.request).then(
        (res) => {
          if (res.ok) return cb(null, res.response);
          const code = res.error.code ?? grpc.status.UNKNOWN;
          // Every refusal an unauthenticated caller can provoke counts; the coordinator's own faults do not.
          if (d.limiter && code !== grpc.status.INTERNAL && code !== grpc.status.UNAVAILABLE) {
            const site = (call.request as { siteName?: unknown } | null)?.siteName;
            d.limiter.failure(call.getPeer(), { method: METHODS.enroll, code: grpc.status[code], reason: res.error.details ?? '', site: typeof site === 'string' ? site.slice(0, 64) : undefined }, 'enrolment refused');
          }
          cb(res.error);
        },
        (e: unknown) => {
          d.log.error({ err: e }, 'enrolment failed');
          cb({ code: grpc.status.INTERNAL, details: `enrolment failed: ${String(e)}` });
        },
      );
    },
  };
}
