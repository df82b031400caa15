/**
 * gRPC handlers of medfl.v1.Federation. The auth interceptor has already checked the caller's token and
 * put the verified site name in the metadata; handlers only ever act for that site.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { AUTHENTICATED_SITE_KEY, UPLOAD_ADMITTED_KEY, UPLOAD_ADMITTED_VALUE } from '../../shared/protocol/grpc.ts';
import { SHA256_HEX } from '../../shared/util/hash.ts';
import type { CoordinatorStore } from '../store/store.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { ModelBytesCache } from '../models/model-bytes-cache.ts';
import type { RoundEngine, TaskMessage, TaskSink } from '../rounds/round-engine.ts';
import type { UploadReceiver } from './upload-receiver.ts';
import { UploadCall } from './upload-call.ts';
import { UploadCommits } from './upload-commits.ts';
import type { Logger } from '../../shared/util/log.ts';
import { streamModelFile } from './model-stream.ts';
import { COORDINATOR_FEATURES, FEATURES, LEGACY_SITE, type Feature, type SiteCapabilities } from '../../shared/protocol/features.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import { RefusalWarnings } from '../events/refusal-warnings.ts';
import { UPLOAD_BACKLOG_BYTES, type TransferAdmission, type TransferTicket } from './transfer-admission.ts';
import { RevocationWatch } from './revocation-watch.ts';
import { BASE_HEARTBEAT_MS, heartbeatIntervalMs } from '../../shared/protocol/heartbeat.ts';

/** How often the heartbeat interval's site count is taken again (enrolments and revocations change it). */
const PACE_RECOUNT_MS = 10_000;

export interface FederationServiceDeps {
  store: CoordinatorStore;
  models: ModelFiles;
  engine: RoundEngine;
  receiver: UploadReceiver;
  log: Logger;
  /** How often the open task streams' sites are checked to be still enrolled (revocation without restart; default 2 s). */
  revocationCheckMs?: number;
  /** Named in every heartbeat answer (default: all of COORDINATOR_FEATURES). */
  features?: readonly Feature[];
  /** Uploads one site may have open at once (default DEFAULT_MAX_OPEN_UPLOADS_PER_SITE); more are refused. */
  maxOpenUploadsPerSite?: number;
  /** Collapses repeated refusal warn lines per (site, reason); default: a new one (never closed: its timer is unref'd). */
  refusals?: RefusalWarnings;
  /** Told of each finished model download and each accepted upload (admin-http metrics); must not throw. */
  onTransfer?: (t: { direction: 'download' | 'upload'; bytes: number; seconds: number }) => void;
  /** Bounds the downloads and uploads running at once (transfer-admission.ts); without it every transfer starts at once. */
  admission?: TransferAdmission;
  /** Serves model downloads from memory, each version read from its file once (model-bytes-cache.ts); without it each download reads the file. */
  modelBytes?: ModelBytesCache;
}

/**
 * Each open upload holds a partial file and its descriptor until it ends or stalls out (uploadOptions.stallMs), so
 * one site (hostile or buggy) could otherwise hold any number. Two lets a retry in beside an upload whose path
 * died silently and is not yet dropped.
 */
export const DEFAULT_MAX_OPEN_UPLOADS_PER_SITE = 2;

const HeartbeatSchema = z.object({
  // Any short word: a newer site may report a state this coordinator does not know yet (it is only shown).
  state: z.string().regex(/^[a-z][a-z0-9_-]{0,31}$|^$/, 'state must be a lowercase word of at most 32 characters').transform((s) => s || 'idle'),
  progress: z.number().min(0).max(1),
  taskId: z.string().max(200),
  engine: z.string().max(64),
  // A site older than the field sends none (the decoder then gives ''): shown as unknown.
  softwareVersion: z
    .string()
    .regex(/^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$|^$/, 'softwareVersion must be a release name of at most 64 characters (letters, digits, . + _ -)')
    .optional(),
});

/** What a site says of itself when it subscribes; a site older than versioning sends neither field (version 1). */
const SubscribeSchema = z.object({
  protocolVersion: z.number().int().min(0).max(1_000_000).optional(),
  features: z.array(z.string().max(64)).max(64).optional(),
});

/** The capabilities a SubscribeTasks request announces; a malformed one is taken as a legacy site's. */
export function siteCapabilities(request: unknown): SiteCapabilities {
  const r = SubscribeSchema.safeParse(request);
  if (!r.success || !r.data.protocolVersion) return LEGACY_SITE;
  return { protocolVersion: r.data.protocolVersion, features: new Set(r.data.features ?? []) };
}

const MetricsSchema = z.object({
  round: z.number().int().positive(),
  taskId: z.string().max(200),
  values: z
    .record(z.string().regex(/^[a-z][a-z0-9_.]{0,63}$/, 'metric names are lowercase [a-z0-9_.], at most 64 characters'), z.number().finite())
    .refine((v) => Object.keys(v).length <= 64, 'at most 64 metrics per report'),
});

/**
 * A handler's failure as the status a site sees: a storage fault (disk full, database locked) is the coordinator's
 * passing condition, so UNAVAILABLE with the reason (sites retry it); anything else goes as it is.
 */
export function asServiceError(e: unknown): Partial<grpc.StatusObject> {
  if (isStorageFault(e)) return { code: grpc.status.UNAVAILABLE, details: `the coordinator cannot store this now: ${describeStorageFault(e)}; try again later` };
  return e as grpc.ServiceError;
}

function siteOf(call: { metadata: grpc.Metadata }): string {
  const v = call.metadata.get(AUTHENTICATED_SITE_KEY)[0];
  if (typeof v !== 'string' || v === '') throw Object.assign(new Error('no authenticated site on this call (server misconfigured: auth interceptor missing)'), { code: grpc.status.INTERNAL });
  return v;
}

function toWireTask(t: TaskMessage): Record<string, unknown> {
  return {
    taskId: t.taskId,
    kind: t.kind,
    round: t.round,
    modelHash: t.modelHash,
    modelSize: t.modelSize,
    deadlineUnixMs: t.deadlineUnixMs,
    settingsJson: t.settingsJson,
    signature: t.signature,
  };
}

/**
 * Gives `ticket` back however the call ends: answered (grpc-js emits 'cancelled' once the status is sent, and after
 * a server stream's last message was written), cancelled by the site, cut off with its connection, or failed.
 */
function releaseWhenCallEnds(call: { once(event: 'cancelled' | 'close' | 'error', listener: () => void): unknown }, ticket: TransferTicket): void {
  const release = () => ticket.release();
  call.once('cancelled', release);
  call.once('close', release);
  call.once('error', release);
}

/** The response headers that tell a site its upload is admitted (feature upload-go-ahead). */
function goAheadHeaders(): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set(UPLOAD_ADMITTED_KEY, UPLOAD_ADMITTED_VALUE);
  return md;
}

/** Seconds a refused upload is told to wait before sending again (a hint for people; sites back off on their own). */
const BUSY_RETRY_HINT_S = 5;

/** Tunables (tests shorten them). */
export const uploadOptions = {
  /**
   * An open upload from which nothing has arrived for this long, while the coordinator was reading, is dropped:
   * the site's path went silent (its deadline may be half an hour away). A site that is alive sends it again.
   * "Nothing" means no whole 2 MiB chunk: 5 minutes lets links down to ~60 kbit/s through.
   */
  stallMs: 300_000,
};

/**
 * Resolves once the unary answer of a client-streaming call has left the process. grpc-js writes the message,
 * and only when that write completes, the status in HTTP/2 trailers; once the trailers are handed to the
 * session it emits 'cancelled' on the call. The session writes them to the socket from a native immediate
 * that can run after one JS setImmediate but not after two (measured: with one, the ack still waited for
 * the fold and round close; with two it reaches the client before the fold starts, measured by the since-removed
 * loopback transport bench, in git history). Any synchronous job started earlier would hold all of that until it ends.
 * The timer is a fallback should a grpc-js version stop emitting the event.
 */
function statusSent(call: grpc.ServerReadableStream<unknown, unknown>, maxWaitMs = 200): Promise<void> {
  return new Promise((resolve) => {
    if (call.cancelled) return resolve();
    const done = () => {
      clearTimeout(timer);
      call.off('cancelled', done);
      setImmediate(() => setImmediate(resolve));
    };
    const timer = setTimeout(done, maxWaitMs);
    call.once('cancelled', done);
  });
}

export function federationHandlers(d: FederationServiceDeps): grpc.UntypedServiceImplementation {
  const { store, models, engine, receiver, log } = d;
  const maxOpenUploads = d.maxOpenUploadsPerSite ?? DEFAULT_MAX_OPEN_UPLOADS_PER_SITE;
  const refusals = d.refusals ?? new RefusalWarnings(log);
  const features = d.features ?? COORDINATOR_FEATURES;
  const sendsGoAhead = features.includes(FEATURES.uploadGoAhead);
  if (!(Number.isInteger(maxOpenUploads) && maxOpenUploads >= 1)) throw new RangeError(`maxOpenUploadsPerSite must be an integer ≥ 1, got ${maxOpenUploads}`);
  /** Closed uploads are checked, folded, stored and acknowledged together here (one job of the fold queue per batch). */
  const commits = new UploadCommits({ engine, store, receiver, log });
  /** Open UploadUpdate calls per site. */
  const openUploads = new Map<string, number>();
  /** Ends the task streams of sites revoked while connected: one store query per tick for all of them. */
  const revocations = new RevocationWatch({ enrolledSites: () => store.enrolledSiteNames(), everyMs: d.revocationCheckMs, log });
  /** The interval heartbeat answers name (shared/protocol/heartbeat.ts), from an enrolled-site count at most 10 s old. */
  let pace = { at: Number.NEGATIVE_INFINITY, ms: BASE_HEARTBEAT_MS };
  const heartbeatPace = (now: number): number => {
    if (now - pace.at < PACE_RECOUNT_MS) return pace.ms;
    try {
      pace = { at: now, ms: heartbeatIntervalMs(store.enrolledSiteCount()) };
    } catch {
      // A storage fault: keep the last interval and count again on a later beat.
      pace = { ...pace, at: now };
    }
    return pace.ms;
  };

  /** Reads one upload: its chunks drive an UploadCall, which answers it and gives the site's slot back. */
  function receiveUpload(call: grpc.ServerReadableStream<Record<string, unknown>, unknown>, reply: grpc.sendUnaryData<unknown>, site: string, releaseSlot: () => void): void {
    const upload = new UploadCall({
      site,
      store,
      engine,
      receiver,
      commits,
      log,
      stream: call,
      reply,
      answerSent: () => statusSent(call),
      // The slot is given back when the call is answered (every outcome, partial file already discarded) or cut off.
      releaseSlot,
      stallMs: uploadOptions.stallMs,
      backlogBytes: UPLOAD_BACKLOG_BYTES,
      onTransfer: d.onTransfer,
    });
    call.on('data', (msg: Record<string, unknown>) => upload.data(msg));
    call.on('end', () => upload.end());
    call.on('cancelled', () => upload.abort());
    call.on('error', () => upload.abort());
  }

  return {
    Heartbeat(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      try {
        const site = siteOf(call);
        const hb = HeartbeatSchema.safeParse(call.request);
        if (!hb.success) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `bad heartbeat: ${hb.error.issues[0]?.message}` });
        store.touchSite(site, hb.data.state, hb.data.engine || null, Date.now(), hb.data.softwareVersion || null);
        // A selected site idle without its task gets it again (it may have given it up after a failed download).
        if (hb.data.state === 'idle' && hb.data.taskId === '') engine.siteIdle(site);
        const now = Date.now();
        cb(null, { serverTimeMs: now, features, nextHeartbeatMs: heartbeatPace(now) });
      } catch (e) {
        cb(asServiceError(e));
      }
    },

    SubscribeTasks(call: grpc.ServerWritableStream<unknown, unknown>) {
      let site: string;
      try {
        site = siteOf(call);
      } catch (e) {
        call.destroy(e as Error);
        return;
      }
      try {
        store.touchSite(site, 'idle', null);
      } catch (e) {
        // Only bookkeeping (last seen): the task stream works without it.
        log.warn({ site, err: describeStorageFault(e) }, 'could not record the site as seen');
      }
      const capabilities = siteCapabilities(call.request);
      log.info({ site, protocolVersion: capabilities.protocolVersion, features: [...capabilities.features] }, 'site subscribed to tasks');
      let open = true;
      const sink: TaskSink = {
        capabilities,
        send(task) {
          if (open) call.write(toWireTask(task));
        },
        replaced() {
          if (!open) return;
          log.warn({ site }, 'a newer task stream of this site took over; closing the older one');
          done();
          call.emit('error', { code: grpc.status.ALREADY_EXISTS, details: `another agent connected as site '${site}'; this task stream is closed — run one agent per site (or this was a stale connection)` });
        },
      };
      const stopWatching = revocations.watch(site, () => {
        done();
        call.emit('error', { code: grpc.status.PERMISSION_DENIED, details: `site '${site}' was revoked by the coordinator admin` });
      });
      const done = () => {
        if (!open) return;
        open = false;
        stopWatching();
        if (!engine.siteDisconnected(site, sink)) return;
        try {
          // So `medfl status` shows it offline now, not only after three (in a large federation, long) beat intervals.
          store.siteLeft(site);
        } catch (e) {
          log.warn({ site, err: describeStorageFault(e) }, 'could not record that the site left');
        }
      };
      call.on('cancelled', done);
      call.on('close', done);
      call.on('error', done);
      engine.siteConnected(site, sink);
    },

    DownloadModel(call: grpc.ServerWritableStream<{ modelHash: string; offset: number }, unknown>) {
      const { modelHash, offset } = call.request;
      if (!SHA256_HEX.test(modelHash ?? '')) {
        call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: 'model_hash must be 64 lowercase hex digits' });
        return;
      }
      const m = store.getModel(modelHash);
      if (!m) {
        call.emit('error', { code: grpc.status.NOT_FOUND, details: `no model version ${modelHash.slice(0, 12)}… on this coordinator` });
        return;
      }
      if (!Number.isInteger(offset) || offset < 0 || offset > m.sizeBytes) {
        call.emit('error', { code: grpc.status.OUT_OF_RANGE, details: `offset ${offset} is outside the ${m.sizeBytes}-byte model` });
        return;
      }
      const start = () => {
        const started = performance.now();
        const sent = d.onTransfer && (() => d.onTransfer!({ direction: 'download', bytes: m.sizeBytes - offset, seconds: (performance.now() - started) / 1000 }));
        streamModelFile(call, models.pathFor(modelHash), offset, m.sizeBytes, modelHash, sent, d.modelBytes);
      };
      if (!d.admission) return start();
      // Waits its turn (FIFO) holding no buffer; a waiting download is never refused.
      const { ticket } = d.admission.downloads.admit(start);
      if (ticket) releaseWhenCallEnds(call, ticket);
    },

    UploadUpdate(call: grpc.ServerReadableStream<Record<string, unknown>, unknown>, reply: grpc.sendUnaryData<unknown>) {
      let site: string;
      try {
        site = siteOf(call);
      } catch (e) {
        reply(e as grpc.ServiceError);
        return;
      }
      const open = openUploads.get(site) ?? 0;
      if (open >= maxOpenUploads) {
        refusals.refused(site, 'too_many_open_uploads', `${open} uploads open`, { site, open, limit: maxOpenUploads }, 'upload refused: the site already has the most open uploads allowed');
        const stallS = Math.round(uploadOptions.stallMs / 1000);
        reply({ code: grpc.status.RESOURCE_EXHAUSTED, details: `site '${site}' already has ${open} uploads open, the most allowed at once; wait for one to end (a stalled one is dropped after ${stallS} s without data) and send again` });
        return;
      }
      openUploads.set(site, open + 1);
      let slotHeld = true;
      const releaseSiteSlot = () => {
        if (!slotHeld) return;
        slotHeld = false;
        const n = (openUploads.get(site) ?? 1) - 1;
        if (n <= 0) openUploads.delete(site);
        else openUploads.set(site, n);
      };
      let reading = false;
      const start = () => {
        // The go-ahead: a site that waits for it sends its update only now; older sites ignore the header. Throws
        // only on a call already gone, and then the gate gives the slot back and the call's end frees the site's.
        if (sendsGoAhead) call.sendMetadata(goAheadHeaders());
        reading = true;
        receiveUpload(call, reply, site, releaseSiteSlot);
      };
      if (!d.admission) return start();
      // Nothing is read from the call until its turn comes. A site that waits for the go-ahead has sent nothing; what
      // an older site sent meanwhile waits in HTTP/2 flow control.
      const admitted = d.admission.uploads.admit(start);
      if (admitted.refused !== undefined) {
        releaseSiteSlot();
        refusals.refused('*', 'coordinator_busy', admitted.refused, { site, ...d.admission.uploads.stats() }, 'upload refused: too many uploads are waiting; the site sends it again later');
        reply({ code: grpc.status.RESOURCE_EXHAUSTED, details: `${admitted.refused}; send the update again in about ${BUSY_RETRY_HINT_S} s` });
        return;
      }
      // Cut off before it was read (waiting, or its turn come but not yet started): the site's slot goes with it.
      // Once reading, the UploadCall gives the slot back.
      const cutOffWhileWaiting = () => {
        if (!reading) releaseSiteSlot();
      };
      call.once('cancelled', cutOffWhileWaiting);
      call.once('error', cutOffWhileWaiting);
      call.once('close', cutOffWhileWaiting);
      releaseWhenCallEnds(call, admitted.ticket);
    },

    ReportMetrics(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      try {
        const site = siteOf(call);
        const r = MetricsSchema.safeParse(call.request);
        if (!r.success) return cb(null, { accepted: false, reason: `bad metrics: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` });
        if (r.data.round > store.lastRoundNumber()) return cb(null, { accepted: false, reason: `round ${r.data.round} has not started` });
        store.recordMetrics(r.data.round, site, r.data.values);
        cb(null, { accepted: true, reason: '' });
      } catch (e) {
        cb(asServiceError(e));
      }
    },
  };
}
