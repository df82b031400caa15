/**
 * Issue 15, item 3: a failed model download no longer costs the site its round. ensureWithRetry resumes the download
 * from the bytes already on disk, with backoff, until the task's deadline; answers that cannot change (NOT_FOUND,
 * PERMISSION_DENIED, INVALID_ARGUMENT) end it at once. The client is a stand-in for the transport that serves a model
 * from memory and fails as scripted (the real transport under faults: test/transport/grpc-transport.test.ts).
 */
import * as grpc from '@grpc/grpc-js';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ModelCache, ensureWithRetry } from '../../site-agent/transport/model-cache.ts';
import type { FederationClient } from '../../site-agent/transport/client.ts';

const model = randomBytes(300_000);
const hash = createHash('sha256').update(model).digest('hex');
const CHUNK = 64 * 1024;

const callError = (code: grpc.status) => Object.assign(new Error(`${code} ${grpc.status[code]}: scripted`), { code, details: 'scripted', metadata: new grpc.Metadata() });

/**
 * A client whose n-th download sends chunks from the requested offset and then, per `script[n]`, fails with that code
 * after `failAfter` chunks ('ok': sends to the end). Records the offsets asked for.
 */
function scripted(script: Array<{ code: grpc.status; failAfter: number } | 'ok'>): { client: FederationClient; offsets: number[] } {
  const offsets: number[] = [];
  const client = {
    downloadModel(h: string, offset: number) {
      const step = script[offsets.length] ?? 'ok';
      offsets.push(offset);
      const s = new PassThrough({ objectMode: true }) as PassThrough & { cancel(): void };
      s.cancel = () => s.destroy();
      setImmediate(() => {
        let sent = 0;
        for (let at = offset; at < model.length; at += CHUNK) {
          if (step !== 'ok' && sent === step.failAfter) return s.destroy(callError(step.code));
          s.write({ offset: at, data: model.subarray(at, Math.min(at + CHUNK, model.length)), totalSize: model.length, sha256: h });
          sent++;
        }
        if (step !== 'ok') return s.destroy(callError(step.code));
        s.end();
      });
      return s;
    },
  };
  return { client: client as unknown as FederationClient, offsets };
}

const newCache = () => new ModelCache(mkdtempSync(join(tmpdir(), 'medfl-dl-retry-')));

describe('a model download that fails', () => {
  it('is resumed from its offset after each failure until it completes, and the file is the model', async () => {
    const { client, offsets } = scripted([{ code: grpc.status.UNAVAILABLE, failAfter: 2 }, { code: grpc.status.DEADLINE_EXCEEDED, failAfter: 1 }, 'ok']);
    const cache = newCache();
    const moved = await ensureWithRetry(cache, () => client, hash, model.length, { until: Date.now() + 30_000, maxBackoffMs: 20 });
    expect(offsets).toEqual([0, 2 * CHUNK, 3 * CHUNK]);
    expect(moved).toBe(model.length);
    expect(readFileSync(cache.pathFor(hash)).equals(model)).toBe(true);
  });

  it('stops at once on an answer that cannot change', async () => {
    for (const code of [grpc.status.NOT_FOUND, grpc.status.PERMISSION_DENIED, grpc.status.INVALID_ARGUMENT]) {
      const { client, offsets } = scripted([{ code, failAfter: 0 }]);
      await expect(ensureWithRetry(newCache(), () => client, hash, model.length, { until: Date.now() + 30_000, maxBackoffMs: 20 })).rejects.toMatchObject({ code });
      expect(offsets).toHaveLength(1);
    }
  });

  it("gives up once the next try would start after the task's deadline, with the last error", async () => {
    const { client, offsets } = scripted(Array(100).fill({ code: grpc.status.UNAVAILABLE, failAfter: 0 }));
    const t0 = Date.now();
    await expect(ensureWithRetry(newCache(), () => client, hash, model.length, { until: t0 + 1500, maxBackoffMs: 400 })).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
    expect(Date.now() - t0).toBeLessThan(1500 + 500);
    expect(offsets.length).toBeGreaterThan(2);
  });

  it('stops retrying when the agent is stopping', async () => {
    const { client, offsets } = scripted(Array(10).fill({ code: grpc.status.UNAVAILABLE, failAfter: 1 }));
    await expect(ensureWithRetry(newCache(), () => client, hash, model.length, { until: Date.now() + 30_000, maxBackoffMs: 20, cancelled: () => true })).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
    expect(offsets).toHaveLength(1);
  });

  it('asks for the client anew on each try (the agent may have reconnected meanwhile)', async () => {
    const first = scripted([{ code: grpc.status.UNAVAILABLE, failAfter: 1 }]);
    const second = scripted(['ok']);
    let n = 0;
    const cache = newCache();
    await ensureWithRetry(cache, () => (n++ === 0 ? first.client : second.client), hash, model.length, { until: Date.now() + 30_000, maxBackoffMs: 20 });
    expect(first.offsets).toEqual([0]);
    expect(second.offsets).toEqual([CHUNK]);
    expect(readFileSync(cache.pathFor(hash)).equals(model)).toBe(true);
  });
});
