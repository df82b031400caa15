/**
 * A lean gRPC client on node:http2 for the site's two bulk calls: DownloadModel (server stream) and
 * UploadUpdate (client stream).
 *
 * Why not grpc-js for these: its client path (a decoder fed per HTTP/2 DATA frame, object-mode streams through
 * the interceptor chain, a fresh buffer and a copy per message each way) kept the site's core busy: downloads
 * ran at ~0.5–0.65× of a raw TLS socket moving the same 132 MB, and an upload cost the site twice the CPU it
 * needs, on machines where it competes with training (bench/README.md). Here messages are reassembled into
 * reusable buffers and sent straight from the caller's memory. Every other call stays on grpc-js.
 *
 * It speaks standard gRPC over HTTP/2 — to the coordinator's HTTP/2 bulk path (coordinator/server/bulk-h2.ts) or
 * to a grpc-js server (an older coordinator) alike: TLS with the CA pinned at enrolment (and
 * the site's client certificate, for coordinators running --mtls), a fresh site token on every call, POST with
 * `content-type: application/grpc`, `te: trailers`, `grpc-timeout`, length-prefixed messages, and the call's
 * status from `grpc-status` / `grpc-message` in the trailers (or in the headers of a trailers-only response).
 * Errors carry grpc-js's shape (`code`, `details`, message `"<code> <NAME>: <details>"`), so callers and tests
 * handle both clients alike. The connection goes through the environment's egress proxy as grpc-js's would (proxy.ts).
 * While a call is open, a connection that shows no sign of life is pinged and, without an answer, dropped
 * (SessionWatch), as grpc-js's keepalive does for the other calls: a download or upload fails UNAVAILABLE (and
 * resumes, or is sent again) instead of hanging when a network path dies without a reset.
 */
import http2 from 'node:http2';
import { isIP } from 'node:net';
import { Readable } from 'node:stream';
import * as tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { connectTunnel, proxyFor } from './proxy.ts';
import { MessagePool, MessageReader, decodeGrpcMessage, formatGrpcTimeout, grpcPrefix } from '../../shared/protocol/grpc-frames.ts';

export interface H2ChannelOptions {
  host: string;
  port: number;
  /** PEM of the CA pinned at enrolment: the only CA this channel trusts. */
  caPem: string;
  /** The site's TLS client certificate, when it has one (mTLS). */
  clientCertificate?: { certPem: string; keyPem: string };
  /** Headers that authenticate one call (a site token is single-use, so this is asked anew per call). */
  authHeaders: () => Promise<Record<string, string>>;
  /** HTTP/2 receive window, connection and per stream. */
  windowBytes: number;
  /** Largest response message accepted (grpc.max_receive_message_length). */
  maxMessageBytes: number;
  /**
   * While a call is open and the connection has shown no sign of life (bytes in, send window moving) for this long, ping the
   * coordinator (default 20 s, as grpc-js's keepalive_time for the site's other calls)...
   */
  keepaliveMs?: number;
  /**
   * ...and if neither the ping's answer nor any other sign of life comes within this long (default 10 s), drop the
   * connection: its calls fail UNAVAILABLE instead of hanging on a network that went silent.
   */
  keepaliveTimeoutMs?: number;
  /** The same while an upload is in flight (default 2 minutes): its ping waits behind the upload's queued bytes. */
  uploadKeepaliveTimeoutMs?: number;
}

export type GrpcCallError = Error & { code: grpc.status; details: string; metadata: grpc.Metadata };

/** An error shaped like grpc-js's ServiceError. */
export function grpcCallError(code: grpc.status, details: string): GrpcCallError {
  return Object.assign(new Error(`${code} ${grpc.status[code]}: ${details}`), { code, details, metadata: new grpc.Metadata() });
}

/** A client-streaming call: write messages (each given as parts, sent without copying), end, await the response. */
export interface ClientStreamCall<T> {
  /** Sends one message made of `parts` (concatenated on the wire); resolves once more may be written. */
  write(parts: Uint8Array[]): Promise<void>;
  end(): Promise<void>;
  /** The server's one response message, or the call's error. */
  response: Promise<T>;
}

/** A server-streaming call: an object-mode Readable of decoded messages, plus cancel() and recycle(). */
export interface ServerStreamCall<T> extends Readable {
  cancel(): void;
  /**
   * Hands the memory behind a received message (any view of it, e.g. a chunk's `data`) back for later
   * messages to reuse. Only for memory the caller will never read again; anything else is ignored.
   */
  recycle(view: Uint8Array): void;
  [Symbol.asyncIterator](): AsyncIterableIterator<T>;
}

/** gRPC's mapping of HTTP statuses for responses that carry no grpc-status (the gRPC HTTP/2 spec). */
function codeForHttpStatus(status: number): grpc.status {
  switch (status) {
    case 400: return grpc.status.INTERNAL;
    case 401: return grpc.status.UNAUTHENTICATED;
    case 403: return grpc.status.PERMISSION_DENIED;
    case 404: return grpc.status.UNIMPLEMENTED;
    case 429: case 502: case 503: case 504: return grpc.status.UNAVAILABLE;
    default: return grpc.status.UNKNOWN;
  }
}

/** A stream reset with no status: what the RST_STREAM code means for the call (as grpc-js maps it). */
function codeForReset(rstCode: number): grpc.status {
  const c = http2.constants;
  if (rstCode === c.NGHTTP2_REFUSED_STREAM) return grpc.status.UNAVAILABLE;
  if (rstCode === c.NGHTTP2_CANCEL) return grpc.status.CANCELLED;
  if (rstCode === c.NGHTTP2_ENHANCE_YOUR_CALM) return grpc.status.RESOURCE_EXHAUSTED;
  if (rstCode === c.NGHTTP2_INADEQUATE_SECURITY) return grpc.status.PERMISSION_DENIED;
  return grpc.status.INTERNAL;
}

interface Status { code: grpc.status; details: string }

function statusOf(headers: http2.IncomingHttpHeaders): Status | undefined {
  const raw = headers['grpc-status'];
  if (raw === undefined) return undefined;
  const code = Number(Array.isArray(raw) ? raw[0] : raw);
  if (!Number.isInteger(code) || code < 0 || code > 16) return { code: grpc.status.UNKNOWN, details: `server sent grpc-status "${String(raw)}"` };
  return { code, details: decodeGrpcMessage(headers['grpc-message']) };
}

/**
 * The request side of a call: length-prefixed messages written straight from the caller's buffers (no copy
 * here; HTTP/2 frames them from there). Writes wait for the stream to open and for 'drain'; once the call is
 * over (answered, failed, cancelled) they return at once and the outcome comes from the response side.
 */
class RequestWriter {
  private req: http2.ClientHttp2Stream | undefined;
  private attached = false;
  private readonly opened: Promise<void>;
  private open!: () => void;

  constructor(private readonly isOver: () => boolean) {
    this.opened = new Promise((resolve) => (this.open = resolve));
  }

  /** The stream to write to, or undefined when the call never got one; only the first call counts. */
  attach(req: http2.ClientHttp2Stream | undefined): void {
    if (this.attached) return;
    this.attached = true;
    this.req = req;
    this.open();
  }

  private usable(): http2.ClientHttp2Stream | undefined {
    const req = this.req;
    return req && !req.destroyed && !req.writableEnded && !this.isOver() ? req : undefined;
  }

  async write(parts: Uint8Array[]): Promise<void> {
    await this.opened;
    const req = this.usable();
    if (!req) return;
    req.cork();
    req.write(grpcPrefix(parts.reduce((n, p) => n + p.byteLength, 0)));
    for (const p of parts) if (p.byteLength > 0) req.write(p);
    req.uncork();
    if (!req.writableNeedDrain) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        req.off('drain', done);
        req.off('close', done);
        resolve();
      };
      req.on('drain', done);
      req.on('close', done);
    });
  }

  async end(): Promise<void> {
    await this.opened;
    this.usable()?.end();
  }
}

class ServerStream<T> extends Readable implements ServerStreamCall<T> {
  private req: http2.ClientHttp2Stream | undefined;
  private settled = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly reader: MessageReader;
  private status: Status | undefined;

  constructor(
    private readonly decode: (b: Buffer) => T,
    private readonly pool: MessagePool,
    private readonly onSettled: () => void,
  ) {
    super({ objectMode: true, highWaterMark: 4 });
    this.reader = new MessageReader(pool);
  }

  /** Wires the HTTP/2 stream in; `deadline` is absolute (ms since epoch); `touch` reports that bytes arrived. */
  attach(req: http2.ClientHttp2Stream, deadline: number | undefined, touch: () => void = () => undefined): void {
    this.req = req;
    if (this.settled) {
      req.close(http2.constants.NGHTTP2_CANCEL);
      return;
    }
    // Beyond setTimeout's range (~24.8 days) Node would fire at once: such a deadline is left to the server.
    if (deadline !== undefined && deadline - Date.now() < 2 ** 31 - 1) {
      this.timer = setTimeout(() => this.fail(grpc.status.DEADLINE_EXCEEDED, 'Deadline exceeded', true), Math.max(0, deadline - Date.now()));
    }
    req.on('response', (headers) => {
      touch();
      const httpStatus = Number(headers[':status']);
      const trailersOnly = statusOf(headers);
      if (trailersOnly) {
        this.status = trailersOnly;
        return;
      }
      if (httpStatus !== 200) return this.fail(codeForHttpStatus(httpStatus), `server answered HTTP ${httpStatus}, not a gRPC response`, true);
      const type = String(headers['content-type'] ?? '');
      if (!type.startsWith('application/grpc')) this.fail(grpc.status.UNKNOWN, `server answered content-type "${type}", not application/grpc`, true);
    });
    req.on('data', (chunk: Buffer) => {
      touch();
      this.onData(chunk);
    });
    req.on('trailers', (trailers) => {
      this.status = statusOf(trailers) ?? { code: grpc.status.UNKNOWN, details: 'server sent trailers without grpc-status' };
    });
    req.on('end', () => this.onEnd());
    req.on('error', (e: Error) => this.fail(grpc.status.UNAVAILABLE, `connection to the coordinator failed: ${e.message}`, false));
    req.on('close', () => {
      if (this.settled) return;
      if (req.rstCode && req.rstCode !== http2.constants.NGHTTP2_NO_ERROR) {
        this.fail(codeForReset(req.rstCode), `stream reset by the coordinator (HTTP/2 code ${req.rstCode})`, false);
      } else {
        this.onEnd();
      }
    });
  }

  /** The call has its outcome (ended, failed or cancelled). */
  get over(): boolean {
    return this.settled;
  }

  /** Called before attach() when the call could not even start (no token, no connection). */
  failStart(code: grpc.status, details: string): void {
    this.fail(code, details, false);
  }

  cancel(): void {
    this.fail(grpc.status.CANCELLED, 'Cancelled on client', true);
  }

  recycle(view: Uint8Array): void {
    this.pool.give(view);
  }

  override _read(): void {
    if (this.req && !this.settled && this.req.isPaused()) this.req.resume();
  }

  private onData(chunk: Buffer): void {
    if (this.settled) return;
    const problem = this.reader.push(chunk, (message) => {
      let value: T;
      try {
        value = this.decode(message);
      } catch (e) {
        this.fail(grpc.status.INTERNAL, `could not decode a response message: ${(e as Error).message}`, true);
        return false;
      }
      // Backpressure: stop reading the HTTP/2 stream (its flow control then holds the server) until _read().
      if (!this.push(value) && this.req && !this.req.isPaused()) this.req.pause();
      return !this.settled;
    });
    if (problem?.kind === 'compressed') this.fail(grpc.status.INTERNAL, 'server sent a compressed message, but this client asked for none', true);
    if (problem?.kind === 'too-large') this.fail(grpc.status.RESOURCE_EXHAUSTED, `Received message larger than max (${problem.length} vs. ${problem.max})`, true);
  }

  private onEnd(): void {
    if (this.settled) return;
    if (!this.reader.atBoundary) return this.fail(grpc.status.INTERNAL, 'response ended inside a message', false);
    const status = this.status ?? { code: grpc.status.UNKNOWN, details: 'response ended without a grpc-status' };
    if (status.code !== grpc.status.OK) return this.fail(status.code, status.details, false);
    this.settle();
    this.push(null);
  }

  private fail(code: grpc.status, details: string, reset: boolean): void {
    if (this.settled) return;
    this.settle();
    if (reset && this.req && !this.req.closed) this.req.close(http2.constants.NGHTTP2_CANCEL);
    this.destroy(grpcCallError(code, details));
  }

  private settle(): void {
    this.settled = true;
    this.reader.reset();
    if (this.timer) clearTimeout(this.timer);
    this.onSettled();
  }
}

/** The connection's HTTP/2 send window, or undefined once the session cannot say. */
function sendWindow(s: http2.ClientHttp2Session): number | undefined {
  try {
    return s.state.remoteWindowSize;
  } catch {
    return undefined;
  }
}

/**
 * Keepalive for one session, while any call is open on it. Signs of life: bytes arriving (calls report response
 * headers and data), and the connection's HTTP/2 send window moving (the site's DATA frames leaving, the
 * coordinator's WINDOW_UPDATEs arriving). After keepaliveMs without either, a PING goes out; a session that then
 * shows no sign of life for the ping timeout is destroyed, and its calls fail UNAVAILABLE.
 *
 * The ping timeout is longer while an upload is in flight: the ping then waits behind the site's own data already
 * handed to the socket, which the window no longer shows (the kernel's send buffer: megabytes on a fast path).
 * On a slow uplink that takes its time to drain: through a 1 MiB/s loopback relay all 3 MiB of an upload sat in
 * socket buffers, the window stood still for the 3 s they took, and a 200 ms ping timeout dropped the upload;
 * over a 1 Mbit/s line, 2 MiB in the socket's buffer would take 17 s, past a 10 s timeout.
 * So uploads get uploadKeepaliveTimeoutMs (default 2 minutes): still minutes rather than TCP's ~15 to notice a dead path.
 */
class SessionWatch {
  private last = Date.now();
  private pingSentAt: number | undefined;
  private window: number | undefined;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly session: http2.ClientHttp2Session,
    private readonly busy: () => boolean,
    private readonly everyMs: number,
    /** How long a ping may go unanswered, now (longer while an upload is in flight). */
    private readonly timeoutMs: () => number,
    checkEveryMs: number,
  ) {
    this.timer = setInterval(() => this.check(), checkEveryMs);
    this.timer.unref();
    session.once('close', () => clearInterval(this.timer));
  }

  readonly touch = (): void => {
    this.last = Date.now();
  };

  private check(): void {
    const s = this.session;
    if (s.destroyed || s.closed) return clearInterval(this.timer);
    const now = Date.now();
    const window = sendWindow(s);
    if (window !== this.window) {
      this.window = window;
      this.last = now;
    }
    if (this.pingSentAt !== undefined) {
      if (this.last >= this.pingSentAt) this.pingSentAt = undefined; // something arrived since: alive
      else if (now - this.pingSentAt >= this.timeoutMs()) {
        clearInterval(this.timer);
        const silent = Math.round((now - this.last) / 1000);
        s.destroy(new Error(`the coordinator stopped answering (nothing for ${silent} s, keepalive ping unanswered): the network or the coordinator's host may be down`));
        return;
      } else return;
    }
    if (!this.busy()) {
      this.last = now; // idle sessions are not watched (they close after 5 idle minutes)
      return;
    }
    if (now - this.last < this.everyMs) return;
    try {
      this.pingSentAt = now;
      s.ping((err) => {
        if (!err) this.touch();
      });
    } catch {
      /* closing meanwhile: its calls fail on their own */
    }
  }
}

export class H2Channel {
  private session: http2.ClientHttp2Session | undefined;
  private readonly watches = new WeakMap<http2.ClientHttp2Session, SessionWatch>();
  private connecting: Promise<http2.ClientHttp2Session> | undefined;
  private active = 0;
  private closed = false;
  /** Client-streaming calls (uploads) not yet settled: the keepalive's ping timeout is longer while there are any. */
  private sending = 0;
  private readonly pool: MessagePool;

  constructor(private readonly o: H2ChannelOptions) {
    this.pool = new MessagePool(o.maxMessageBytes);
  }

  /** Starts a server-streaming call; `request` is the encoded request message. */
  serverStream<T>(path: string, request: Uint8Array, decode: (b: Buffer) => T, opts: { deadline?: number } = {}): ServerStreamCall<T> {
    const { call, writer } = this.start(path, decode, opts.deadline);
    void writer.write([request]).then(() => writer.end());
    return call;
  }

  /** Starts a client-streaming call whose one response is decoded with `decode`. */
  clientStream<T>(path: string, decode: (b: Buffer) => T, opts: { deadline?: number } = {}): ClientStreamCall<T> {
    this.sending++;
    const { call, writer } = this.start(path, decode, opts.deadline, () => this.sending--);
    const response = new Promise<T>((resolve, reject) => {
      let answer: { value: T } | undefined;
      call.on('data', (v: T) => (answer ??= { value: v }));
      call.on('end', () => (answer ? resolve(answer.value) : reject(grpcCallError(grpc.status.INTERNAL, 'the coordinator ended the call without a response'))));
      call.on('error', reject);
    });
    return { write: (parts) => writer.write(parts), end: () => writer.end(), response };
  }

  private start<T>(path: string, decode: (b: Buffer) => T, deadline: number | undefined, settled?: () => void): { call: ServerStream<T>; writer: RequestWriter } {
    this.active++;
    const call = new ServerStream<T>(decode, this.pool, () => {
      settled?.();
      this.callDone();
    });
    const writer = new RequestWriter(() => call.over);
    if (this.closed) {
      call.failStart(grpc.status.UNAVAILABLE, 'channel has been shut down (the site client was closed)');
      writer.attach(undefined);
      return { call, writer };
    }
    const open = async (): Promise<void> => {
      let auth: Record<string, string>;
      try {
        auth = await this.o.authHeaders();
      } catch (e) {
        return call.failStart(grpc.status.UNAUTHENTICATED, `could not sign a site token: ${(e as Error).message}`);
      }
      if (call.destroyed) return;
      let session: http2.ClientHttp2Session;
      try {
        session = await this.connect();
      } catch (e) {
        return call.failStart(grpc.status.UNAVAILABLE, `cannot connect to the coordinator: ${(e as Error).message}`);
      }
      if (call.destroyed) return;
      try {
        session.ref();
        const headers: http2.OutgoingHttpHeaders = {
          ':method': 'POST',
          ':path': path,
          'content-type': 'application/grpc',
          te: 'trailers',
          'user-agent': 'medfl-site (node http2)',
          ...auth,
        };
        if (deadline !== undefined) headers['grpc-timeout'] = formatGrpcTimeout(deadline - Date.now());
        const req = session.request(headers);
        const touch = this.watches.get(session)?.touch;
        call.attach(req, deadline, touch);
        writer.attach(req);
      } catch (e) {
        call.failStart(grpc.status.UNAVAILABLE, `could not open a stream to the coordinator: ${(e as Error).message}`);
      }
    };
    // Whatever happened, writes stop waiting: they go to the stream, or return at once on a failed call.
    void open().finally(() => writer.attach(undefined));
    return { call, writer };
  }

  close(): void {
    this.closed = true;
    const s = this.session;
    this.session = undefined;
    if (s && !s.destroyed) s.close();
  }

  private callDone(): void {
    this.active--;
    // An idle session must not keep the process alive (grpc-js channels behave the same).
    if (this.active === 0 && this.session && !this.session.destroyed) this.session.unref();
  }

  /** The live session, or a new one (through the environment's proxy, if any); concurrent callers share it. */
  private connect(): Promise<http2.ClientHttp2Session> {
    const live = this.session;
    if (live && !live.closed && !live.destroyed) return Promise.resolve(live);
    this.connecting ??= this.newSession().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async newSession(): Promise<http2.ClientHttp2Session> {
    const { host, port, windowBytes } = this.o;
    const authority = `${host.includes(':') ? `[${host}]` : host}:${port}`;
    const tlsOptions: tls.ConnectionOptions = {
      ca: this.o.caPem,
      cert: this.o.clientCertificate?.certPem,
      key: this.o.clientCertificate?.keyPem,
      // SNI carries names only; an address is still checked against the certificate's IP entries.
      ...(isIP(host) ? {} : { servername: host }),
      ALPNProtocols: ['h2'],
    };
    // Same proxy rules as grpc-js applies to the site's other calls (proxy.ts); TLS runs inside the tunnel.
    const proxy = proxyFor(host);
    const tunnel = proxy ? await connectTunnel(proxy, authority) : undefined;
    if (this.closed) {
      tunnel?.destroy();
      throw new Error('channel has been shut down (the site client was closed)');
    }
    const session = http2.connect(`https://${authority}`, {
      ...tlsOptions,
      ...(tunnel ? { createConnection: () => tls.connect({ ...tlsOptions, socket: tunnel, host }) } : {}),
      settings: { enablePush: false, initialWindowSize: Math.min(windowBytes, 2 ** 31 - 1) },
      // Node refuses new streams once a session holds this much unprocessed data; a wide window needs room.
      maxSessionMemory: Math.max(10, Math.ceil((2 * windowBytes) / 2 ** 20)),
    });
    session.on('connect', () => {
      try {
        session.setLocalWindowSize(windowBytes);
      } catch {
        /* closed meanwhile: its streams fail on their own */
      }
    });
    // Streams report the failure themselves; the next call opens a new session.
    session.on('error', () => undefined);
    session.on('goaway', () => {
      if (this.session === session) this.session = undefined;
    });
    session.on('close', () => {
      if (this.session === session) this.session = undefined;
    });
    session.setTimeout(5 * 60_000, () => {
      if (this.active === 0) session.close();
    });
    const every = this.o.keepaliveMs ?? 20_000;
    const timeout = this.o.keepaliveTimeoutMs ?? 10_000;
    const uploadTimeout = Math.max(timeout, this.o.uploadKeepaliveTimeoutMs ?? 120_000);
    const watch = new SessionWatch(session, () => this.active > 0, every, () => (this.sending > 0 ? uploadTimeout : timeout), Math.max(10, Math.min(every, timeout) / 2));
    this.watches.set(session, watch);
    this.session = session;
    return session;
  }

}
