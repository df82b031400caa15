/**
 * The coordinator's side of the two bulk calls, DownloadModel and UploadUpdate, served on node:http2 directly,
 * beside grpc-js's server, which keeps every other call (and every session: keepalive, limits).
 *
 * Why: with grpc-js's server, every 2 MiB message costs a fresh framed copy on the way out and a fresh
 * reassembled buffer on the way in, plus its per-message stream machinery; with the site's client already lean,
 * the coordinator was the side holding model downloads at ~0.55–0.7× of raw TLS (bench/README.md). Here model
 * chunks leave straight from the handler's reused read buffers (a 5-byte prefix written beside them) and
 * upload chunks are reassembled into buffers the file-writer thread hands back.
 *
 * What stays exactly as with grpc-js: the handlers (federation-service.ts) run unchanged on a call object
 * offering what they use of grpc-js's (request, metadata, write/end, data/end/cancelled events, pause/resume,
 * emit('error'), the unary callback); every call is authenticated first by the same check as the interceptor
 * (siteCallAuthenticator: client certificate under mTLS, then the token), and the verified site is stamped into
 * the metadata the same way; statuses, trailers-only errors, grpc-timeout and message limits follow the gRPC
 * HTTP/2 protocol, so grpc-js clients (older sites) and the site's lean client both work against it.
 *
 * It hooks in by taking over grpc-js's 'stream' listeners on its HTTP/2 servers and passing on every stream
 * that is not one of these two methods. grpc-js 1.14 has no public hook for this; if its internals change,
 * routeBulkCalls returns undefined and grpc-js keeps serving the bulk calls (slower, same behaviour).
 */
import http2 from 'node:http2';
import { EventEmitter } from 'node:events';
import { TLSSocket } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { AUTHENTICATED_SITE_KEY } from '../../shared/protocol/grpc.ts';
import { MessagePool, MessageReader, encodeGrpcMessage, grpcPrefix, parseGrpcTimeout } from '../../shared/protocol/grpc-frames.ts';
import type { Logger } from '../../shared/util/log.ts';
import { authFailure, type siteCallAuthenticator } from '../auth/interceptor.ts';
import type { FailureLimiter } from '../auth/failure-limiter.ts';

type Handler = (call: never, cb: grpc.sendUnaryData<unknown>) => void;

export interface BulkMethod {
  definition: grpc.MethodDefinition<unknown, unknown>;
  /** The grpc-js handler; it receives a BulkCall, which offers what the service's handlers use. */
  handler: Handler;
}

export interface BulkRouteOptions {
  /** By full path, e.g. /medfl.v1.Federation/DownloadModel; a server-streaming or client-streaming method each. */
  methods: Map<string, BulkMethod>;
  /** The interceptor's check (siteCallAuthenticator): the site, or an AuthError. */
  authenticate: ReturnType<typeof siteCallAuthenticator>;
  maxMessageBytes: number;
  log: Logger;
  /** The interceptor's per-peer limit on failed calls (failure-limiter.ts), shared with it. */
  limiter?: FailureLimiter;
}

interface Status { code: grpc.status; details: string }

const statusHeaders = (s: Status): http2.OutgoingHttpHeaders => ({ 'grpc-status': String(s.code), 'grpc-message': encodeGrpcMessage(s.details) });

/** What grpc-js reports as the call's auth context: the peer certificate only if TLS verified it. */
function authContextOf(stream: http2.ServerHttp2Stream) {
  const socket = stream.session?.socket;
  if (!(socket instanceof TLSSocket) || !socket.authorized) return {};
  const peerCertificate = socket.getPeerCertificate();
  return { transportSecurityType: 'ssl', sslPeerCertificate: peerCertificate.raw ? peerCertificate : undefined };
}

/**
 * One call on a raw HTTP/2 stream, shaped like grpc-js's server call objects for what our handlers use.
 * Incoming messages are decoded and emitted as 'data' (client streams); outgoing ones are framed without a copy.
 */
export class BulkCall extends EventEmitter {
  cancelled = false;
  /** The request message (server-streaming methods). */
  request: unknown;
  private headersSent = false;
  private status: Status | undefined;
  private readonly reader: MessageReader;
  private readonly queue: unknown[] = [];
  private paused = false;
  private ended = false;
  private endEmitted = false;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly stream: http2.ServerHttp2Stream,
    readonly metadata: grpc.Metadata,
    private readonly definition: grpc.MethodDefinition<unknown, unknown>,
    private readonly pool: MessagePool,
    deadlineMs: number | undefined,
  ) {
    super();
    this.reader = new MessageReader(pool);
    // Handlers end a call with emit('error', { code, details }), as with grpc-js (which listens for it too).
    this.on('error', (e: Partial<grpc.ServiceError>) => this.sendStatus(e.code ?? grpc.status.UNKNOWN, e.details ?? e.message ?? 'error'));
    stream.on('error', () => undefined); // 'close' follows and is handled there
    stream.on('close', () => {
      if (this.timer) clearTimeout(this.timer);
      this.reader.reset();
      if (this.cancelled) return;
      this.cancelled = true; // grpc-js also reports a finished call's stream closing as 'cancelled'
      this.emit('cancelled');
    });
    // Beyond setTimeout's range (~24.8 days) Node would fire at once: treat such a deadline as none.
    if (deadlineMs !== undefined && deadlineMs < 2 ** 31 - 1) {
      this.timer = setTimeout(() => {
        this.sendStatus(grpc.status.DEADLINE_EXCEEDED, 'Deadline exceeded');
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      }, deadlineMs);
    }
  }

  /** Starts reading request messages; `onRequestDone` runs once the client has sent all of them. */
  startReading(onMessage: (value: unknown) => void, onRequestDone: () => void): void {
    this.stream.on('data', (piece: Buffer) => {
      if (this.status) return;
      const problem = this.reader.push(piece, (m) => {
        let value: unknown;
        try {
          value = this.definition.requestDeserialize(m);
        } catch (e) {
          this.sendStatus(grpc.status.INTERNAL, `could not parse the request message: ${(e as Error).message}`);
          return false;
        }
        onMessage(value);
        return !this.status;
      });
      if (problem?.kind === 'compressed') this.sendStatus(grpc.status.UNIMPLEMENTED, 'compressed messages are not accepted; send them uncompressed');
      if (problem?.kind === 'too-large') this.sendStatus(grpc.status.RESOURCE_EXHAUSTED, `Received message larger than max (${problem.length} vs. ${problem.max})`);
    });
    const ended = () => {
      if (this.status) return;
      if (!this.reader.atBoundary) return this.sendStatus(grpc.status.INTERNAL, 'the request ended inside a message');
      onRequestDone();
    };
    // A request without DATA (END_STREAM on its headers) has already emitted 'end' while we authenticated.
    if (this.stream.readableEnded) setImmediate(ended);
    else this.stream.on('end', ended);
    this.stream.resume();
  }

  // ── client-streaming calls (grpc.ServerReadableStream) ──

  /** Queues a decoded request message for 'data' (held while paused). */
  enqueue(value: unknown): void {
    this.queue.push(value);
    this.flush();
  }

  requestEnded(): void {
    this.ended = true;
    this.flush();
  }

  pause(): this {
    this.paused = true;
    this.stream.pause();
    return this;
  }

  resume(): this {
    this.paused = false;
    this.stream.resume();
    this.flush();
    return this;
  }

  /** Gives the memory of a received message back for later messages (e.g. once its chunk is on disk). */
  recycle(view: Uint8Array): void {
    this.pool.give(view);
  }

  private flush(): void {
    while (!this.paused && this.queue.length > 0 && !this.status) this.emit('data', this.queue.shift());
    if (!this.paused && this.queue.length === 0 && this.ended && !this.endEmitted && !this.status) {
      this.endEmitted = true;
      this.emit('end');
    }
  }

  /** grpc-js's unary callback for client-streaming methods. */
  readonly answer = (err: Partial<grpc.ServiceError> | null, value?: unknown): void => {
    if (err) return this.sendStatus(err.code ?? grpc.status.UNKNOWN, err.details ?? err.message ?? 'error');
    if (this.status || this.stream.closed) return;
    this.write(value);
    this.sendStatus(grpc.status.OK, '');
  };

  // ── server-streaming calls (grpc.ServerWritableStream) ──

  /**
   * Sends one message: the prefix, then the serialised bytes as they are (no copy); `cb` once HTTP/2 has them.
   * On a call that is over nothing is sent and `cb` never runs (the message's memory simply stays with the
   * caller's garbage): a callback would invite the caller to read and send the next chunk.
   */
  write(message: unknown, cb?: (err?: Error | null) => void): boolean {
    if (this.status || this.stream.closed || this.stream.destroyed) return false;
    const bytes = this.definition.responseSerialize(message);
    this.respond();
    this.stream.cork();
    this.stream.write(grpcPrefix(bytes.length));
    const ok = this.stream.write(bytes, cb);
    this.stream.uncork();
    return ok;
  }

  end(): void {
    this.sendStatus(grpc.status.OK, '');
  }

  private respond(): void {
    if (this.headersSent) return;
    this.headersSent = true;
    this.stream.respond({ ':status': 200, 'content-type': 'application/grpc+proto', 'grpc-accept-encoding': 'identity' }, { waitForTrailers: true });
    this.stream.on('wantTrailers', () => {
      this.stream.sendTrailers(statusHeaders(this.status ?? { code: grpc.status.OK, details: '' }));
      // A client still sending is told to stop once the trailers are out (RST_STREAM NO_ERROR after our
      // END_STREAM); sooner, the reset could overtake them.
      if (!this.stream.readableEnded) setImmediate(() => this.stream.closed || this.stream.close(http2.constants.NGHTTP2_NO_ERROR));
    });
  }

  /** Ends the call with a status (trailers, or a trailers-only response when nothing was sent yet). Once. */
  sendStatus(code: grpc.status, details: string): void {
    if (this.status) return;
    this.status = { code, details };
    this.queue.length = 0;
    this.reader.reset();
    if (this.stream.closed || this.stream.destroyed) return;
    if (!this.headersSent) {
      this.headersSent = true;
      refuse(this.stream, code, details);
    } else {
      this.stream.end(); // the trailers follow ('wantTrailers')
    }
  }
}

/** A trailers-only response: the status and nothing else. A client still sending is then told to stop. */
function refuse(stream: http2.ServerHttp2Stream, code: grpc.status, details: string): void {
  stream.on('error', () => undefined);
  if (stream.closed || stream.destroyed) return;
  stream.respond({ ':status': 200, 'content-type': 'application/grpc+proto', ...statusHeaders({ code, details }) }, { endStream: true });
  if (!stream.readableEnded) setImmediate(() => stream.closed || stream.close(http2.constants.NGHTTP2_NO_ERROR));
}

function serve(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, method: BulkMethod, pool: MessagePool, o: BulkRouteOptions): void {
  const path = String(headers[':path']);
  const encoding = headers['grpc-encoding'];
  if (encoding !== undefined && encoding !== 'identity') return refuse(stream, grpc.status.UNIMPLEMENTED, `grpc-encoding "${String(encoding)}" is not supported; send messages uncompressed`);
  // Nothing is read before the call is authenticated (flow control holds the client meanwhile).
  stream.pause();
  const peer = `${stream.session?.socket?.remoteAddress}:${stream.session?.socket?.remotePort}`;
  const refusal = o.limiter?.refusal(peer, path);
  if (refusal !== undefined) return refuse(stream, grpc.status.RESOURCE_EXHAUSTED, refusal);
  const metadata = grpc.Metadata.fromHttp2Headers(headers);
  o.authenticate(metadata, () => authContextOf(stream)).then(
    (site) => {
      if (stream.closed || stream.destroyed) return;
      metadata.remove(AUTHENTICATED_SITE_KEY);
      metadata.set(AUTHENTICATED_SITE_KEY, site);
      o.log.debug({ site, method: path }, 'site call authenticated');
      run(stream, headers, method, metadata, pool, o.log);
    },
    (err: unknown) => {
      const e = authFailure(err);
      const info = { method: path, code: grpc.status[e.code], reason: e.message };
      if (o.limiter && e.code !== grpc.status.UNAVAILABLE) o.limiter.failure(peer, info);
      else o.log.warn({ ...info, peer }, 'site call rejected');
      refuse(stream, e.code, e.message);
    },
  );
}

function run(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, method: BulkMethod, metadata: grpc.Metadata, pool: MessagePool, log: Logger): void {
  const call = new BulkCall(stream, metadata, method.definition, pool, parseGrpcTimeout(headers['grpc-timeout']));
  // A handler that throws ends its call, not the coordinator (grpc-js does the same).
  const handler = (c: BulkCall, cb: grpc.sendUnaryData<unknown>) => {
    try {
      (method.handler as (call: BulkCall, cb: grpc.sendUnaryData<unknown>) => void)(c, cb);
    } catch (e) {
      log.error({ method: String(headers[':path']), err: (e as Error).message }, 'bulk call handler failed');
      c.sendStatus(grpc.status.INTERNAL, `the coordinator failed to handle the call: ${(e as Error).message}`);
    }
  };
  if (method.definition.requestStream) {
    call.startReading((v) => call.enqueue(v), () => call.requestEnded());
    handler(call, call.answer as grpc.sendUnaryData<unknown>);
    return;
  }
  // Server streaming: exactly one request message, then the handler.
  let requests = 0;
  call.startReading(
    (v) => {
      requests++;
      call.request = v;
      if (requests > 1) call.sendStatus(grpc.status.UNIMPLEMENTED, 'received a second request message for a server-streaming method');
    },
    () => {
      if (requests === 0) return call.sendStatus(grpc.status.UNIMPLEMENTED, 'no request message for a server-streaming method');
      handler(call, call.answer as grpc.sendUnaryData<unknown>);
    },
  );
}

/** The switch routeBulkCalls installs: while `enabled` is false, grpc-js serves the bulk calls too (benchmarks). */
export interface BulkRouting {
  enabled: boolean;
}

/**
 * Serves `methods` on grpc-js's HTTP/2 servers (after bindAsync) and passes every other stream to grpc-js.
 * Returns undefined, changing nothing, where grpc-js's internals are not as expected.
 */
export function routeBulkCalls(server: grpc.Server, o: BulkRouteOptions): BulkRouting | undefined {
  const servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(servers instanceof Map) || servers.size === 0) return undefined;
  const h2s = [...servers.keys()] as http2.Http2SecureServer[];
  if (!h2s.every((h) => typeof h?.listeners === 'function' && h.listeners('stream').length === 1)) return undefined;
  const pool = new MessagePool(o.maxMessageBytes);
  const routing: BulkRouting = { enabled: true };
  // grpc-js counts open streams per session for grpc.max_connection_idle_ms; ours must count too, or a session
  // busy with a long download could be closed as idle (no effect while that option is unset, as now).
  const countStream = (server as unknown as { onStreamOpened?: (s: http2.ServerHttp2Stream) => void }).onStreamOpened;
  for (const h2 of h2s) {
    const [grpcStream] = h2.listeners('stream') as ((...args: unknown[]) => void)[];
    h2.removeAllListeners('stream');
    h2.on('stream', (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, ...rest: unknown[]) => {
      const method = routing.enabled ? o.methods.get(String(headers[':path'])) : undefined;
      const grpcRequest = headers[':method'] === 'POST' && String(headers['content-type'] ?? '').startsWith('application/grpc');
      if (!method || !grpcRequest) return grpcStream!.call(h2, stream, headers, ...rest);
      if (typeof countStream === 'function') countStream.call(server, stream);
      serve(stream, headers, method, pool, o);
    });
  }
  return routing;
}
