/**
 * Sends one update as a client stream: a header (id, round, base model, size, SHA-256, samples), then
 * the payload in ordered chunks. Retried under the same update id, so the coordinator counts it once.
 */
import * as grpc from '@grpc/grpc-js';
import { CHUNK_BYTES } from '../../shared/protocol/grpc.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import type { FederationClient, UploadAck } from './client.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { encodeUpdate } from '../../shared/tensors/update-codec.ts';

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

export async function uploadOnce(client: FederationClient, u: OutgoingUpdate, onProgress?: (p: number) => void, timeoutMs = 600_000): Promise<UploadAck> {
  const { stream, ack } = client.openUpload(timeoutMs);
  const header = {
    updateId: u.updateId,
    round: u.round,
    taskId: u.taskId,
    baseModelHash: u.baseModelHash,
    totalSize: u.payload.length,
    sha256: sha256Hex(u.payload),
    numSamples: u.numSamples,
  };
  // A failed call rejects `ack` and stops 'drain' from ever firing: stop writing then, and let the
  // rejection surface through the `return ack` below (handled here so it is never "unhandled").
  let failed = false;
  let wake: (() => void) | undefined;
  ack.catch(() => {
    failed = true;
    wake?.();
  });
  const write = (msg: Record<string, unknown>) =>
    new Promise<void>((resolve) => {
      if (failed) return resolve();
      // Honour flow control: wait for 'drain' instead of buffering the whole update in grpc's queue.
      if (stream.write(msg)) resolve();
      else {
        wake = resolve;
        stream.once('drain', () => resolve());
      }
    });
  stream.on('error', () => undefined); // surfaced through `ack`
  await write({ header });
  for (let off = 0; off < u.payload.length && !failed; off += CHUNK_BYTES) {
    const data = u.payload.subarray(off, Math.min(off + CHUNK_BYTES, u.payload.length));
    await write({ data, offset: off });
    onProgress?.(Math.min(1, (off + data.length) / u.payload.length));
  }
  stream.end();
  return ack;
}

/** Retries transport failures (not refusals) with backoff; a refusal carries a reason and is final. */
export async function uploadUpdate(client: () => FederationClient, u: OutgoingUpdate, onProgress?: (p: number) => void, attempts = 5): Promise<UploadAck> {
  let last: unknown;
  for (let i = 0; i < attempts; i++) {
    try {
      // Ask for the client each time: the agent may have reconnected with a new channel meanwhile.
      return await uploadOnce(client(), u, onProgress);
    } catch (e) {
      last = e;
      const code = (e as grpc.ServiceError).code;
      if (code === grpc.status.PERMISSION_DENIED || code === grpc.status.INVALID_ARGUMENT) throw e;
      await new Promise((r) => setTimeout(r, 500 * 2 ** i));
    }
  }
  throw last;
}
