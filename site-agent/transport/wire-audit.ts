/**
 * Wire audit: appends one JSON line per call to a file the site keeps (from a grpc-js client interceptor,
 * through `begin`), listing every message the site sent — scalar fields as they are, bytes as length + SHA-256, and for
 * uploads the tensor names and shapes inside the payload. Site admins (and our privacy tests) read it
 * to check that only the plan's shared tensors and aggregate metrics left the site.
 */
import * as grpc from '@grpc/grpc-js';
import { appendFileSync } from 'node:fs';
import { createHash } from 'node:crypto';

export interface AuditedCall {
  method: string;
  at: string;
  messages: unknown[];
  /** Present for uploads: what the reassembled payload contained. */
  payload?: { bytes: number; sha256: string; tensors: { name: string; dtype: string; shape: number[] }[] | { error: string } };
}

export interface AuditRecorder {
  /** One message the site sent on this call. */
  sent(message: unknown): void;
  /** Appends the call's line (once). */
  end(): void;
}

export class WireAudit {
  constructor(readonly path: string) {}

  /**
   * Records one call: every message sent, then one line at the end (the grpc-js interceptor below uses it).
   */
  begin(method: string): AuditRecorder {
    const record: AuditedCall = { method, at: new Date().toISOString(), messages: [] };
    const isUpload = method.endsWith('/UploadUpdate');
    const payloadParts: Buffer[] = [];
    let written = false;
    return {
      sent: (message) => {
        record.messages.push(summarise(message, (b) => payloadParts.push(b), isUpload));
      },
      end: () => {
        if (written) return;
        written = true;
        if (payloadParts.length > 0) record.payload = describePayload(Buffer.concat(payloadParts));
        appendFileSync(this.path, JSON.stringify(record) + '\n');
      },
    };
  }

  interceptor(): grpc.Interceptor {
    return (options, nextCall) => {
      const recorder = this.begin(String(options.method_definition.path));
      return new grpc.InterceptingCall(nextCall(options), {
        sendMessage(message, next) {
          recorder.sent(message);
          next(message);
        },
        halfClose(next) {
          next();
        },
        start(metadata, listener, next) {
          next(metadata, {
            onReceiveStatus(status, nextStatus) {
              recorder.end();
              nextStatus(status);
            },
          });
          void listener;
        },
      });
    };
  }
}

function summarise(value: unknown, keep: (b: Buffer) => void, isUpload: boolean): unknown {
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    const b = Buffer.from(value);
    if (isUpload) keep(b);
    return { bytes: b.length, sha256: createHash('sha256').update(b).digest('hex') };
  }
  if (Array.isArray(value)) return value.map((v) => summarise(v, keep, isUpload));
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = summarise(v, keep, isUpload);
    return out;
  }
  return value;
}

function describePayload(buf: Buffer): AuditedCall['payload'] {
  const sha256 = createHash('sha256').update(buf).digest('hex');
  try {
    const headerLen = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString('utf8')) as Record<string, { dtype: string; shape: number[] }>;
    const tensors = Object.entries(header)
      .filter(([k]) => k !== '__metadata__')
      .map(([name, e]) => ({ name, dtype: e.dtype, shape: e.shape }));
    return { bytes: buf.length, sha256, tensors };
  } catch (e) {
    return { bytes: buf.length, sha256, tensors: { error: (e as Error).message } };
  }
}
