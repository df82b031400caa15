/**
 * What moving a byte costs below MedFL: the CPU seconds per GB, on both ends, of the same transfers over raw TLS, over
 * Node's HTTP/2 on TLS, and over bare grpc-js (TLS, the coordinator's and the site's options and windows, the
 * product's message sizes, no protobuf, no tokens, no files, no checks). Set beside bench:sites' cost per GB, it
 * says how much of a round's time is the transport's floor and how much is MedFL's work above it.
 *
 *   npm run bench:transport-floor -- [--connections 1000] [--transfers 1] [--concurrent 64] [--size-mb 1]
 *                                     [--layers tls,http2,grpc] [--states cold,warm] [--repeat 2]
 *
 * Each connection is one "site": it uploads `size-mb` and then downloads `size-mb`, `transfers` times, at most
 * `concurrent` sites at once (the coordinator's admission control). Connections are made before the clock starts, so
 * handshakes are not counted; "cold" starts the clock on fresh connections, "warm" after one transfer on each. The
 * server is a child process; CPU and minor page faults are each process's own (`process.resourceUsage`: every
 * thread), from the first byte to the last. Over grpc-js each upload and each download is its own call, as a site's
 * are; over HTTP/2 its own stream.
 */
import * as grpc from '@grpc/grpc-js';
import { fork, type ChildProcess } from 'node:child_process';
import * as http2 from 'node:http2';
import * as os from 'node:os';
import * as tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { widenServerWindows } from '../coordinator/server/receive-window.ts';
import { DOWNLOAD_CHUNK_BYTES } from '../coordinator/server/model-stream.ts';
import { CHANNEL_OPTIONS, CHUNK_BYTES, SERVER_FLOW_CONTROL_WINDOW, SERVER_OPTIONS } from '../shared/protocol/grpc.ts';
import {
  createCertificateAuthority,
  issueServerCertificate,
  pinnedChannelCredentials,
  serverCredentials,
  type ServerCertificate,
} from '../shared/security/pki.ts';

const LAYERS = ['tls', 'http2', 'grpc'] as const;
type Layer = (typeof LAYERS)[number];

/** This process's CPU seconds (every thread) and minor page faults (first touches of fresh memory). */
type Usage = { cpuS: number; faults: number };
const usage = (): Usage => {
  const u = process.resourceUsage();
  return { cpuS: (u.userCPUTime + u.systemCPUTime) / 1e6, faults: u.minorPageFault };
};
const since = (from: Usage): Usage => {
  const now = usage();
  return { cpuS: now.cpuS - from.cpuS, faults: now.faults - from.faults };
};

/** A service without protobuf: messages are the bytes themselves. */
const identity = (b: Buffer): Buffer => b;
const FLOOR_SERVICE = {
  upload: {
    path: '/floor.Floor/Upload',
    requestStream: true,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
  download: {
    path: '/floor.Floor/Download',
    requestStream: false,
    responseStream: true,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
} satisfies grpc.ServiceDefinition;

type Setup = { layer: Layer; sizeBytes: number; cert: ServerCertificate };
type ToServer = { op: 'start' } | { op: 'stop' };

/** What writeInPieces writes to: a socket, or a grpc-js call. */
type PieceSink = { write(chunk: Buffer): boolean; once(event: 'drain', listener: () => void): unknown; end(): unknown };

/**
 * Writes `payload` in pieces of `pieceBytes`, each once the stream takes more (as MedFL's senders do), then ends the
 * stream if `end`. Raw TLS writes 64 KiB pieces, as the coordinator's model stream does: one large write would grow
 * the socket's TLS output buffer to its size, on fresh memory (page faults) for every connection's first transfer —
 * a cost the coordinator's downloads do not have, so it is left out of the floor.
 */
function writeInPieces(sink: PieceSink, payload: Buffer, pieceBytes: number, end: boolean): void {
  let at = 0;
  const more = (): void => {
    while (at < payload.length) {
      const piece = payload.subarray(at, Math.min(at + pieceBytes, payload.length));
      at += piece.length;
      if (!sink.write(piece)) {
        sink.once('drain', more);
        return;
      }
    }
    if (end) sink.end();
  };
  more();
}

// ---------------------------------------------------------------------------------------------------- server side

/** Starts the layer's server on a free loopback port; returns the port. */
async function listen(s: Setup): Promise<number> {
  const payload = Buffer.alloc(s.sizeBytes, 7);
  if (s.layer === 'tls') {
    const server = tls.createServer({ key: s.cert.keyPem, cert: s.cert.chainPem }, (sock) => {
      // Each `sizeBytes` received is answered with `sizeBytes` sent: an upload, then a download.
      let got = 0;
      sock.on('data', (d: Buffer) => {
        got += d.length;
        while (got >= s.sizeBytes) {
          got -= s.sizeBytes;
          writeInPieces(sock, payload, DOWNLOAD_CHUNK_BYTES, false);
        }
      });
      sock.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return (server.address() as { port: number }).port;
  }
  if (s.layer === 'http2') {
    const server = http2.createSecureServer({ key: s.cert.keyPem, cert: s.cert.chainPem, settings: { initialWindowSize: SERVER_FLOW_CONTROL_WINDOW } });
    server.on('session', (session) => session.on('localSettings', () => session.setLocalWindowSize(SERVER_FLOW_CONTROL_WINDOW)));
    server.on('stream', (stream, headers) => {
      stream.on('error', () => undefined);
      if (headers[':method'] === 'POST') {
        stream.on('data', () => undefined);
        stream.on('end', () => {
          stream.respond({ ':status': 200 });
          stream.end();
        });
      } else {
        stream.respond({ ':status': 200 });
        stream.end(payload);
      }
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return (server.address() as { port: number }).port;
  }
  const server = new grpc.Server(SERVER_OPTIONS);
  server.addService(FLOOR_SERVICE, {
    upload: (call: grpc.ServerReadableStream<Buffer, Buffer>, done: grpc.sendUnaryData<Buffer>) => {
      call.on('data', () => undefined);
      call.on('end', () => done(null, Buffer.alloc(0)));
    },
    // DOWNLOAD_CHUNK_BYTES messages, each once grpc-js takes more, as the coordinator's model stream sends them.
    download: (call: grpc.ServerWritableStream<Buffer, Buffer>) => writeInPieces(call, payload, DOWNLOAD_CHUNK_BYTES, true),
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', serverCredentials(s.cert), (e, p) => (e ? reject(e) : resolve(p))),
  );
  widenServerWindows(server, SERVER_FLOW_CONTROL_WINDOW, pino({ level: 'warn' }));
  return port;
}

async function serve(s: Setup): Promise<void> {
  const port = await listen(s);
  let from = usage();
  process.on('message', (m: ToServer) => {
    if (m.op === 'start') from = usage();
    process.send!(since(from));
  });
  process.once('disconnect', () => process.exit(0));
  process.send!({ port });
}

// ---------------------------------------------------------------------------------------------------- client side

/** One connected "site": `pair()` uploads sizeBytes, then downloads sizeBytes. */
type Site = { pair(): Promise<void>; close(): void };

async function connectTls(s: Setup, port: number): Promise<Site> {
  const sock = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ca: s.cert.chainPem });
  await new Promise<void>((resolve, reject) => {
    sock.once('secureConnect', resolve);
    sock.once('error', reject);
  });
  const payload = Buffer.alloc(s.sizeBytes, 3);
  let got = 0;
  let waiting: (() => void) | undefined;
  sock.on('data', (d: Buffer) => {
    got += d.length;
    if (got >= s.sizeBytes && waiting) {
      got -= s.sizeBytes;
      const w = waiting;
      waiting = undefined;
      w();
    }
  });
  return {
    pair: () =>
      new Promise<void>((resolve) => {
        waiting = resolve;
        writeInPieces(sock, payload, DOWNLOAD_CHUNK_BYTES, false);
      }),
    close: () => sock.destroy(),
  };
}

async function connectHttp2(s: Setup, port: number): Promise<Site> {
  const session = http2.connect(`https://localhost:${port}`, {
    ca: s.cert.chainPem,
    settings: { initialWindowSize: CHANNEL_OPTIONS['grpc-node.flow_control_window'] as number },
  });
  await new Promise<void>((resolve, reject) => {
    session.once('connect', () => resolve());
    session.once('error', reject);
  });
  session.setLocalWindowSize(CHANNEL_OPTIONS['grpc-node.flow_control_window'] as number);
  const payload = Buffer.alloc(s.sizeBytes, 3);
  const exchange = (method: 'POST' | 'GET', body?: Buffer) =>
    new Promise<void>((resolve, reject) => {
      const req = session.request({ ':method': method, ':path': '/' });
      req.on('data', () => undefined);
      req.on('end', resolve);
      req.on('error', reject);
      req.end(body);
    });
  return {
    pair: async () => {
      await exchange('POST', payload);
      await exchange('GET');
    },
    close: () => session.close(),
  };
}

async function connectGrpc(s: Setup, port: number): Promise<Site> {
  const Client = grpc.makeGenericClientConstructor(FLOOR_SERVICE, 'Floor');
  // A subchannel pool of its own, so that every site has its own connection as real sites do.
  const client = new Client(`localhost:${port}`, pinnedChannelCredentials(s.cert.chainPem), {
    ...CHANNEL_OPTIONS,
    'grpc.use_local_subchannel_pool': 1,
  });
  const startUpload = (client.upload as (cb: (e: grpc.ServiceError | null) => void) => grpc.ClientWritableStream<Buffer>).bind(client);
  const startDownload = (client.download as (req: Buffer) => grpc.ClientReadableStream<Buffer>).bind(client);
  await new Promise<void>((resolve, reject) => client.waitForReady(Date.now() + 30_000, (e) => (e ? reject(e) : resolve())));
  const payload = Buffer.alloc(s.sizeBytes, 3);
  const upload = () =>
    new Promise<void>((resolve, reject) => {
      writeInPieces(
        startUpload((e) => (e ? reject(e) : resolve())),
        payload,
        CHUNK_BYTES,
        true,
      );
    });
  const download = () =>
    new Promise<void>((resolve, reject) => {
      const call = startDownload(Buffer.alloc(0));
      call.on('data', () => undefined);
      call.on('end', resolve);
      call.on('error', reject);
    });
  return {
    pair: async () => {
      await upload();
      await download();
    },
    close: () => client.close(),
  };
}

type Run = { layer: Layer; warm: boolean; gb: number; wallS: number; client: Usage; server: Usage };

async function runOnce(
  layer: Layer,
  opts: { connections: number; transfers: number; concurrent: number; warm: boolean; sizeBytes: number; cert: ServerCertificate },
): Promise<Run> {
  const setup: Setup = { layer, sizeBytes: opts.sizeBytes, cert: opts.cert };
  // The setup (with the bench certificate's key) goes over the IPC channel, not the command line, which `ps` shows.
  const child: ChildProcess = fork(fileURLToPath(import.meta.url), ['--serve'], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const next = <T>() => new Promise<T>((r) => child.once('message', r));
  try {
    child.send(setup);
    const { port } = await next<{ port: number }>();
    const connect = layer === 'tls' ? connectTls : layer === 'http2' ? connectHttp2 : connectGrpc;
    const sites = await Promise.all(Array.from({ length: opts.connections }, () => connect(setup, port)));
    // Warm: one transfer per connection before the clock starts. A connection's first transfer costs more than its
    // later ones (its buffers are grown on fresh memory); a federation's first round after a (re)connect pays that.
    if (opts.warm) await Promise.all(sites.map((site) => site.pair()));
    const started = next<Usage>();
    child.send({ op: 'start' } satisfies ToServer);
    await started;
    const t0 = performance.now();
    const from = usage();
    // Every site's transfers in turn, at most `concurrent` sites transferring at once (as admission control lets them).
    const queue = sites.flatMap((site) => Array.from({ length: opts.transfers }, () => site));
    const busy = new Set<Site>();
    await new Promise<void>((resolve, reject) => {
      let running = 0;
      const startMore = (): void => {
        if (queue.length === 0 && running === 0) return resolve();
        for (let i = 0; i < queue.length && running < opts.concurrent; i++) {
          const site = queue[i]!;
          if (busy.has(site)) continue;
          queue.splice(i--, 1);
          busy.add(site);
          running++;
          site.pair().then(() => {
            busy.delete(site);
            running--;
            startMore();
          }, reject);
        }
      };
      startMore();
    });
    const client = since(from);
    const wallS = (performance.now() - t0) / 1000;
    const stopped = next<Usage>();
    child.send({ op: 'stop' } satisfies ToServer);
    const server = await stopped;
    for (const site of sites) site.close();
    const gb = (2 * opts.connections * opts.transfers * opts.sizeBytes) / 1e9;
    return { layer, warm: opts.warm, gb, wallS, client, server };
  } finally {
    child.kill();
  }
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      connections: { type: 'string', default: '1000' },
      transfers: { type: 'string', default: '1' },
      concurrent: { type: 'string', default: '64' },
      states: { type: 'string', default: 'cold,warm' },
      'size-mb': { type: 'string', default: '1' },
      layers: { type: 'string', default: LAYERS.join(',') },
      repeat: { type: 'string', default: '2' },
    },
  });
  const layers = a.layers.split(',').map((l) => {
    if (!(LAYERS as readonly string[]).includes(l)) throw new Error(`--layers: unknown layer "${l}" (known: ${LAYERS.join(', ')})`);
    return l as Layer;
  });
  const states = a.states.split(',').map((x) => {
    if (x !== 'cold' && x !== 'warm') throw new Error(`--states: "cold", "warm" or both, got "${x}"`);
    return x;
  });
  const counts = { connections: Number(a.connections), transfers: Number(a.transfers), concurrent: Number(a.concurrent), repeat: Number(a.repeat) };
  for (const [k, v] of Object.entries(counts)) if (!Number.isInteger(v) || v < 1) throw new Error(`--${k}: a whole number ≥ 1, got ${a[k as keyof typeof a]}`);
  const sizeMb = Number(a['size-mb']);
  if (!(sizeMb > 0 && sizeMb <= 1024)) throw new Error(`--size-mb: more than 0 and at most 1024, got ${a['size-mb']}`);
  const opts = { ...counts, sizeBytes: Math.round(sizeMb * 1e6) };
  const cores = os.availableParallelism();
  console.log(`load average at start: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}; ${cores} cores`);
  console.log(
    `${opts.connections} connections × ${opts.transfers} × (${sizeMb} MB up, then ${sizeMb} MB down), at most ${opts.concurrent} at once; ` +
      `grpc: upload messages of up to ${CHUNK_BYTES / 2 ** 20} MiB, download messages of ${DOWNLOAD_CHUNK_BYTES / 1024} KiB, ` +
      `${SERVER_FLOW_CONTROL_WINDOW / 2 ** 20} MiB windows; tls writes ${DOWNLOAD_CHUNK_BYTES / 1024} KiB at a time`,
  );
  const ca = await createCertificateAuthority({ commonName: 'bench-transport-floor', validDays: 1 });
  const cert = await issueServerCertificate(ca, { hosts: ['localhost', '127.0.0.1'], validDays: 1 });
  const runs: Run[] = [];
  for (let r = 0; r < opts.repeat; r++)
    for (const layer of layers) for (const state of states) runs.push(await runOnce(layer, { ...opts, warm: state === 'warm', cert }));

  // One round: every connection's site downloads and uploads once.
  const roundGb = (2 * opts.connections * opts.sizeBytes) / 1e9;
  const both = (r: Run) => (r.client.cpuS + r.server.cpuS) / r.gb;
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
  console.log(
    `\n| layer | connection | GB moved | wall s | CPU s per GB: client / server / both ends | × raw TLS (same state) | page faults per MB moved: client / server | ` +
      `a round of ${opts.connections} sites × ${sizeMb} MB each way (${roundGb.toFixed(2)} GB): CPU s, and s on ${cores} cores |`,
  );
  console.log('|---|---|---:|---:|---|---:|---|---|');
  for (const r of runs) {
    const tls = median(runs.filter((x) => x.layer === 'tls' && x.warm === r.warm).map(both));
    const mb = r.gb * 1000;
    console.log(
      `| ${r.layer} | ${r.warm ? 'warm' : 'cold'} | ${r.gb.toFixed(2)} | ${r.wallS.toFixed(2)} | ` +
        `${(r.client.cpuS / r.gb).toFixed(2)} / ${(r.server.cpuS / r.gb).toFixed(2)} / **${both(r).toFixed(2)}** | ${tls ? (both(r) / tls).toFixed(2) : '—'} | ` +
        `${(r.client.faults / mb).toFixed(0)} / ${(r.server.faults / mb).toFixed(0)} | ${(both(r) * roundGb).toFixed(1)}, ${((both(r) * roundGb) / cores).toFixed(1)} |`,
    );
  }
}

if (process.argv.includes('--serve')) await serve(await new Promise<Setup>((r) => process.once('message', r)));
else await main();
