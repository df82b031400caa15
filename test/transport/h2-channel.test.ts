/**
 * The lean HTTP/2 gRPC client (site-agent/transport/h2-channel.ts) against a real grpc-js server over TLS:
 * messages and statuses as grpc-js would deliver them, deadlines, cancellation, size limits, a wrong CA, a
 * server that is down or restarts, flow control, buffer reuse, and client streams with early answers.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import { proxyFor } from '../../site-agent/transport/proxy.ts';
import * as grpc from '@grpc/grpc-js';
import { createCertificateAuthority, issueServerCertificate, serverCredentials, type CertificateAuthority, type ServerCertificate } from '../../shared/security/pki.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { H2Channel, type GrpcCallError, type ServerStreamCall } from '../../site-agent/transport/h2-channel.ts';
import { SERVER_FLOW_CONTROL_WINDOW, widenServerWindows } from '../../coordinator/coordinator.ts';
import { pino } from 'pino';

const pass = (b: Buffer) => b;
const SERVICE: grpc.ServiceDefinition = {
  Stream: { path: '/test.T/Stream', requestStream: false, responseStream: true, requestSerialize: pass, requestDeserialize: pass, responseSerialize: pass, responseDeserialize: pass, originalName: 'Stream' },
  Collect: { path: '/test.T/Collect', requestStream: true, responseStream: false, requestSerialize: pass, requestDeserialize: pass, responseSerialize: pass, responseDeserialize: pass, originalName: 'Collect' },
};

/** Bytes that tell message i from message j, and byte k from byte l. */
function pattern(i: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  for (let k = 0; k < size; k++) b[k] = (i * 31 + k * 7) & 0xff;
  return b;
}

interface ServerLog { auth: string[]; cancelled: number; written: number }

function startServer(cert: ServerCertificate, port = 0): Promise<{ server: grpc.Server; port: number; log: ServerLog }> {
  const log: ServerLog = { auth: [], cancelled: 0, written: 0 };
  const server = new grpc.Server({ 'grpc.max_send_message_length': 8 << 20, 'grpc.max_receive_message_length': 8 << 20 });
  server.addService(SERVICE, {
    Stream(call: grpc.ServerWritableStream<Buffer, Buffer>) {
      log.auth.push(String(call.metadata.get('authorization')[0] ?? ''));
      call.on('cancelled', () => log.cancelled++);
      const [cmd, a, b] = call.request.toString().split(':');
      if (cmd === 'ok') {
        const n = Number(a);
        let i = 0;
        const pump = () => {
          while (i < n) {
            const ok = call.write(pattern(i, Number(b)));
            i++;
            log.written = i;
            if (!ok) return void call.once('drain', pump);
          }
          call.end();
        };
        pump();
      } else if (cmd === 'fail-early') {
        call.emit('error', { code: grpc.status.NOT_FOUND, details: 'no model 5% ü here' });
      } else if (cmd === 'fail-late') {
        call.write(pattern(0, 100));
        call.write(pattern(1, 100));
        call.emit('error', { code: grpc.status.PERMISSION_DENIED, details: 'site revoked' });
      } else if (cmd === 'hang') {
        call.write(pattern(0, 10));
      }
    },
    Collect(call: grpc.ServerReadableStream<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) {
      const parts: Buffer[] = [];
      let answered = false;
      call.on('data', (m: Buffer) => {
        if (answered) return;
        if (m.toString() === 'refuse') {
          answered = true;
          cb(null, Buffer.from('refused early'));
          return;
        }
        if (m.toString() === 'error') {
          answered = true;
          cb({ code: grpc.status.INVALID_ARGUMENT, details: 'bad chunk' });
          return;
        }
        parts.push(Buffer.from(m));
      });
      call.on('end', () => {
        if (!answered) cb(null, Buffer.from(`${parts.length}:${sha256Hex(Buffer.concat(parts))}`));
      });
    },
  });
  return new Promise((resolve, reject) =>
    server.bindAsync(`127.0.0.1:${port}`, serverCredentials(cert), (err, bound) => (err ? reject(err) : resolve({ server, port: bound, log }))),
  );
}

let ca: CertificateAuthority;
let cert: ServerCertificate;
let srv: { server: grpc.Server; port: number; log: ServerLog };
const channels: H2Channel[] = [];

function channel(opts: { port?: number; caPem?: string; windowBytes?: number; maxMessageBytes?: number; keepaliveMs?: number; keepaliveTimeoutMs?: number; uploadKeepaliveTimeoutMs?: number } = {}): H2Channel {
  let n = 0;
  const c = new H2Channel({
    host: 'localhost',
    port: opts.port ?? srv.port,
    caPem: opts.caPem ?? ca.certPem,
    authHeaders: async () => ({ authorization: `Bearer token-${++n}` }),
    windowBytes: opts.windowBytes ?? 4 << 20,
    maxMessageBytes: opts.maxMessageBytes ?? 4 << 20,
    keepaliveMs: opts.keepaliveMs,
    keepaliveTimeoutMs: opts.keepaliveTimeoutMs,
    uploadKeepaliveTimeoutMs: opts.uploadKeepaliveTimeoutMs,
  });
  channels.push(c);
  return c;
}

function collect(call: ServerStreamCall<Buffer>, onMessage?: (m: Buffer) => void): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const got: Buffer[] = [];
    call.on('data', (m: Buffer) => {
      got.push(m);
      onMessage?.(m);
    });
    call.on('end', () => resolve(got));
    call.on('error', (e) => reject(Object.assign(e, { got })));
  });
}

const stream = (c: H2Channel, cmd: string, deadline?: number) => c.serverStream('/test.T/Stream', Buffer.from(cmd), pass, { deadline });

beforeAll(async () => {
  ca = await createCertificateAuthority({ commonName: 'h2 test CA', validDays: 1 });
  cert = await issueServerCertificate(ca, { hosts: ['localhost', '127.0.0.1'], validDays: 1 });
  srv = await startServer(cert);
});

afterAll(() => {
  for (const c of channels) c.close();
  srv.server.forceShutdown();
});

describe('H2Channel server streams', () => {
  it('delivers every message intact and in order, with a fresh auth header per call', async () => {
    const c = channel();
    const got = await collect(stream(c, 'ok:20:300000'));
    expect(got.length).toBe(20);
    got.forEach((m, i) => expect(m.equals(pattern(i, 300000))).toBe(true));
    await collect(stream(c, 'ok:1:10'));
    expect(srv.log.auth.slice(-2)).toEqual(['Bearer token-1', 'Bearer token-2']);
  });

  it('gives the status of a trailers-only error (percent-encoded text decoded)', async () => {
    await expect(collect(stream(channel(), 'fail-early'))).rejects.toMatchObject({ code: grpc.status.NOT_FOUND, details: 'no model 5% ü here', message: '5 NOT_FOUND: no model 5% ü here' });
  });

  it('delivers the messages sent before an error, then the error', async () => {
    const err = await collect(stream(channel(), 'fail-late')).catch((e: GrpcCallError & { got: Buffer[] }) => e);
    expect(err).toMatchObject({ code: grpc.status.PERMISSION_DENIED, details: 'site revoked' });
    expect((err as { got: Buffer[] }).got.length).toBe(2);
  });

  it('ends a call at its deadline, and the server sees it cancelled', async () => {
    const before = srv.log.cancelled;
    const t0 = Date.now();
    await expect(collect(stream(channel(), 'hang', Date.now() + 300))).rejects.toMatchObject({ code: grpc.status.DEADLINE_EXCEEDED });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    await expect.poll(() => srv.log.cancelled).toBe(before + 1);
  });

  it('cancel() ends the call with CANCELLED and the server sees it', async () => {
    const before = srv.log.cancelled;
    const call = stream(channel(), 'hang');
    const done = collect(call, () => call.cancel());
    await expect(done).rejects.toMatchObject({ code: grpc.status.CANCELLED });
    await expect.poll(() => srv.log.cancelled).toBe(before + 1);
  });

  it('refuses a message over the size limit', async () => {
    await expect(collect(stream(channel({ maxMessageBytes: 1000 }), 'ok:1:5000'))).rejects.toMatchObject({ code: grpc.status.RESOURCE_EXHAUSTED, details: expect.stringMatching(/5000 vs\. 1000/) });
  });

  it('refuses a coordinator whose certificate is not from the pinned CA', async () => {
    const other = await createCertificateAuthority({ commonName: 'someone else', validDays: 1 });
    await expect(collect(stream(channel({ caPem: other.certPem }), 'ok:1:10'))).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/certificate/i) });
  });

  it('reports a coordinator that is down as UNAVAILABLE, and reconnects once it is back', async () => {
    const back = await startServer(cert);
    const c = channel({ port: back.port });
    expect((await collect(stream(c, 'ok:2:10'))).length).toBe(2);
    back.server.forceShutdown();
    await expect(collect(stream(c, 'ok:2:10'))).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
    const again = await startServer(cert, back.port);
    try {
      expect((await collect(stream(c, 'ok:3:10'))).length).toBe(3);
    } finally {
      again.server.forceShutdown();
    }
  });

  it('holds the server back while the consumer is paused (HTTP/2 flow control), then delivers everything', async () => {
    const c = channel({ windowBytes: 1 << 20 });
    const call = stream(c, 'ok:64:1000000');
    const got: Buffer[] = [];
    call.on('data', (m: Buffer) => {
      got.push(m);
      if (got.length === 1) {
        call.pause();
        setTimeout(() => call.resume(), 400);
      }
    });
    await new Promise((r) => setTimeout(r, 300));
    // 64 MB asked for; with a 1 MiB window the server cannot have got far.
    expect(srv.log.written).toBeLessThan(20);
    await once(call, 'end');
    expect(got.length).toBe(64);
    got.forEach((m, i) => expect(m.equals(pattern(i, 1000000))).toBe(true));
  });

  it('reuses the memory of recycled messages, and only theirs', async () => {
    const c = channel();
    const kept = await collect(stream(c, 'ok:6:200000'));
    expect(new Set(kept.map((m) => m.buffer)).size).toBe(6); // nothing recycled: all distinct
    const seen = new Set<ArrayBufferLike>();
    let reused = 0;
    let i = 0;
    const call = stream(c, 'ok:6:200000');
    const got = await collect(call, (m) => {
      if (seen.has(m.buffer)) reused++;
      seen.add(m.buffer);
      expect(m.equals(pattern(i++, 200000))).toBe(true);
      call.recycle(m);
    });
    expect(got.length).toBe(6);
    expect(reused).toBeGreaterThan(0);
    // Earlier messages nobody recycled still hold their bytes.
    kept.forEach((m, i) => expect(m.equals(pattern(i, 200000))).toBe(true));
  });

  it('gives small messages memory of their own (safe to transfer to a worker)', async () => {
    const [m] = await collect(stream(channel(), 'ok:1:100'));
    expect(m!.buffer.byteLength).toBe(100);
  });
});

describe('H2Channel client streams', () => {
  it('sends messages made of parts without changing a byte, and returns the answer', async () => {
    const c = channel();
    const call = c.clientStream('/test.T/Collect', pass);
    const big = pattern(3, 3_000_000);
    await call.write([Buffer.from('ab'), Buffer.from('cd')]);
    await call.write([big.subarray(0, 1_000_000), big.subarray(1_000_000)]);
    await call.end();
    const answer = (await call.response).toString();
    expect(answer).toBe(`2:${sha256Hex(Buffer.concat([Buffer.from('abcd'), big]))}`);
  });

  it('resolves with an early answer and lets later writes return without error', async () => {
    const call = channel().clientStream('/test.T/Collect', pass);
    await call.write([Buffer.from('refuse')]);
    for (let i = 0; i < 20; i++) await call.write([pattern(i, 500_000)]);
    await call.end();
    expect((await call.response).toString()).toBe('refused early');
  });

  it('rejects with the status of an error answer', async () => {
    const call = channel().clientStream('/test.T/Collect', pass);
    await call.write([Buffer.from('error')]);
    await call.end();
    await expect(call.response).rejects.toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: 'bad chunk' });
  });

  it('fails calls on a closed channel with a clear error', async () => {
    const c = channel();
    c.close();
    const call = c.clientStream('/test.T/Collect', pass);
    await call.write([Buffer.from('x')]);
    await expect(call.response).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/shut down/) });
  });
});

describe('H2Channel keepalive', () => {
  /**
   * A TCP relay on loopback to `targetPort`: `wire` connects each accepted socket (site side, `a`) to its
   * server-side socket (`b`) and may return a cleanup; errors are ignored and a close on one side closes the other.
   */
  async function relay(targetPort: number, wire: (a: net.Socket, b: net.Socket) => (() => void) | void): Promise<{ port: number; sockets: net.Socket[]; close: () => void }> {
    const sockets: net.Socket[] = [];
    const cleanups: (() => void)[] = [];
    const server = net.createServer((a) => {
      const b = net.connect(targetPort, '127.0.0.1');
      sockets.push(a, b);
      const cleanup = wire(a, b);
      if (cleanup) cleanups.push(cleanup);
      for (const [x, y] of [[a, b], [b, a]]) {
        x.on('error', () => undefined);
        x.on('close', () => y.destroy());
      }
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return {
      port: (server.address() as net.AddressInfo).port,
      sockets,
      close: () => {
        server.close();
        cleanups.forEach((f) => f());
        for (const x of sockets) x.destroy();
      },
    };
  }

  /**
   * A relay to the server whose open connections can go silent: they then drop everything, both ways, and
   * close nothing (no RST, no FIN), like a network path that died. Later connections relay normally.
   */
  async function silentRelay(): Promise<{ port: number; silence: () => void; close: () => void }> {
    const silenced = new Set<net.Socket>();
    const r = await relay(srv.port, (a, b) => {
      a.on('data', (d) => void (silenced.has(a) || b.write(d)));
      b.on('data', (d) => void (silenced.has(a) || a.write(d)));
    });
    return { port: r.port, silence: () => r.sockets.forEach((x) => silenced.add(x)), close: r.close };
  }

  it('fails a call UNAVAILABLE, with the reason, once the network goes silent mid-call, and reconnects for the next', async () => {
    const relay = await silentRelay();
    try {
      const c = channel({ port: relay.port, keepaliveMs: 200, keepaliveTimeoutMs: 600 });
      const call = stream(c, 'hang'); // one message, then the server waits: the call stays open
      let t0 = 0;
      const outcome = collect(call, () => {
        relay.silence();
        t0 = Date.now();
      });
      await expect(outcome).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/stopped answering .*keepalive ping unanswered/) });
      // Silence is noticed after keepaliveMs without bytes, plus keepaliveTimeoutMs without an answer.
      expect(Date.now() - t0).toBeGreaterThanOrEqual(700);
      expect(Date.now() - t0).toBeLessThan(8_000);
      // The dead connection is gone: the next call opens a new one.
      expect(await collect(stream(c, 'ok:3:100'))).toHaveLength(3);
    } finally {
      relay.close();
    }
  });

  /**
   * A slow uplink: the relay passes the site's bytes on at `bytesPerSecond` and stops reading from the site while
   * more than 64 KiB wait, so the backlog builds up on the site's side, as behind a slow line.
   */
  async function slowUplink(bytesPerSecond: number, targetPort: number): Promise<{ port: number; close: () => void }> {
    const r = await relay(targetPort, (a, b) => {
      const queue: Buffer[] = [];
      let queued = 0;
      a.on('data', (d) => {
        queue.push(d);
        queued += d.length;
        if (queued > 64 * 1024) a.pause();
      });
      b.on('data', (d) => a.write(d));
      const tick = 20;
      const timer = setInterval(() => {
        let budget = (bytesPerSecond * tick) / 1000;
        while (budget > 0 && queue.length > 0) {
          const head = queue[0]!;
          const n = Math.min(budget, head.length);
          b.write(head.subarray(0, n));
          if (n === head.length) queue.shift();
          else queue[0] = head.subarray(n);
          queued -= n;
          budget -= n;
        }
        if (queued <= 64 * 1024 && a.isPaused()) a.resume();
      }, tick);
      return () => clearInterval(timer);
    });
    return { port: r.port, close: r.close };
  }

  it('never drops a slow upload that keeps moving, though its pings wait behind the queued data', async () => {
    // A server granting the coordinator's 32 MiB windows: the whole upload can queue up on the site's side.
    const wide = await startServer(cert);
    widenServerWindows(wide.server, SERVER_FLOW_CONTROL_WINDOW, pino({ level: 'silent' }));
    const link = await slowUplink(1 << 20, wide.port);
    try {
      // The 3 MiB sit in the sockets' buffers and the send window stands still for the ~3 s they take to drain, so
      // a ping goes out and waits behind them: with uploadKeepaliveTimeoutMs at 200 ms the session was dropped (the
      // bug this guards against); with 10 s it must not be.
      const c = channel({ port: link.port, keepaliveMs: 150, keepaliveTimeoutMs: 200, uploadKeepaliveTimeoutMs: 10_000 });
      const call = c.clientStream('/test.T/Collect', pass);
      const parts = Array.from({ length: 12 }, (_, i) => pattern(i, 256 * 1024)); // 3 MiB: ~3 s on this link
      for (const p of parts) await call.write([p]);
      await call.end();
      expect((await call.response).toString()).toBe(`12:${sha256Hex(Buffer.concat(parts))}`);
    } finally {
      link.close();
      wide.server.forceShutdown();
    }
  });

  it('fails an upload UNAVAILABLE once the network goes silent under it, and reconnects for the next', async () => {
    const relay = await silentRelay();
    try {
      const c = channel({ port: relay.port, keepaliveMs: 200, keepaliveTimeoutMs: 300, uploadKeepaliveTimeoutMs: 600 });
      const call = c.clientStream('/test.T/Collect', pass);
      call.response.catch(() => undefined);
      await call.write([pattern(0, 64 * 1024)]);
      relay.silence();
      const t0 = Date.now();
      // Far more than the server's flow-control windows: the writes stall once the window is spent.
      void (async () => {
        for (let i = 1; i < 64; i++) await call.write([pattern(i, 256 * 1024)]);
        await call.end();
      })();
      await expect(call.response).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/stopped answering .*keepalive ping unanswered/) });
      expect(Date.now() - t0).toBeGreaterThanOrEqual(700);
      expect(Date.now() - t0).toBeLessThan(8_000);
      expect(await collect(stream(c, 'ok:3:100'))).toHaveLength(3);
    } finally {
      relay.close();
    }
  });

  it('keeps a call open while the coordinator sends nothing but answers the pings', async () => {
    // Answers get a whole second: a busy test machine must not make a live server look dead.
    const c = channel({ keepaliveMs: 100, keepaliveTimeoutMs: 1_000 });
    const call = stream(c, 'hang');
    const first = new Promise<void>((resolve) => call.once('data', () => resolve()));
    const outcome = collect(call);
    outcome.catch(() => undefined);
    await first;
    // Fifteen keepalive periods of silence from the server's side, each answered by a ping: longer than the timeout.
    await new Promise((r) => setTimeout(r, 1_500));
    call.cancel();
    await expect(outcome).rejects.toMatchObject({ code: grpc.status.CANCELLED });
  });
});

describe('H2Channel through an egress proxy (HTTP CONNECT, as grpc-js for the other calls)', () => {
  /** A CONNECT proxy on loopback: counts tunnels, or refuses them all with 407. */
  async function startProxy(refuse = false): Promise<{ port: number; tunnels: string[]; close: () => void }> {
    const tunnels: string[] = [];
    const server = http.createServer((_req, res) => res.writeHead(405).end());
    server.on('connect', (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
      if (refuse) return void client.end('HTTP/1.1 407 Proxy Authentication Required\r\n\r\n');
      tunnels.push(String(req.url));
      const [host, port] = String(req.url).split(':');
      const upstream = net.connect(Number(port), host === 'localhost' ? '127.0.0.1' : host, () => {
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
        if (head.length) upstream.write(head);
        upstream.pipe(client);
        client.pipe(upstream);
      });
      upstream.on('error', () => client.destroy());
      client.on('error', () => upstream.destroy());
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return { port: (server.address() as net.AddressInfo).port, tunnels, close: () => server.close() };
  }

  async function withEnv<T>(vars: Record<string, string | undefined>, f: () => Promise<T>): Promise<T> {
    const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
    for (const [k, v] of Object.entries(vars)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
    try {
      return await f();
    } finally {
      for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
    }
  }

  it('picks the proxy by grpc-js\'s rules', () => {
    expect(proxyFor('coord.example', { https_proxy: 'http://p:3128', http_proxy: 'http://q:1' })).toMatchObject({ host: 'p', port: 3128, from: 'https_proxy' });
    expect(proxyFor('coord.example', { grpc_proxy: 'http://u:s%40cret@g', https_proxy: 'http://p:3128' })).toMatchObject({ host: 'g', port: 80, credentials: 'u:s@cret', from: 'grpc_proxy' });
    expect(proxyFor('coord.example', { http_proxy: 'http://q:1', no_proxy: 'other.org,example' })).toBeUndefined();
    expect(proxyFor('10.1.2.3', { http_proxy: 'http://q:1', no_grpc_proxy: '10.0.0.0/8', no_proxy: 'x' })).toBeUndefined();
    expect(proxyFor('11.1.2.3', { http_proxy: 'http://q:1', no_grpc_proxy: '10.0.0.0/8' })).toMatchObject({ host: 'q' });
    expect(proxyFor('coord.example', {})).toBeUndefined();
    expect(() => proxyFor('coord.example', { https_proxy: 'socks5://p:1' })).toThrow(/only http:\/\/ proxies/);
  });

  it('tunnels the calls through the proxy, with TLS to the server inside the tunnel', async () => {
    const proxy = await startProxy();
    try {
      await withEnv({ grpc_proxy: `http://127.0.0.1:${proxy.port}`, no_grpc_proxy: undefined, no_proxy: undefined }, async () => {
        const c = channel();
        const got = await collect(stream(c, 'ok:3:100000'));
        expect(got.length).toBe(3);
        const up = c.clientStream('/test.T/Collect', pass);
        await up.write([Buffer.from('via proxy')]);
        await up.end();
        expect((await up.response).toString()).toBe(`1:${sha256Hex(Buffer.from('via proxy'))}`);
      });
      expect(proxy.tunnels).toEqual([`localhost:${srv.port}`]); // one session for both calls
    } finally {
      proxy.close();
    }
  });

  it('reports a proxy that refuses the tunnel as UNAVAILABLE, naming the proxy and its answer', async () => {
    const proxy = await startProxy(true);
    try {
      await withEnv({ https_proxy: `http://127.0.0.1:${proxy.port}`, grpc_proxy: undefined, no_grpc_proxy: undefined, no_proxy: undefined }, async () => {
        await expect(collect(stream(channel(), 'ok:1:10'))).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringMatching(/proxy 127\.0\.0\.1:\d+ \(from https_proxy\) refused CONNECT localhost:\d+: HTTP 407/) });
      });
    } finally {
      proxy.close();
    }
  });
});
