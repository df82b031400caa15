/**
 * gRPC's HTTP/2 message framing, shared by the lean bulk-call paths on both sides (site-agent/transport/
 * h2-channel.ts, coordinator/server/bulk-h2.ts): 5-byte length prefixes, reassembly of messages from DATA
 * pieces into reusable buffers, and the percent-encoding of `grpc-message`.
 */

/** The prefix of one uncompressed message of `length` bytes. */
export function grpcPrefix(length: number): Buffer {
  const b = Buffer.allocUnsafe(5);
  b[0] = 0;
  b.writeUInt32BE(length, 1);
  return b;
}

/**
 * Message buffers handed back by consumers (give()), reused for later messages: a 132 MB transfer otherwise
 * allocates 64 fresh 2 MiB buffers, whose page faults and garbage collection cost about a third of the time the
 * bytes take to arrive (bench/README.md).
 */
export class MessagePool {
  private readonly free: ArrayBuffer[] = [];

  /** Messages at least this large come from the pool; smaller ones get a buffer of their own. */
  static readonly MIN_POOLED = 64 * 1024;
  private static readonly KEEP = 8;

  constructor(readonly capacity: number) {}

  /** A buffer of exactly `length` bytes that owns its memory (never Node's shared small-buffer pool). */
  take(length: number): Buffer {
    if (length < MessagePool.MIN_POOLED || length > this.capacity) return Buffer.allocUnsafeSlow(length);
    const ab = this.free.pop() ?? new ArrayBuffer(this.capacity);
    return Buffer.from(ab, 0, length);
  }

  /** Takes back the memory behind `view` (any view of a buffer from take()); anything else is ignored. */
  give(view: Uint8Array): void {
    const ab = view.buffer;
    if (!(ab instanceof ArrayBuffer) || ab.byteLength !== this.capacity || this.free.length >= MessagePool.KEEP) return;
    if (this.free.includes(ab)) return; // handed back twice: keep one entry
    this.free.push(ab);
  }
}

export type FrameProblem = { kind: 'compressed' } | { kind: 'too-large'; length: number; max: number };

/**
 * Reassembles length-prefixed messages from the pieces a stream delivers. Each message gets memory of its own
 * (from the pool), so consumers may keep it or transfer it to a worker thread.
 */
export class MessageReader {
  private readonly prefix = Buffer.alloc(5);
  private prefixFill = 0;
  private message: Buffer | undefined;
  private fill = 0;

  constructor(private readonly pool: MessagePool) {}

  /** True between messages (nothing partial held). */
  get atBoundary(): boolean {
    return !this.message && this.prefixFill === 0;
  }

  /**
   * Feeds one piece; calls `onMessage` for every message it completes, in order. Stops and returns the problem
   * at a compressed or oversized message; `onMessage` returning false stops too (the rest is dropped).
   */
  push(piece: Buffer, onMessage: (m: Buffer) => boolean | void): FrameProblem | undefined {
    let at = 0;
    while (at < piece.length) {
      if (!this.message) {
        const n = Math.min(5 - this.prefixFill, piece.length - at);
        piece.copy(this.prefix, this.prefixFill, at, at + n);
        this.prefixFill += n;
        at += n;
        if (this.prefixFill < 5) return undefined;
        this.prefixFill = 0;
        if (this.prefix[0] !== 0) return { kind: 'compressed' };
        const length = this.prefix.readUInt32BE(1);
        if (length > this.pool.capacity) return { kind: 'too-large', length, max: this.pool.capacity };
        this.message = this.pool.take(length);
        this.fill = 0;
        if (length > 0) continue;
      } else {
        const n = Math.min(this.message.length - this.fill, piece.length - at);
        piece.copy(this.message, this.fill, at, at + n);
        this.fill += n;
        at += n;
        if (this.fill < this.message.length) return undefined;
      }
      const done = this.message;
      this.message = undefined;
      if (onMessage(done) === false) return undefined;
    }
    return undefined;
  }

  /** Drops anything partial (the call is over). */
  reset(): void {
    this.message = undefined;
    this.prefixFill = 0;
  }
}

/** `grpc-message` is percent-encoded: bytes outside printable ASCII, and '%' itself (gRPC HTTP/2 spec). */
export function encodeGrpcMessage(text: string): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** The inverse; a malformed value is returned as it came. */
export function decodeGrpcMessage(v: unknown): string {
  const s = Array.isArray(v) ? String(v[0] ?? '') : String(v ?? '');
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/** `grpc-timeout` → milliseconds; undefined when absent or malformed. */
export function parseGrpcTimeout(v: unknown): number | undefined {
  const m = /^(\d{1,8})([HMSmun])$/.exec(String(Array.isArray(v) ? v[0] : v ?? ''));
  if (!m) return undefined;
  const n = Number(m[1]);
  const unitMs: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 };
  return n * unitMs[m[2]!]!;
}

/** `grpc-timeout` for a duration: at most 8 digits and a unit. */
export function formatGrpcTimeout(ms: number): string {
  const m = Math.max(1, Math.ceil(ms));
  return m < 1e8 ? `${m}m` : `${Math.ceil(m / 1000)}S`;
}
