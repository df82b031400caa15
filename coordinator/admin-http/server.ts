/**
 * The coordinator's admin HTTP endpoint, on its own port (never the sites' gRPC port): GET /metrics (Prometheus
 * text format), /healthz (the process answers) and /readyz (it can do its job: readiness.ts). Read-only: it
 * changes nothing and shows no patient data, but metrics name sites and rounds, so it listens on loopback unless
 * an admin token is configured (options.ts), and with a token every request must present it.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../../shared/util/log.ts';
import type { AdminHttpOptions } from './options.ts';
import type { CoordinatorMetrics } from './metrics.ts';
import type { ReadinessCheck } from './readiness.ts';

export interface AdminHttpDeps {
  metrics: CoordinatorMetrics;
  readiness: () => ReadinessCheck[];
  log: Logger;
}

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

function bearer(req: IncomingMessage): string | undefined {
  const m = /^Bearer ([\x21-\x7e]+)$/i.exec(req.headers.authorization?.trim() ?? '');
  return m?.[1];
}

function send(res: ServerResponse, status: number, body: string, contentType: string, extra: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', ...extra });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

const json = (res: ServerResponse, status: number, value: unknown, extra?: Record<string, string>) => send(res, status, JSON.stringify(value) + '\n', 'application/json; charset=utf-8', extra);

export async function startAdminHttp(o: AdminHttpOptions, d: AdminHttpDeps): Promise<AdminHttpServer> {
  const { log } = d;
  const startedAt = Date.now();

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    if (o.token !== undefined) {
      const presented = bearer(req);
      if (presented === undefined || !tokenMatches(presented, o.token)) {
        d.metrics.adminAuthFailures.inc();
        log.warn({ peer: req.socket.remoteAddress, path: req.url?.slice(0, 200) }, 'admin request refused: missing or wrong bearer token');
        return json(res, 401, { error: 'missing or wrong admin token: send Authorization: Bearer <token>' }, { 'www-authenticate': 'Bearer realm="medfl-admin"' });
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
      default:
        return json(res, 404, { error: 'not found: try /metrics, /healthz or /readyz' });
    }
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((e: Error) => {
      log.error({ err: e.message, path: req.url?.slice(0, 200) }, 'admin request failed');
      if (!res.headersSent) json(res, 500, { error: 'internal error; see the coordinator log' });
      else res.destroy();
    });
  });
  // Slow or idle clients must not hold sockets: every answer here is small and immediate.
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
  log.info({ host: o.host, port, token: o.token !== undefined }, 'admin endpoint listening (/metrics, /healthz, /readyz)');
  return {
    host: o.host,
    port,
    url: `http://${urlHost}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
