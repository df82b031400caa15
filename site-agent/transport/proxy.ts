/**
 * Egress proxies for the site's own HTTP/2 connection (h2-channel.ts), chosen by the same environment rules as
 * grpc-js uses for every other call, so both connections of a site leave the hospital the same way:
 * `grpc_proxy`, else `https_proxy`, else `http_proxy` (an http:// URL, default port 80, optional user:password);
 * `no_grpc_proxy`, else `no_proxy`: comma-separated host suffixes or IPv4 CIDR ranges that go direct.
 * The tunnel is an HTTP CONNECT to the proxy; TLS to the coordinator runs inside it, end to end.
 */
import http from 'node:http';
import { isIPv4, type Socket } from 'node:net';

export interface ProxySetting {
  host: string;
  port: number;
  /** user:password (or user), for Proxy-Authorization: Basic. */
  credentials?: string;
  /** The variable it came from, for messages. */
  from: string;
}

function proxyFromEnv(env: NodeJS.ProcessEnv): ProxySetting | undefined {
  const from = env.grpc_proxy ? 'grpc_proxy' : env.https_proxy ? 'https_proxy' : env.http_proxy ? 'http_proxy' : undefined;
  if (!from) return undefined;
  let url: URL;
  try {
    url = new URL(env[from]!);
  } catch {
    throw new Error(`cannot parse the ${from} environment variable as a URL; set it to http://HOST:PORT or unset it`);
  }
  if (url.protocol !== 'http:') throw new Error(`${from} uses "${url.protocol}"; only http:// proxies (HTTP CONNECT) are supported`);
  const credentials = url.username ? decodeURIComponent(url.password ? `${url.username}:${url.password}` : url.username) : undefined;
  return { host: url.hostname, port: url.port === '' ? 80 : Number(url.port), credentials, from };
}

function ipToInt(ip: string): number {
  return ip.split('.').reduce((acc, octet) => ((acc << 8) + Number(octet)) >>> 0, 0);
}

function bypasses(host: string, env: NodeJS.ProcessEnv): boolean {
  const list = env.no_grpc_proxy || env.no_proxy;
  if (!list) return false;
  for (const raw of list.split(',')) {
    const entry = raw.trim();
    if (entry === '') continue;
    const [ip, bits] = entry.split('/');
    if (bits !== undefined && isIPv4(ip!) && isIPv4(host)) {
      const n = Number(bits);
      if (Number.isInteger(n) && n >= 0 && n <= 32) {
        const mask = n === 0 ? 0 : (-1 << (32 - n)) >>> 0;
        if (((ipToInt(host) & mask) >>> 0) === ((ipToInt(ip!) & mask) >>> 0)) return true;
        continue;
      }
    }
    if (host.endsWith(entry)) return true;
  }
  return false;
}

/** The proxy to reach `host` through, if the environment names one (and does not exempt `host`). */
export function proxyFor(host: string, env: NodeJS.ProcessEnv = process.env): ProxySetting | undefined {
  const proxy = proxyFromEnv(env);
  return proxy && !bypasses(host, env) ? proxy : undefined;
}

/** Opens an HTTP CONNECT tunnel to `target` (host:port) through `proxy`; resolves the raw socket. */
export function connectTunnel(proxy: ProxySetting, target: string, timeoutMs = 20_000): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { Host: target };
    if (proxy.credentials) headers['Proxy-Authorization'] = `Basic ${Buffer.from(proxy.credentials).toString('base64')}`;
    const req = http.request({ host: proxy.host, port: proxy.port, method: 'CONNECT', path: target, headers, timeout: timeoutMs });
    req.on('connect', (res, socket, head) => {
      if (res.statusCode !== 200) {
        socket.destroy();
        return reject(new Error(`proxy ${proxy.host}:${proxy.port} (from ${proxy.from}) refused CONNECT ${target}: HTTP ${res.statusCode} ${res.statusMessage ?? ''}`.trim()));
      }
      if (head.length > 0) socket.unshift(head);
      resolve(socket);
    });
    req.on('timeout', () => req.destroy(new Error(`proxy ${proxy.host}:${proxy.port} (from ${proxy.from}) did not answer CONNECT within ${timeoutMs} ms`)));
    req.on('error', (e) => reject(new Error(`cannot reach proxy ${proxy.host}:${proxy.port} (from ${proxy.from}): ${e.message}`)));
    req.end();
  });
}
