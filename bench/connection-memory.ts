/**
 * `npm run bench:connection-memory`: what one connected site costs the coordinator in memory, by part, with the
 * coordinator's own grpc-js server settings (SERVER_OPTIONS, its TLS credentials, the widened HTTP/2 window).
 *
 * A server process (this file, role --server) runs the Federation service with the coordinator's options and
 * handlers that hold each task stream open, answer heartbeats and read nothing of an upload (as an upload waiting
 * for its admission slot). A client process opens N separate TLS connections (one per simulated site, as real
 * sites have), each holding a task stream and heartbeating every 5 s; optionally each then starts an upload of
 * `--upload-mb` that the server leaves unread. The server reports process.memoryUsage() before and after, with a
 * full GC first (live memory, not garbage), so the difference divided by N is the cost of one site. No tokens: the
 * auth interceptor's per-call work keeps nothing per connection.
 *
 * With `--transfer-mb M` each connection instead completes a model download of M MB (the coordinator's own
 * streamModelFile, from a file on disk) and then an upload of M MB that the server reads to the end and acknowledges,
 * one connection after another, and stays connected; the server reports its memory with every connection idle after
 * its transfers, and again once the client process has ended (its connections closed) (what a connection keeps after its transfers is the
 * difference between the two). `--transfer download` or `upload` does only one of them.
 *
 *   npm run bench:connection-memory -- [--connections 300] [--upload-mb 0] [--variants widened,default,no-channelz]
 *   npm run bench:connection-memory -- --transfer-mb 1 [--transfer both|download|upload] [--connections 300]
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { CoordinatorHome } from '../coordinator/home.ts';
import { widenServerWindows } from '../coordinator/server/receive-window.ts';
import { modelStreamOptions, streamModelFile } from '../coordinator/server/model-stream.ts';
import { CHANNEL_OPTIONS, CHUNK_BYTES, SERVER_FLOW_CONTROL_WINDOW, SERVER_OPTIONS, loadProto } from '../shared/protocol/grpc.ts';
import { pinnedChannelCredentials, serverCredentials } from '../shared/security/pki.ts';

/** Server settings compared: each is the coordinator's, changed in one respect. */
const VARIANTS: Record<string, { options: grpc.ServerOptions; window?: number; stream?: { chunkBytes: number; slots: number } }> = {
  /** The coordinator's settings. */
  widened: { options: SERVER_OPTIONS, window: SERVER_FLOW_CONTROL_WINDOW },
  /** grpc-js's own window (64 KiB). */
  default: { options: SERVER_OPTIONS },
  'window-1mib': { options: SERVER_OPTIONS, window: 1024 * 1024 },
  'no-channelz': { options: { ...SERVER_OPTIONS, 'grpc.enable_channelz': 0 }, window: SERVER_FLOW_CONTROL_WINDOW },
  /** The coordinator's settings with the model download as it was before: 2 MiB messages, four buffers. */
  'download-2mib': { options: SERVER_OPTIONS, window: SERVER_FLOW_CONTROL_WINDOW, stream: { chunkBytes: 2 * 1024 * 1024, slots: 4 } },
  /** 64 KiB messages with four buffers. */
  'download-64kib-4': { options: SERVER_OPTIONS, window: SERVER_FLOW_CONTROL_WINDOW, stream: { chunkBytes: 64 * 1024, slots: 4 } },
};

type Memory = NodeJS.MemoryUsage;
type Transfer = 'none' | 'both' | 'download' | 'upload';
const say = (s: string) => process.stdout.write(`${s}\n`);
const MODEL_FILE = 'model.bin';

const role = process.argv[2];
if (role === '--server') await server(process.argv[3]!, process.argv[4]!);
else if (role === '--clients') await clients(JSON.parse(process.argv[3]!) as ClientPlan);
else await main();

interface ClientPlan {
  n: number;
  port: number;
  caPath: string;
  uploadMb: number;
  transfer: Transfer;
  modelBytes: number;
  parallel: number;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      connections: { type: 'string', default: '300' },
      'upload-mb': { type: 'string', default: '0' },
      'transfer-mb': { type: 'string', default: '0' },
      transfer: { type: 'string', default: 'both' },
      parallel: { type: 'string', default: '16' },
      variants: { type: 'string' },
    },
  });
  const n = Number(a.connections);
  const uploadMb = Number(a['upload-mb']);
  const transferMb = Number(a['transfer-mb']);
  const transfer: Transfer = transferMb > 0 ? (a.transfer as Transfer) : 'none';
  if (!['none', 'both', 'download', 'upload'].includes(transfer)) throw new Error(`--transfer is both, download or upload, not '${a.transfer}'`);
  const variants = (a.variants ?? (transfer === 'none' ? 'widened,default,no-channelz' : 'widened')).split(',');
  for (const v of variants) if (!VARIANTS[v]) throw new Error(`unknown variant '${v}' (one of ${Object.keys(VARIANTS).join(', ')})`);
  const dir = mkdtempSync(join(tmpdir(), 'medfl-conn-mem-'));
  await CoordinatorHome.init(dir, { hosts: ['localhost', '127.0.0.1'], port: 0 });
  const modelBytes = Math.round(transferMb * 1024 * 1024);
  if (modelBytes > 0) writeFileSync(join(dir, MODEL_FILE), randomBytes(modelBytes));
  const kib = (x: number) => ((x * 1024) / n).toFixed(0);
  const mib = (x: number) => (x / 1024 / 1024).toFixed(0);
  const rest = (m: Memory) => m.rss - m.heapTotal - m.external;
  const perSite = (from: Memory, to: Memory) =>
    `${kib((to.rss - from.rss) / 1024 / 1024)} / ${kib((to.heapUsed - from.heapUsed) / 1024 / 1024)} / ${kib((to.external - from.external) / 1024 / 1024)} / ${kib((rest(to) - rest(from)) / 1024 / 1024)}`;
  if (transfer === 'none') {
    say(`connection memory — ${n} site connections, each a task stream and a heartbeat every 5 s${uploadMb > 0 ? ` and an unread ${uploadMb} MB upload` : ''}; MiB after a full GC`);
    say('| server settings | rss before | rss with N | per site KiB: rss / heap used / external / native rest |');
    say('|---|---|---|---|');
  } else {
    const what = transfer === 'both' ? `a completed ${transferMb} MB model download and ${transferMb} MB upload` : `a completed ${transferMb} MB ${transfer}`;
    say(`connection memory — ${n} site connections (${a.parallel} transferring at once), each a task stream, a heartbeat every 5 s and ${what}, then idle; after a full GC`);
    say('| server settings | rss before / with N idle / after closing them, MiB | per site KiB, idle after its transfers vs before: rss / heap used / external / native rest | kept per site until its connection closed, KiB (same parts) |');
    say('|---|---|---|---|');
  }
  for (const v of variants) {
    const s = fork(import.meta.filename, ['--server', dir, v], { execArgv: ['--expose-gc', '--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const port = await reply<number>(s, undefined);
    const before = await reply<Memory>(s, 'measure');
    const plan: ClientPlan = { n, port, caPath: new CoordinatorHome(dir).caCertPath, uploadMb, transfer, modelBytes, parallel: Number(a.parallel) };
    const c = fork(import.meta.filename, ['--clients', JSON.stringify(plan)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    await reply<string>(c, undefined);
    // Two heartbeat rounds after the last connection, so each connection has served a few calls.
    await new Promise((r) => setTimeout(r, 11_000));
    const after = await reply<Memory>(s, 'measure');
    if (transfer === 'none') {
      c.kill();
      s.kill();
      say(`| ${v} | ${mib(before.rss)} | ${mib(after.rss)} | ${perSite(before, after)} |`);
      continue;
    }
    // The client process ends, so every connection closes (closing a grpc-js channel leaves its open task stream
    // and so its connection); the server notices and frees their sessions.
    c.kill();
    await new Promise((r) => setTimeout(r, 5_000));
    const closed = await reply<Memory>(s, 'measure');
    s.kill();
    say(`| ${v} | ${mib(before.rss)} / ${mib(after.rss)} / ${mib(closed.rss)} | ${perSite(before, after)} | ${perSite(closed, after)} |`);
  }
}

/** Sends `message` (if any) to `child` and resolves with its next message. */
function reply<T>(child: ChildProcess, message: string | undefined): Promise<T> {
  return new Promise((resolve, reject) => {
    child.once('message', (m) => resolve(m as T));
    child.once('exit', (code) => reject(new Error(`bench child exited with ${code}`)));
    if (message !== undefined) child.send(message);
  });
}

async function server(dir: string, variant: string): Promise<void> {
  const v = VARIANTS[variant]!;
  if (v.stream) Object.assign(modelStreamOptions, v.stream);
  const home = new CoordinatorHome(dir);
  const { Federation } = loadProto();
  const modelPath = join(dir, MODEL_FILE);
  const s = new grpc.Server(v.options);
  s.addService(Federation.service, {
    SubscribeTasks: () => undefined, // held open, as the coordinator holds each site's task stream
    Heartbeat: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(null, { serverTimeMs: Date.now(), features: [] }),
    // The coordinator's own download path: the model file read into reused, pre-encoded ModelChunk buffers.
    DownloadModel: (call: grpc.ServerWritableStream<{ offset: number }, unknown>) => {
      const size = statSync(modelPath).size;
      streamModelFile(call, modelPath, call.request.offset, size, '0'.repeat(64));
    },
    // Without --transfer-mb never read (an upload waiting for its admission slot); with it read to the end (the
    // coordinator writes what it reads to a file on a worker thread; here it is dropped) and acknowledged.
    UploadUpdate: (call: grpc.ServerReadableStream<{ data?: Buffer }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      if (!existsSync(modelPath)) return;
      let bytes = 0;
      call.on('data', (m: { data?: Buffer }) => {
        bytes += m.data?.length ?? 0;
      });
      call.on('end', () => cb(null, { updateId: 'bench', accepted: bytes > 0, duplicate: false, reason: '' }));
    },
  });
  const port = await new Promise<number>((res, rej) => s.bindAsync('127.0.0.1:0', serverCredentials(home.serverCertificate()), (e, p) => (e ? rej(e) : res(p))));
  if (v.window) widenServerWindows(s, v.window, pino({ level: 'warn' }));
  process.on('message', () => {
    for (let i = 0; i < 3; i++) globalThis.gc!();
    process.send!(process.memoryUsage());
  });
  process.send!(port);
}

type SiteClient = grpc.Client & Record<string, (...a: unknown[]) => unknown>;

async function clients(p: ClientPlan): Promise<void> {
  const { Federation } = loadProto();
  const creds = pinnedChannelCredentials(readFileSync(p.caPath, 'utf8'));
  // A subchannel pool per channel: one TCP + TLS connection per simulated site, as separate site processes have.
  const options = { ...CHANNEL_OPTIONS, 'grpc.use_local_subchannel_pool': 1 };
  const sites: SiteClient[] = [];
  const connect = async (): Promise<SiteClient> => {
    const c = new Federation(`localhost:${p.port}`, creds, options) as unknown as SiteClient;
    sites.push(c);
    const stream = c.SubscribeTasks({}) as grpc.ClientReadableStream<unknown>;
    stream.on('error', () => undefined);
    await new Promise<void>((res, rej) => c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'bench' }, (e: Error | null) => (e ? rej(e) : res())));
    setInterval(() => c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'bench' }, () => undefined), 5000);
    return c;
  };
  if (p.transfer === 'none') {
    for (let i = 0; i < p.n; i++) {
      const c = await connect();
      if (p.uploadMb > 0) {
        const up = c.UploadUpdate(() => undefined) as grpc.ClientWritableStream<unknown>;
        const chunk = Buffer.alloc(Math.min(2 * 1024 * 1024, p.uploadMb * 1024 * 1024), 1);
        for (let sent = 0; sent < p.uploadMb * 1024 * 1024; sent += chunk.length) up.write({ data: chunk, offset: sent });
      }
    }
  } else {
    const update = randomBytes(p.modelBytes);
    let next = 0;
    const worker = async () => {
      while (next < p.n) {
        next++;
        const c = await connect();
        if (p.transfer !== 'upload') await retried(() => download(c, p.modelBytes));
        if (p.transfer !== 'download') await retried(() => upload(c, update));
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, p.parallel) }, worker));
  }
  process.send!('ready');
}

/** A transfer that failed (a loaded machine drops the odd connection) is tried again, as a site would, up to 3 times. */
async function retried(transfer: () => Promise<void>): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await transfer();
    } catch (e) {
      if (attempt >= 3) throw e;
      process.stderr.write(`transfer failed (${(e as Error).message}), trying again\n`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Reads a whole model download; fails if fewer bytes than the model arrive. */
function download(c: SiteClient, size: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = 0;
    const call = c.DownloadModel({ modelHash: 'bench', offset: 0 }) as grpc.ClientReadableStream<{ data: Buffer }>;
    call.on('data', (m: { data: Buffer }) => {
      got += m.data.length;
    });
    call.on('error', reject);
    call.on('end', () => (got === size ? resolve() : reject(new Error(`download ended at ${got} of ${size} bytes`))));
  });
}

/** Sends an update as a site does (header, then CHUNK_BYTES pieces at their offsets) and waits for the ack. */
function upload(c: SiteClient, update: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const call = c.UploadUpdate((e: Error | null) => (e ? reject(e) : resolve())) as grpc.ClientWritableStream<unknown>;
    call.write({ header: { updateId: 'bench', round: 1, taskId: 'bench', baseModelHash: 'bench', totalSize: update.length, sha256: '', numSamples: 1 }, offset: 0 });
    for (let at = 0; at < update.length; at += CHUNK_BYTES) call.write({ data: update.subarray(at, at + CHUNK_BYTES), offset: at });
    call.end();
  });
}
