/**
 * The coordinator's HTTP/2 receive window as an operator setting (coordinator.json `receiveWindow`,
 * coordinator/server/receive-window.ts): checked at start with a clear error; by default every site connection is
 * granted the 32 MiB window; a number of bytes grants that; "grpc-default" leaves grpc-js's own 65,535 bytes and
 * reaches into nothing inside grpc-js. The windows are read as a site's HTTP/2 session sees them. The site's own
 * receive window (its downloads) is set through grpc-js's public channel option, read as a server sees it.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http2, { type ServerHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import {
  applyReceiveWindow,
  DEFAULT_RECEIVE_WINDOW,
  GRPC_DEFAULT_WINDOW,
  receiveWindowServerOptions,
  type ReceiveWindowSetting,
} from '../../coordinator/server/receive-window.ts';
import { enrolmentClient } from '../../site-agent/transport/connection.ts';
import { FLOW_CONTROL_WINDOW } from '../../shared/protocol/grpc.ts';
import { waitFor } from '../../cli/processes.ts';

const quiet = pino({ level: 'silent' });
/** HTTP/2's initial window, which grpc-js 1.14's server keeps for the connection and every stream. */
const HTTP2_DEFAULT_WINDOW = 65_535;
const MiB = 1024 * 1024;

let work: string;
const running: RunningCoordinator[] = [];

/** A coordinator home whose coordinator.json carries `receiveWindow` (left out when undefined). */
async function homeWith(name: string, receiveWindow?: unknown): Promise<CoordinatorHome> {
  const home = await CoordinatorHome.init(join(work, name), { hosts: ['localhost', '127.0.0.1'] });
  if (receiveWindow !== undefined) writeFileSync(home.configPath, JSON.stringify({ ...home.config(), receiveWindow }));
  return home;
}

async function coordinatorWith(name: string, receiveWindow?: ReceiveWindowSetting): Promise<{ port: number; home: CoordinatorHome }> {
  const home = await homeWith(name, receiveWindow);
  const coord = await startCoordinator({ dir: home.dir, port: 0, host: '127.0.0.1', log: quiet });
  running.push(coord);
  return { port: coord.port, home };
}

/**
 * The windows the coordinator grants a new connection: the connection's (what the client may send before a
 * WINDOW_UPDATE) and each stream's (its SETTINGS_INITIAL_WINDOW_SIZE). Read after a PING's answer: the coordinator
 * sends its window update and settings as the session opens, so by then they have arrived.
 */
async function grantedWindows(port: number, home: CoordinatorHome): Promise<{ connection: number; stream: number }> {
  const session = http2.connect(`https://localhost:${port}`, { ca: home.caPem() });
  session.on('error', () => undefined);
  try {
    await new Promise((resolve) => session.once('remoteSettings', resolve));
    await new Promise<void>((resolve, reject) => session.ping((err) => (err ? reject(err) : resolve())));
    return { connection: session.state.remoteWindowSize ?? Number.NaN, stream: session.remoteSettings.initialWindowSize ?? HTTP2_DEFAULT_WINDOW };
  } finally {
    session.close();
  }
}

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), 'medfl-receive-window-'));
});

afterAll(async () => {
  for (const c of running) await c.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe("coordinator.json's receiveWindow", () => {
  it('takes a number of bytes or "grpc-default", and refuses anything else naming the field, the range and the value', async () => {
    const home = await homeWith('config');
    const config = home.config();
    expect(config.receiveWindow).toBeUndefined();
    for (const good of [HTTP2_DEFAULT_WINDOW, 4 * MiB, 2 ** 31 - 1, GRPC_DEFAULT_WINDOW]) {
      writeFileSync(home.configPath, JSON.stringify({ ...config, receiveWindow: good }));
      expect(home.config().receiveWindow).toBe(good);
    }
    for (const bad of [0, -1, 65_534, 2 ** 31, 1.5 * MiB + 0.5, '32MiB', 'default', null, true]) {
      writeFileSync(home.configPath, JSON.stringify({ ...config, receiveWindow: bad }));
      expect(() => home.config(), String(bad)).toThrow(
        /coordinator\.json is not a valid coordinator configuration: receiveWindow: must be a whole number of bytes from 65535 to 2147483647 .* or "grpc-default"/,
      );
      expect(() => home.config()).toThrow(`got ${JSON.stringify(bad)}`);
    }
  });

  it('a misspelt setting or a file that is not JSON is refused by name, not ignored', async () => {
    const home = await homeWith('misspelt');
    const config = home.config();
    writeFileSync(home.configPath, JSON.stringify({ ...config, recieveWindow: 1 * MiB }));
    expect(() => home.config()).toThrow(/coordinator\.json is not a valid coordinator configuration: .*recieveWindow/);
    writeFileSync(home.configPath, '{"federationId": ');
    expect(() => home.config()).toThrow(/coordinator\.json is not valid JSON: /);
  });

  it('refused, stops the coordinator before it listens', async () => {
    const home = await homeWith('refused', 1000);
    await expect(startCoordinator({ dir: home.dir, port: 0, host: '127.0.0.1', log: quiet })).rejects.toThrow(/receiveWindow: must be a whole number/);
  });
});

describe('the window a site connection is granted', () => {
  it('is 32 MiB for the connection and every stream by default', async () => {
    const { port, home } = await coordinatorWith('default');
    expect(DEFAULT_RECEIVE_WINDOW).toBe(32 * MiB);
    // The connection's window counts from the 65,535 bytes every HTTP/2 connection starts with.
    expect(await grantedWindows(port, home)).toEqual({ connection: DEFAULT_RECEIVE_WINDOW, stream: DEFAULT_RECEIVE_WINDOW });
  });

  it('is the number of bytes set', async () => {
    const { port, home } = await coordinatorWith('one-mib', 1 * MiB);
    expect(await grantedWindows(port, home)).toEqual({ connection: 1 * MiB, stream: 1 * MiB });
  });

  it('stays at grpc-js\'s own 65,535 bytes with "grpc-default"', async () => {
    const { port, home } = await coordinatorWith('grpc-default', GRPC_DEFAULT_WINDOW);
    expect(await grantedWindows(port, home)).toEqual({ connection: HTTP2_DEFAULT_WINDOW, stream: HTTP2_DEFAULT_WINDOW });
  });
});

describe('"grpc-default"', () => {
  it("reads no grpc-js internals and passes grpc-js no window option", () => {
    const touched: PropertyKey[] = [];
    const server = new Proxy(new grpc.Server(), {
      get(target, key, receiver) {
        touched.push(key);
        return Reflect.get(target, key, receiver);
      },
    });
    applyReceiveWindow(server, GRPC_DEFAULT_WINDOW, quiet);
    expect(touched).toEqual([]);
    expect(receiveWindowServerOptions(GRPC_DEFAULT_WINDOW)).not.toHaveProperty('grpc-node.flow_control_window');
    expect(receiveWindowServerOptions(4 * MiB)).toMatchObject({ 'grpc-node.flow_control_window': 4 * MiB });
  });
});

describe("the site's own receive window (downloads)", () => {
  it("is 32 MiB for its connection and every stream, through grpc-js's public 'grpc-node.flow_control_window'", async () => {
    const home = await homeWith('site-window');
    const cert = home.serverCertificate();
    // A bare HTTP/2 server with the coordinator's certificate: it sees the windows the site's channel grants.
    const server = http2.createSecureServer({ key: cert.keyPem, cert: cert.chainPem });
    const sessions: ServerHttp2Session[] = [];
    server.on('session', (s) => sessions.push(s));
    // Every call is answered UNAVAILABLE at once (a trailers-only response): only the connection's settings matter.
    server.on('stream', (stream) => stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '14' }, { endStream: true }));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const client = enrolmentClient('localhost', (server.address() as AddressInfo).port, home.caPem());
    try {
      client.Enroll({}, () => undefined);
      await waitFor(() => sessions.length > 0, 5000, 'the site connection');
      const session = sessions[0]!;
      await waitFor(() => (session.remoteSettings.initialWindowSize ?? 0) >= FLOW_CONTROL_WINDOW, 5000, 'the stream window setting');
      await waitFor(() => (session.state.remoteWindowSize ?? 0) >= FLOW_CONTROL_WINDOW, 5000, 'the connection window update');
      expect({ connection: session.state.remoteWindowSize, stream: session.remoteSettings.initialWindowSize }).toEqual({ connection: FLOW_CONTROL_WINDOW, stream: FLOW_CONTROL_WINDOW });
    } finally {
      client.close();
      for (const s of sessions) s.destroy();
      server.close();
    }
  });
});
