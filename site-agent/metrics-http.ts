/**
 * The site agent's metrics endpoint: GET /metrics and /healthz on 127.0.0.1 only. A hospital opens no inbound
 * port for MedFL, so there is no option to listen elsewhere: a local Prometheus agent scrapes it.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../shared/util/log.ts';
import type { SiteMetrics } from './metrics.ts';

export interface SiteMetricsServer {
  port: number;
  url: string;
  close(): Promise<void>;
}

export async function startSiteMetricsHttp(port: number, metrics: SiteMetrics, log: Logger): Promise<SiteMetricsServer> {
  const server = createServer((req, res) => {
    const reply = (status: number, body: string, contentType: string) => {
      res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store' });
      res.end(req.method === 'HEAD' ? undefined : body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, 'only GET and HEAD\n', 'text/plain');
    const path = new URL(req.url ?? '/', 'http://site').pathname;
    if (path === '/healthz') return reply(200, '{"status":"ok"}\n', 'application/json');
    if (path !== '/metrics') return reply(404, 'not found: try /metrics or /healthz\n', 'text/plain');
    metrics.exposition().then(
      (m) => reply(200, m.body, m.contentType),
      (e: Error) => {
        log.error({ err: e.message }, 'collecting metrics failed');
        reply(500, 'internal error; see the agent log\n', 'text/plain');
      },
    );
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 15_000;
  const bound = await new Promise<number>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`metrics endpoint cannot listen on 127.0.0.1:${port}: ${e.message}`)));
    server.listen(port, '127.0.0.1', () => resolve((server.address() as AddressInfo).port));
  });
  server.on('error', (e) => log.error({ err: e.message }, 'metrics endpoint error'));
  log.info({ port: bound }, 'metrics endpoint listening on 127.0.0.1 (/metrics, /healthz)');
  return {
    port: bound,
    url: `http://127.0.0.1:${bound}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
