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
 *   npm run bench:connection-memory -- [--connections 300] [--upload-mb 0] [--variants widened,default,no-channelz]
 */
import { fork, type ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { CoordinatorHome } from '../coordinator/home.ts';
import { widenServerWindows } from '../coordinator/coordinator.ts';
import { CHANNEL_OPTIONS, SERVER_FLOW_CONTROL_WINDOW, SERVER_OPTIONS, loadProto } from '../shared/protocol/grpc.ts';
import { pinnedChannelCredentials, serverCredentials } from '../shared/security/pki.ts';

/** Server settings compared: each is the coordinator's, changed in one respect. */
const VARIANTS: Record<string, { options: grpc.ServerOptions; window?: number }> = {
  /** The coordinator's settings. */
  widened: { options: SERVER_OPTIONS, window: SERVER_FLOW_CONTROL_WINDOW },
  /** grpc-js's own window (64 KiB). */
  default: { options: SERVER_OPTIONS },
  'window-1mib': { options: SERVER_OPTIONS, window: 1024 * 1024 },
  'no-channelz': { options: { ...SERVER_OPTIONS, 'grpc.enable_channelz': 0 }, window: SERVER_FLOW_CONTROL_WINDOW },
};

type Memory = NodeJS.MemoryUsage;
const say = (s: string) => process.stdout.write(`${s}\n`);

const role = process.argv[2];
if (role === '--server') await server(process.argv[3]!, process.argv[4]!);
else if (role === '--clients') await clients(Number(process.argv[3]), Number(process.argv[4]), process.argv[5]!, Number(process.argv[6]));
else await main();

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      connections: { type: 'string', default: '300' },
      'upload-mb': { type: 'string', default: '0' },
      variants: { type: 'string', default: 'widened,default,no-channelz' },
    },
  });
  const n = Number(a.connections);
  const uploadMb = Number(a['upload-mb']);
  const variants = a.variants.split(',');
  for (const v of variants) if (!VARIANTS[v]) throw new Error(`unknown variant '${v}' (one of ${Object.keys(VARIANTS).join(', ')})`);
  const dir = mkdtempSync(join(tmpdir(), 'medfl-conn-mem-'));
  await CoordinatorHome.init(dir, { hosts: ['localhost', '127.0.0.1'], port: 0 });
  say(`connection memory — ${n} site connections, each a task stream and a heartbeat every 5 s${uploadMb > 0 ? ` and an unread ${uploadMb} MB upload` : ''}; MiB after a full GC`);
  say('| server settings | rss before | rss with N | per site KiB: rss / heap used / external / native rest |');
  say('|---|---|---|---|');
  for (const v of variants) {
    const s = fork(import.meta.filename, ['--server', dir, v], { execArgv: ['--expose-gc', '--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const port = await reply<number>(s, undefined);
    const before = await reply<Memory>(s, 'measure');
    const c = fork(import.meta.filename, ['--clients', String(n), String(port), new CoordinatorHome(dir).caCertPath, String(uploadMb)], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    await reply<string>(c, undefined);
    // Two heartbeat rounds after the last connection, so each connection has served a few calls.
    await new Promise((r) => setTimeout(r, 11_000));
    const after = await reply<Memory>(s, 'measure');
    c.kill();
    s.kill();
    const kib = (x: number) => ((x * 1024) / n).toFixed(0);
    const mib = (x: number) => (x / 1024 / 1024).toFixed(0);
    const rest = (m: Memory) => m.rss - m.heapTotal - m.external;
    say(
      `| ${v} | ${mib(before.rss)} | ${mib(after.rss)} | ${kib((after.rss - before.rss) / 1024 / 1024)} / ${kib((after.heapUsed - before.heapUsed) / 1024 / 1024)} / ${kib((after.external - before.external) / 1024 / 1024)} / ${kib((rest(after) - rest(before)) / 1024 / 1024)} |`,
    );
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
  const home = new CoordinatorHome(dir);
  const { Federation } = loadProto();
  const s = new grpc.Server(v.options);
  s.addService(Federation.service, {
    SubscribeTasks: () => undefined, // held open, as the coordinator holds each site's task stream
    Heartbeat: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(null, { serverTimeMs: Date.now(), features: [] }),
    UploadUpdate: () => undefined, // never read: an upload waiting for its admission slot
  });
  const port = await new Promise<number>((res, rej) => s.bindAsync('127.0.0.1:0', serverCredentials(home.serverCertificate()), (e, p) => (e ? rej(e) : res(p))));
  if (v.window) widenServerWindows(s, v.window, pino({ level: 'warn' }));
  process.on('message', () => {
    for (let i = 0; i < 3; i++) globalThis.gc!();
    process.send!(process.memoryUsage());
  });
  process.send!(port);
}

async function clients(n: number, port: number, caPath: string, uploadMb: number): Promise<void> {
  const { Federation } = loadProto();
  const { readFileSync } = await import('node:fs');
  const creds = pinnedChannelCredentials(readFileSync(caPath, 'utf8'));
  // A subchannel pool per channel: one TCP + TLS connection per simulated site, as separate site processes have.
  const options = { ...CHANNEL_OPTIONS, 'grpc.use_local_subchannel_pool': 1 };
  const sites: grpc.Client[] = [];
  for (let i = 0; i < n; i++) {
    const c = new Federation(`localhost:${port}`, creds, options) as unknown as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
    sites.push(c);
    const stream = c.SubscribeTasks({}) as grpc.ClientReadableStream<unknown>;
    stream.on('error', () => undefined);
    await new Promise<void>((res, rej) => c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'bench' }, (e: Error | null) => (e ? rej(e) : res())));
    setInterval(() => c.Heartbeat({ state: 'idle', progress: 0, taskId: '', engine: 'bench' }, () => undefined), 5000);
    if (uploadMb > 0) {
      const up = c.UploadUpdate(() => undefined) as grpc.ClientWritableStream<unknown>;
      const chunk = Buffer.alloc(Math.min(2 * 1024 * 1024, uploadMb * 1024 * 1024), 1);
      for (let sent = 0; sent < uploadMb * 1024 * 1024; sent += chunk.length) up.write({ data: chunk, offset: sent });
    }
  }
  process.send!('ready');
}
