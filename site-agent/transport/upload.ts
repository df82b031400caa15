/**
 * Sends one update as a client stream: a header (id, round, base model, size, SHA-256, samples), then
 * the payload in ordered chunks (FederationClient.openUpload, on the site's one connection).
 * Coordinators that offer it get the SHA-256 last, in a trailer, so hashing overlaps the transfer, and coordinators
 * that offer the go-ahead get nothing at all until they admit the upload (an upload waiting for its slot then holds
 * no update bytes at the coordinator, however many sites finish at once).
 * Retried under the same update id, so the coordinator counts it once.
 */
import { backoffDelay } from './backoff.ts';
import * as grpc from '@grpc/grpc-js';
import { CHUNK_BYTES } from '../../shared/protocol/grpc.ts';
import { createHash } from 'node:crypto';
import { sha256Hex } from '../../shared/util/hash.ts';
import { FEATURES } from '../../shared/protocol/features.ts';
import type { FederationClient, UploadAck } from './client.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { encodeUpdate } from '../../shared/tensors/update-codec.ts';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../../shared/protocol/reconnect.ts';
import type { Logger } from '../../shared/util/log.ts';

/**
 * The trained update (float32 safetensors) in the encoding the task asks for (plan.compression):
 * float32 / float16 / int8, of the weights or of the delta to `baseModel` (the global model it started from).
 * Without a compression setting the bytes are returned unchanged.
 */
export function encodeForUpload(update: Buffer, settings: TaskSettings, baseModel: () => Buffer): Buffer {
  const c = settings.compression;
  if (!c || (c.update === 'float32' && !c.delta)) return update;
  return encodeUpdate(update, c, () => decodeSafetensors(baseModel()).bundle);
}

export interface OutgoingUpdate {
  updateId: string;
  taskId: string;
  round: number;
  baseModelHash: string;
  numSamples: number;
  payload: Buffer;
}

/**
 * How long one upload attempt may take: 10 minutes, or longer for an update that a 1 Mbit/s uplink needs longer
 * for (with half again as margin). A fixed 10 minutes failed every attempt of a 130 MB update below ~1.8 Mbit/s.
 * A path that dies mid-upload is noticed sooner, by the connection's keepalive (connection.ts).
 */
export function uploadDeadlineMs(bytes: number): number {
  const atOneMbit = (bytes * 8) / 1e6; // seconds
  return Math.max(600_000, Math.ceil(atOneMbit * 1.5 * 1000));
}

/**
 * One attempt. `waitUntil` (Unix ms, e.g. the round's deadline): how long the upload may wait for the coordinator's
 * go-ahead, on top of `timeoutMs` for the transfer itself; without it the wait comes out of `timeoutMs`.
 */
export async function uploadOnce(client: FederationClient, u: OutgoingUpdate, onProgress?: (p: number) => void, timeoutMs = uploadDeadlineMs(u.payload.length), waitUntil?: number): Promise<UploadAck> {
  // Read once per attempt: a heartbeat may change the set while the upload waits.
  const goAhead = client.offeredOnThisConnection(FEATURES.uploadGoAhead);
  const deadlineMs = goAhead && waitUntil !== undefined ? timeoutMs + Math.max(0, waitUntil - Date.now()) : timeoutMs;
  if (!client.supports(FEATURES.uploadSha256Trailer)) return sendUpdate(client, u, 'header', onProgress, deadlineMs, goAhead);
  const ack = await sendUpdate(client, u, 'trailer', onProgress, deadlineMs, goAhead);
  // A coordinator that offered the trailer but then refused an empty header hash was replaced by an older one
  // since the last heartbeat: send the update again the way every coordinator accepts.
  if (!ack.accepted && /^bad update header: sha256/.test(ack.reason)) {
    client.forget(FEATURES.uploadSha256Trailer);
    return sendUpdate(client, u, 'header', onProgress, deadlineMs, goAhead);
  }
  return ack;
}

/**
 * `hashIn: 'header'` hashes the whole payload before the header goes out (every coordinator accepts this);
 * `'trailer'` leaves the header's sha256 empty and hashes each chunk while the one before it travels, then
 * sends the hash in an UpdateTrailer (coordinators that offer FEATURES.uploadSha256Trailer). `goAhead`: send nothing
 * until the coordinator admits the call (coordinators that offer FEATURES.uploadGoAhead).
 */
async function sendUpdate(client: FederationClient, u: OutgoingUpdate, hashIn: 'header' | 'trailer', onProgress: ((p: number) => void) | undefined, timeoutMs: number, goAhead: boolean): Promise<UploadAck> {
  const call = client.openUpload(timeoutMs, goAhead);
  // Refused while waiting (the waiting room is full, the site has too many uploads open) or cut off: the call's
  // outcome says which, and the retry policy below treats it like any other.
  if (goAhead && !(await call.admitted)) return call.ack;
  const hash = hashIn === 'trailer' ? createHash('sha256') : undefined;
  const header = {
    updateId: u.updateId,
    round: u.round,
    taskId: u.taskId,
    baseModelHash: u.baseModelHash,
    totalSize: u.payload.length,
    sha256: hash ? '' : sha256Hex(u.payload),
    numSamples: u.numSamples,
  };
  // A refused or failed call settles `ack` early: stop sending then (sends after it return at once).
  let over = false;
  call.ack.then(
    () => (over = true),
    () => (over = true),
  );
  await call.send({ header });
  for (let off = 0; off < u.payload.length && !over; off += CHUNK_BYTES) {
    const data = u.payload.subarray(off, Math.min(off + CHUNK_BYTES, u.payload.length));
    // Each send waits while grpc-js's stream is full (HTTP/2 flow control behind it), so little of the update is queued.
    const sent = call.sendData(off, data);
    // Hashed while the chunk waits for the window and the socket, so hashing overlaps the transfer.
    hash?.update(data);
    await sent;
    onProgress?.(Math.min(1, (off + data.length) / u.payload.length));
  }
  if (hash && !over) await call.send({ trailer: { sha256: hash.digest('hex') } });
  await call.end();
  return call.ack;
}

/**
 * Refusals that mean "not now" — the coordinator's storage is full or failing, or it is short of some resource —
 * rather than "no": the update is kept and sent again until the round's deadline.
 */
export const TRANSIENT_UPLOAD_CODES: ReadonlySet<grpc.status> = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

/** Codes that are final: the same upload would be refused again. */
const FINAL_UPLOAD_CODES: ReadonlySet<grpc.status> = new Set([grpc.status.PERMISSION_DENIED, grpc.status.INVALID_ARGUMENT]);

export interface UploadRetryOptions {
  /** Tries in all for failures other than the transient ones (default 5). */
  attempts?: number;
  /** Transient refusals are retried until this time, Unix ms (the round's deadline); default 10 minutes from the first try. */
  until?: number;
  /** Longest wait between two tries (default: the sites' reconnect backoff cap). */
  maxBackoffMs?: number;
  /** Checked before each wait and retry: true stops retrying (the agent is stopping). */
  cancelled?: () => boolean;
  log?: Logger;
}

/**
 * Sends the update, retrying failures with backoff: transient refusals (TRANSIENT_UPLOAD_CODES) until `until`,
 * other transport failures `attempts` times. An answer with a reason (accepted or not) is final, and so are
 * PERMISSION_DENIED and INVALID_ARGUMENT. Throws the last error when it gives up.
 */
export async function uploadUpdate(client: () => FederationClient, u: OutgoingUpdate, onProgress?: (p: number) => void, opts: UploadRetryOptions = {}): Promise<UploadAck> {
  const attempts = opts.attempts ?? 5;
  const until = opts.until ?? Date.now() + 600_000;
  const maxBackoffMs = opts.maxBackoffMs ?? SITE_MAX_RECONNECT_BACKOFF_MS;
  let failures = 0;
  for (let tryNo = 1; ; tryNo++) {
    try {
      // Ask for the client each time: the agent may have reconnected with a new channel meanwhile.
      return await uploadOnce(client(), u, onProgress, undefined, until);
    } catch (e) {
      const err = e as grpc.ServiceError;
      if (FINAL_UPLOAD_CODES.has(err.code)) throw e;
      const transient = TRANSIENT_UPLOAD_CODES.has(err.code);
      if (!transient) failures++;
      // Jittered: after a refusal to many sites at once (a full waiting room), their retries spread out.
      const delay = backoffDelay(tryNo - 1, maxBackoffMs);
      if (opts.cancelled?.() || (transient ? Date.now() + delay > until : failures >= attempts)) throw e;
      opts.log?.warn(
        { round: u.round, attempt: tryNo, delayMs: delay, code: err.code !== undefined ? grpc.status[err.code] : undefined, reason: err.details ?? err.message },
        transient ? 'the coordinator cannot take the update now; keeping it and trying again' : 'sending the update failed; trying again',
      );
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}
