/**
 * medfl.v1.Enrollment: a site trades its one-time token for a place in the federation by registering
 * its own Ed25519 public key. The token is stored only as a hash and works once.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import type { CoordinatorStore } from '../store/store.ts';
import type { EventBus } from '../../shared/events/bus.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import type { Logger } from '../../shared/util/log.ts';
import { SITE_NAME_PATTERN } from '../../shared/protocol/site-names.ts';

const EnrollSchema = z.object({
  siteName: z.string().regex(SITE_NAME_PATTERN, 'site names are 1–64 characters of [a-z0-9-], starting with a letter'),
  token: z.string().min(16).max(200),
  publicKey: z.instanceof(Buffer).refine((b) => b.length === 32, 'public_key must be a raw 32-byte Ed25519 key'),
});

export function enrollmentHandlers(d: {
  store: CoordinatorStore;
  federationId: string;
  coordinatorPublicKey: Buffer;
  bus: EventBus;
  log: Logger;
}): grpc.UntypedServiceImplementation {
  return {
    Enroll(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const r = EnrollSchema.safeParse(call.request);
      if (!r.success) {
        return cb({ code: grpc.status.INVALID_ARGUMENT, details: `bad enrolment request: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` });
      }
      const { siteName, token, publicKey } = r.data;
      const outcome = d.store.enrolSite(siteName, sha256Hex(token), publicKey);
      if (!outcome.ok) {
        d.log.warn({ site: siteName, code: outcome.code }, 'enrolment refused');
        const code = outcome.code === 'revoked' ? grpc.status.PERMISSION_DENIED : grpc.status.UNAUTHENTICATED;
        return cb({ code, details: outcome.message });
      }
      d.log.info({ site: siteName }, 'site enrolled');
      d.bus.publish({ type: 'site.enrolled', federation: d.federationId, at: new Date().toISOString(), site: siteName });
      cb(null, { siteName, federationId: d.federationId, coordinatorPublicKey: d.coordinatorPublicKey });
    },
  };
}
