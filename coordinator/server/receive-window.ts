/**
 * The coordinator's HTTP/2 receive window: how many bytes one site connection may have in flight towards the
 * coordinator before it waits for the coordinator to read them (coordinator.json's `receiveWindow`).
 *
 * What it trades: an upload moves at most one window per round trip, so a window below the link's bandwidth-delay
 * product holds it below the link rate (grpc-js's own 65,535 bytes reached 0.07 of a 100 Mbit/s link at 40 ms in
 * bench:wan); and a connection may hold up to one window of unread bytes at the coordinator whenever the coordinator
 * reads slower than the site sends, so the memory it may have to buffer is about window × sites transferring at once.
 * The default (32 MiB) fills 1 Gbit/s up to ~250 ms of round trip; a coordinator serving many sites on a LAN can bound
 * memory with a small window, or leave grpc-js's own (`"grpc-default"`), which touches nothing inside grpc-js.
 */
import type * as grpc from '@grpc/grpc-js';
import type { Http2Server, ServerHttp2Session } from 'node:http2';
import { z } from 'zod';
import { SERVER_FLOW_CONTROL_WINDOW, SERVER_OPTIONS } from '../../shared/protocol/grpc.ts';
import type { Logger } from '../../shared/util/log.ts';

/** The setting that leaves grpc-js's window as it is (65,535 bytes in grpc-js 1.14) and reaches into nothing. */
export const GRPC_DEFAULT_WINDOW = 'grpc-default';
/** HTTP/2's initial window, also grpc-js's: a smaller one would slow every transfer, even on a LAN. */
export const MIN_RECEIVE_WINDOW = 65_535;
/** The largest window HTTP/2 allows (RFC 9113, 6.9.1). */
export const MAX_RECEIVE_WINDOW = 2 ** 31 - 1;
export const DEFAULT_RECEIVE_WINDOW = SERVER_FLOW_CONTROL_WINDOW;

export type ReceiveWindowSetting = number | typeof GRPC_DEFAULT_WINDOW;

export const ReceiveWindowSchema = z.custom<ReceiveWindowSetting>(
  (v) => v === GRPC_DEFAULT_WINDOW || (typeof v === 'number' && Number.isInteger(v) && v >= MIN_RECEIVE_WINDOW && v <= MAX_RECEIVE_WINDOW),
  {
    error: (issue) =>
      `must be a whole number of bytes from ${MIN_RECEIVE_WINDOW} to ${MAX_RECEIVE_WINDOW} (default ${DEFAULT_RECEIVE_WINDOW}, 32 MiB), ` +
      `or "${GRPC_DEFAULT_WINDOW}" for grpc-js's own window; got ${JSON.stringify(issue.input) ?? String(issue.input)}`,
  },
);

/**
 * The server options for `setting`: the window option grpc-js's server will read once it honours it (1.14 reads it on
 * clients only), left out for "grpc-default" so that no grpc-js widens anything then either.
 */
export function receiveWindowServerOptions(setting: ReceiveWindowSetting): grpc.ServerOptions {
  const { 'grpc-node.flow_control_window': _window, ...rest } = SERVER_OPTIONS;
  return setting === GRPC_DEFAULT_WINDOW ? rest : { ...rest, 'grpc-node.flow_control_window': setting };
}

/** The bytes a connection may have in flight towards the coordinator under `setting` (what admission reckons with). */
export function receiveWindowBytes(setting: ReceiveWindowSetting): number {
  return setting === GRPC_DEFAULT_WINDOW ? MIN_RECEIVE_WINDOW : setting;
}

/** Gives every connection `server` accepts from now on the window `setting` names; "grpc-default" does nothing. */
export function applyReceiveWindow(server: grpc.Server, setting: ReceiveWindowSetting, log: Logger): void {
  if (setting === GRPC_DEFAULT_WINDOW) return;
  widenServerWindows(server, setting, log);
}

/**
 * Widens the HTTP/2 receive window of every connection the server accepts (connection and streams) to `bytes`.
 *
 * The measured need (bench:wan, two runs, 132 MB update through a shaped relay): with grpc-js's own window an upload
 * over 100 Mbit/s at 40 ms reached 0.068–0.070 of the link (150–154 s) and over 1 Gbit/s at 20 ms 0.013 (79 s), about
 * half a window per round trip, where the widened window reached 0.97 (11 s) and 0.44–0.71 (1.5–2.4 s, on a machine
 * loaded far beyond its two cores; 0.89–0.93 on a quiet one). A coordinator whose sites sit behind long links needs it; one whose sites
 * are near can do without ("grpc-default").
 *
 * grpc-js 1.14 reads 'grpc-node.flow_control_window' on its clients only, and has no public hook on the sessions
 * its server accepts; this is the one place MedFL reaches into grpc-js (its `http2Servers` map). Its public ways in
 * fall short: `createConnectionInjector` takes a socket we own but never shows the session made on it, and HTTP/2
 * settings reach its server only through a ServerCredentials subclass (internal methods again), where they would widen
 * each stream's window but not the connection's: that stays at 65,535 bytes, 64 KiB per round trip as before.
 * It is guarded: where grpc-js's internals differ, nothing changes but the window (logged at warn, and
 * test/transport/grpc-transport.test.ts fails, so an upgrade that loses it is noticed). receiveWindowServerOptions
 * passes the same window as the server's option, so a grpc-js that honours it there widens the window by itself.
 */
export function widenServerWindows(server: grpc.Server, bytes: number, log: Logger): void {
  const listeners = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(listeners instanceof Map)) {
    log.warn('grpc-js internals changed: the server HTTP/2 receive window stays at its default (slow uploads over long links)');
    return;
  }
  for (const h2 of listeners.keys() as Iterable<Http2Server>) {
    if (typeof h2?.on !== 'function') continue;
    h2.on('session', (session: ServerHttp2Session) => {
      try {
        session.setLocalWindowSize(bytes);
        session.settings({ initialWindowSize: Math.min(bytes, MAX_RECEIVE_WINDOW) });
      } catch (e) {
        log.debug({ reason: (e as Error).message }, 'could not widen an HTTP/2 session window');
      }
    });
  }
}
