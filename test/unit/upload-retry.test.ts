/**
 * Issue 15: a site keeps its update through "not now" refusals (UNAVAILABLE: the coordinator's disk is full;
 * RESOURCE_EXHAUSTED: it is short of something) and sends it again with backoff until the round's deadline,
 * instead of giving up after a handful of tries and losing the round's work. The client is a stand-in for the
 * transport (the end-to-end path is in test/e2e/disk-full.test.ts); the retry policy is the product's.
 */
import * as grpc from '@grpc/grpc-js';
import { describe, expect, it, vi } from 'vitest';
import { uploadUpdate } from '../../site-agent/transport/upload.ts';
import type { FederationClient, UploadAck, UploadCall } from '../../site-agent/transport/client.ts';

/** An error shaped like grpc-js's ServiceError. */
const grpcCallError = (code: grpc.status, details: string) => Object.assign(new Error(`${code} ${grpc.status[code]}: ${details}`), { code, details, metadata: new grpc.Metadata() });

/** A client whose uploads are answered, in turn, by `answers` (a status code fails the call; 'ack' accepts it). */
function scripted(answers: Array<grpc.status | 'ack'>): { client: FederationClient; tries: () => number } {
  let n = 0;
  const client = {
    supports: () => true,
    offeredOnThisConnection: () => true,
    forget: () => undefined,
    openUpload(): UploadCall {
      const a = answers[n++] ?? 'ack';
      const ack: Promise<UploadAck> = a === 'ack' ? Promise.resolve({ updateId: 'u-1', accepted: true, duplicate: false, reason: '' }) : Promise.reject(grpcCallError(a, `refused with ${grpc.status[a]}`));
      ack.catch(() => undefined);
      return { ack, admitted: ack.then(() => true, () => false), send: async () => undefined, sendData: async () => undefined, end: async () => undefined };
    },
  };
  return { client: client as unknown as FederationClient, tries: () => n };
}

const update = { updateId: 'u-00000001', taskId: 'r1-site-a', round: 1, baseModelHash: 'a'.repeat(64), numSamples: 4, payload: Buffer.alloc(1000, 1) };

describe('sending an update through transient refusals', () => {
  it('retries UNAVAILABLE and RESOURCE_EXHAUSTED far beyond the tries allowed for other failures', async () => {
    const transient = Array.from({ length: 12 }, (_, i) => (i % 2 ? grpc.status.RESOURCE_EXHAUSTED : grpc.status.UNAVAILABLE));
    const s = scripted([...transient, 'ack']);
    const ack = await uploadUpdate(() => s.client, update, undefined, { attempts: 5, until: Date.now() + 60_000, maxBackoffMs: 5 });
    expect(ack.accepted).toBe(true);
    expect(s.tries()).toBe(13);
  });

  it('gives up on transient refusals once the round deadline would pass, with the last error', async () => {
    const s = scripted(Array.from({ length: 1000 }, () => grpc.status.UNAVAILABLE));
    const started = Date.now();
    const err = await uploadUpdate(() => s.client, update, undefined, { until: started + 300, maxBackoffMs: 20 }).catch((e: grpc.ServiceError) => e);
    expect((err as grpc.ServiceError).code).toBe(grpc.status.UNAVAILABLE);
    expect(Date.now() - started).toBeLessThan(2000);
    expect(s.tries()).toBeGreaterThan(3);
  });

  it('gives other failures `attempts` tries, and none more for PERMISSION_DENIED or a stopping agent', async () => {
    const internal = scripted(Array.from({ length: 10 }, () => grpc.status.INTERNAL));
    await expect(uploadUpdate(() => internal.client, update, undefined, { attempts: 3, maxBackoffMs: 5 })).rejects.toMatchObject({ code: grpc.status.INTERNAL });
    expect(internal.tries()).toBe(3);
    const denied = scripted([grpc.status.PERMISSION_DENIED, 'ack']);
    await expect(uploadUpdate(() => denied.client, update, undefined, { maxBackoffMs: 5 })).rejects.toMatchObject({ code: grpc.status.PERMISSION_DENIED });
    expect(denied.tries()).toBe(1);
    const stopping = scripted([grpc.status.UNAVAILABLE, 'ack']);
    await expect(uploadUpdate(() => stopping.client, update, undefined, { maxBackoffMs: 5, cancelled: () => true })).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
    expect(stopping.tries()).toBe(1);
  });

  it('spreads its retries: the wait is jittered between half and all of the backoff step', async () => {
    const waits: number[] = [];
    const log = { warn: (o: { delayMs: number }) => waits.push(o.delayMs) };
    const random = vi.spyOn(Math, 'random');
    try {
      random.mockReturnValue(0);
      const first = scripted([grpc.status.RESOURCE_EXHAUSTED]);
      await uploadUpdate(() => first.client, update, undefined, { maxBackoffMs: 40, log: log as never });
      random.mockReturnValue(0.999);
      const second = scripted([grpc.status.RESOURCE_EXHAUSTED]);
      await uploadUpdate(() => second.client, update, undefined, { maxBackoffMs: 40, log: log as never });
    } finally {
      random.mockRestore();
    }
    // Two sites refused at the same moment wait 20 and 40 ms: no lockstep.
    expect(waits).toEqual([20, 40]);
  });
});
