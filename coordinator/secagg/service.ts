/**
 * gRPC handlers of medfl.v1.SecureAggregation. The auth interceptor has checked the caller's token (as on
 * every call but Enroll) and stamped the verified site name; handlers only act for that site, in the open
 * round's session, and size-check what they are given before the session's zod parsing.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { AUTHENTICATED_SITE_KEY } from '../../shared/protocol/grpc.ts';
import { SECAGG_MAX_JSON, SECAGG_PIECE_WORDS } from '../../shared/privacy/secagg/wire.ts';
import type { Logger } from '../../shared/util/log.ts';
import { SecAggRefused, type SecAggRound } from './session.ts';

export interface SecAggServiceDeps {
  /** The open round's session, when that round uses secure aggregation. */
  session(round: number): SecAggRound | undefined;
  log: Logger;
}

const RequestSchema = z.object({
  round: z.number().int().positive(),
  taskId: z.string().max(200),
  json: z.string().max(SECAGG_MAX_JSON),
  vector: z.instanceof(Buffer).refine((b) => b.length <= SECAGG_PIECE_WORDS * 4, { message: `a masked-vector piece holds at most ${SECAGG_PIECE_WORDS} words` }),
  vectorOffset: z.number().int().min(0),
});
type Request = z.infer<typeof RequestSchema>;

const CODES = { invalid: grpc.status.INVALID_ARGUMENT, precondition: grpc.status.FAILED_PRECONDITION, aborted: grpc.status.ABORTED } as const;

export function secAggHandlers(d: SecAggServiceDeps): grpc.UntypedServiceImplementation {
  const handle =
    (phase: string, run: (s: SecAggRound, site: string, r: Request) => Promise<string>) =>
    (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const site = call.metadata.get(AUTHENTICATED_SITE_KEY)[0];
      if (typeof site !== 'string' || site === '') return cb({ code: grpc.status.INTERNAL, details: 'no authenticated site on this call (server misconfigured: auth interceptor missing)' });
      const parsed = RequestSchema.safeParse(call.request);
      if (!parsed.success) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `bad secure-aggregation ${phase} request: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` });
      const r = parsed.data;
      const session = d.session(r.round);
      if (!session) return cb({ code: grpc.status.FAILED_PRECONDITION, details: `round ${r.round} is not an open secure-aggregation round; drop this round's work and take the current task` });
      Promise.resolve()
        .then(() => run(session, site, r))
        .then(
        (json) => cb(null, { json }),
        (e: Error) => {
          const code = e instanceof SecAggRefused ? CODES[e.code] : grpc.status.INTERNAL;
          d.log.warn({ site, round: r.round, phase, reason: e.message }, 'secure aggregation: message refused');
          cb({ code, details: e.message });
        },
      );
    };
  return {
    Advertise: handle('advertise', (s, site, r) => s.advertise(site, r.json)),
    ShareKeys: handle('share-keys', (s, site, r) => s.shareKeys(site, r.json)),
    MaskedInput: handle('masked-input', (s, site, r) => s.maskedPiece(site, r.vectorOffset, r.vector)),
    Unmask: handle('unmask', (s, site, r) => s.unmask(site, r.json)),
  };
}
