/**
 * Governance service handlers (authenticated by the same interceptor as Federation: the verified site
 * name is in the call metadata).
 *   FetchLedger: streams the contribution ledger's stored lines, so a site can verify the chain and
 *                find its own entries (every site sees the whole ledger: site names, rounds, hashes and
 *                sample counts, nothing per-patient).
 *   DeclineTask: a site's reason for refusing a task (its policy, or a head its task file cannot fit); logged at
 *                warn, published as a `task.declined` event, and the round stops waiting for that site.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { AUTHENTICATED_SITE_KEY } from '../../shared/protocol/grpc.ts';
import type { EventBus } from '../../shared/events/bus.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { ContributionLedger } from '../ledger/ledger.ts';

export interface GovernanceDeps {
  ledger: ContributionLedger | undefined;
  bus: EventBus;
  federationId: string;
  log: Logger;
  /** Tells the rounds not to wait for a site that declined (RoundEngine.siteDeclined). */
  onDecline?: (site: string, round: number) => void;
}

const DeclineSchema = z.object({
  round: z.number().int().min(0),
  taskId: z.string().max(200),
  reason: z.string().min(1).max(4000),
});

function siteOf(call: { metadata: grpc.Metadata }): string {
  const v = call.metadata.get(AUTHENTICATED_SITE_KEY)[0];
  if (typeof v !== 'string' || v === '') throw Object.assign(new Error('no authenticated site on this call (server misconfigured: auth interceptor missing)'), { code: grpc.status.INTERNAL });
  return v;
}

export function governanceHandlers(d: GovernanceDeps): grpc.UntypedServiceImplementation {
  return {
    FetchLedger(call: grpc.ServerWritableStream<{ fromSeq?: number }, unknown>) {
      void (async () => {
        try {
          const site = siteOf(call);
          if (!d.ledger) {
            call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'this coordinator keeps no contribution ledger' });
            return;
          }
          const lines = await d.ledger.lines(Math.max(1, Number(call.request.fromSeq ?? 1) || 1));
          d.log.debug({ site, entries: lines.length }, 'ledger fetched');
          for (const json of lines) {
            if (call.cancelled) return;
            if (!call.write({ json })) await new Promise((r) => call.once('drain', r));
          }
          call.end();
        } catch (e) {
          const err = e as grpc.ServiceError;
          call.emit('error', { code: err.code ?? grpc.status.INTERNAL, details: `cannot read the ledger: ${err.message}` });
        }
      })();
    },

    DeclineTask(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      try {
        const site = siteOf(call);
        const r = DeclineSchema.safeParse(call.request);
        if (!r.success) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `bad decline: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` });
        d.log.warn({ site, round: r.data.round, task: r.data.taskId, reason: r.data.reason }, 'site declined its task under its own policy');
        d.bus.publish({
          type: 'task.declined',
          federation: d.federationId,
          at: new Date().toISOString(),
          round: r.data.round,
          site,
          taskId: r.data.taskId,
          reason: r.data.reason,
        });
        cb(null, { recorded: true });
        d.onDecline?.(site, r.data.round);
      } catch (e) {
        cb(e as grpc.ServiceError);
      }
    },
  };
}
