/**
 * The coordinator's admin HTTP endpoint, on its own port (never the sites' gRPC port): GET /metrics (Prometheus
 * text format), /healthz (the process answers), /readyz (it can do its job: readiness.ts), and the dashboard: its
 * page and module at / (dashboard/), its data at /api/status and /api/ledger, live events at /api/events
 * (server-sent events). Read-only: it changes nothing and shows no patient data, but it names sites and rounds, so
 * it listens on loopback unless an admin token is configured (options.ts), and with a token every request must
 * present it — as a bearer token (Prometheus, curl) or as the password of HTTP Basic authentication, which is what
 * a browser can send on its own, for the page and for EventSource alike.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../../shared/util/log.ts';
import type { AdminHttpOptions } from './options.ts';
import type { CoordinatorMetrics } from './metrics.ts';
import type { ReadinessCheck } from './readiness.ts';
import type { DashboardSource } from './dashboard-data.ts';
import { loadDashboardAssets, SECURITY_HEADERS, type DashboardAsset } from './dashboard-assets.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';

export interface AdminHttpDeps {
  metrics: CoordinatorMetrics;
  readiness: () => ReadinessCheck[];
  log: Logger;
  /** The dashboard's data (dashboard-data.ts); without it the dashboard paths answer 404. */
  dashboard?: DashboardSource;
}

/** Live-event streams open at once; more are refused (503), so a forgotten tab farm cannot pile up sockets. */
export const MAX_EVENT_STREAMS = 32;
/** Events replayed to a stream when it opens, so the feed is never empty. */
export const EVENT_REPLAY = 50;
/** A comment line this often keeps proxies from closing a quiet stream. */
const EVENT_KEEPALIVE_MS = 15_000;

export interface AdminHttpServer {
  host: string;
  port: number;
  /** Base URL, e.g. http://127.0.0.1:9464 */
  url: string;
  close(): Promise<void>;
}

/** Compares through fixed-length digests, so neither the content nor the length of the token leaks through timing. */
export function tokenMatches(presented: string, expected: string): boolean {
  const a = createHash('sha256').update(presented).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/** The token a request presents: `Bearer TOKEN`, or `Basic base64(ANY-USER:TOKEN)` (browsers). */
function presentedToken(req: IncomingMessage): string | undefined {
  const header = req.headers.authorization?.trim() ?? '';
  const b = /^Bearer ([\x21-\x7e]+)$/i.exec(header);
  if (b) return b[1];
  const basic = /^Basic ([A-Za-z0-9+/=]+)$/i.exec(header);
  if (!basic) return undefined;
  const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

function send(res: ServerResponse, status: number, body: string, contentType: string, extra: Record<string, string | string[]> = {}): void {
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', ...extra });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

const json = (res: ServerResponse, status: number, value: unknown, extra?: Record<string, string | string[]>) => send(res, status, JSON.stringify(value) + '\n', 'application/json; charset=utf-8', extra);

function sendAsset(res: ServerResponse, a: DashboardAsset): void {
  send(res, 200, a.body, a.contentType, SECURITY_HEADERS);
}

/** One server-sent event: the event's stable id (a reconnecting EventSource sends it back) and the event as JSON. */
function sseFrame(e: FederationEvent): string {
  return `${e.id ? `id: ${e.id.replace(/[\r\n]/g, '')}\n` : ''}data: ${JSON.stringify(e)}\n\n`;
}

export async function startAdminHttp(o: AdminHttpOptions, d: AdminHttpDeps): Promise<AdminHttpServer> {
  const { log } = d;
  const startedAt = Date.now();
  // Read once at start: a missing file fails the start, not the first visitor.
  const assets = d.dashboard ? loadDashboardAssets() : undefined;
  const streams = new Set<ServerResponse>();

  const streamEvents = (req: IncomingMessage, res: ServerResponse, source: DashboardSource): void => {
    if (streams.size >= MAX_EVENT_STREAMS) return json(res, 503, { error: `too many live-event streams open (${MAX_EVENT_STREAMS}); close some dashboard tabs` }, { 'retry-after': '30' });
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', 'x-accel-buffering': 'no' });
    if (req.method === 'HEAD') return void res.end();
    streams.add(res);
    res.write('retry: 3000\n\n');
    for (const e of source.recentEvents(EVENT_REPLAY)) res.write(sseFrame(e));
    const unsubscribe = source.subscribe((e) => res.write(sseFrame(e)));
    const keepalive = setInterval(() => res.write(': keepalive\n\n'), EVENT_KEEPALIVE_MS);
    const end = () => {
      clearInterval(keepalive);
      unsubscribe();
      streams.delete(res);
    };
    req.once('close', end);
    res.once('close', end);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    if (o.token !== undefined) {
      const presented = presentedToken(req);
      if (presented === undefined || !tokenMatches(presented, o.token)) {
        d.metrics.adminAuthFailures.inc();
        log.warn({ peer: req.socket.remoteAddress, path: req.url?.slice(0, 200) }, 'admin request refused: missing or wrong admin token');
        // Both challenges: Prometheus and curl send a bearer token, a browser asks for Basic credentials (any user name, the token as password).
        return json(res, 401, { error: 'missing or wrong admin token: send Authorization: Bearer <token> (in a browser: any user name, the token as password)' }, { 'www-authenticate': ['Bearer realm="medfl-admin"', 'Basic realm="medfl-admin", charset="UTF-8"'] });
      }
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return json(res, 405, { error: 'only GET and HEAD' }, { allow: 'GET, HEAD' });
    const path = new URL(req.url ?? '/', 'http://admin').pathname;
    switch (path) {
      case '/metrics': {
        const m = await d.metrics.exposition();
        return send(res, 200, m.body, m.contentType);
      }
      case '/healthz':
        return json(res, 200, { status: 'ok', uptimeSeconds: Math.round((Date.now() - startedAt) / 1000) });
      case '/readyz': {
        const checks = d.readiness();
        const ready = checks.every((c) => c.ok);
        if (!ready) log.warn({ failed: checks.filter((c) => !c.ok) }, 'readiness check failed');
        return json(res, ready ? 200 : 503, { status: ready ? 'ready' : 'not ready', checks });
      }
      case '/':
      case '/index.html':
        if (!assets) break;
        return sendAsset(res, assets.html);
      case '/dashboard.js':
        if (!assets) break;
        return sendAsset(res, assets.js);
      case '/dashboard.css':
        if (!assets) break;
        return sendAsset(res, assets.css);
      case '/favicon.ico':
        // Browsers ask for it unprompted; an empty answer keeps their consoles free of a 404.
        if (!assets) break;
        res.writeHead(204, { 'cache-control': 'max-age=86400' });
        return void res.end();
      case '/api/status':
        if (!d.dashboard) break;
        return json(res, 200, d.dashboard.status());
      case '/api/ledger':
        if (!d.dashboard) break;
        return json(res, 200, await d.dashboard.ledger());
      case '/api/events':
        if (!d.dashboard) break;
        return streamEvents(req, res, d.dashboard);
      default:
        break;
    }
    return json(res, 404, { error: `not found: try /metrics, /healthz or /readyz${d.dashboard ? ', or / for the dashboard' : ''}` });
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((e: Error) => {
      log.error({ err: e.message, path: req.url?.slice(0, 200) }, 'admin request failed');
      if (!res.headersSent) json(res, 500, { error: 'internal error; see the coordinator log' });
      else res.destroy();
    });
  });
  // Slow or idle clients must not hold sockets: every answer but the event stream is small and immediate (requestTimeout
  // bounds receiving a request, not an answer, so a stream lives on; it is bounded by MAX_EVENT_STREAMS instead).
  server.headersTimeout = 10_000;
  server.requestTimeout = 15_000;
  server.keepAliveTimeout = 5_000;
  server.maxHeadersCount = 50;

  const port = await new Promise<number>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`admin endpoint cannot listen on ${o.host}:${o.port}: ${e.message}`)));
    server.listen(o.port, o.host, () => resolve((server.address() as AddressInfo).port));
  });
  server.on('error', (e) => log.error({ err: e.message }, 'admin endpoint error'));
  const urlHost = o.host.includes(':') ? `[${o.host}]` : o.host;
  log.info({ host: o.host, port, token: o.token !== undefined, dashboard: d.dashboard !== undefined }, d.dashboard ? 'admin endpoint listening (/metrics, /healthz, /readyz, dashboard at /)' : 'admin endpoint listening (/metrics, /healthz, /readyz)');
  return {
    host: o.host,
    port,
    url: `http://${urlHost}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const r of streams) r.end();
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
