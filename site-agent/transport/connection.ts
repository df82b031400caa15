/**
 * The site's one connection to its coordinator, and the only place site code builds gRPC clients.
 *
 * Every service the site calls (Federation, Governance, SecureAggregation) runs over one grpc-js channel, so one
 * TLS connection per site carries the task stream, heartbeats, model downloads and update uploads alike: one
 * keepalive, one reconnect backoff, one egress-proxy rule (grpc-js's: grpc_proxy / https_proxy / http_proxy,
 * no_grpc_proxy / no_proxy), one place to size HTTP/2 flow control. The channel trusts only the CA pinned at
 * enrolment, presents the site's TLS client certificate whenever it has one (coordinators running --mtls), and signs
 * a fresh single-use site token for every call. Enrolment, which has no token and no certificate yet, gets its own
 * short-lived channel from `enrolmentClient`.
 */
import * as grpc from '@grpc/grpc-js';
import { isIP } from 'node:net';
import * as tls from 'node:tls';
import { CHANNEL_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import { loadGovernanceService } from '../../shared/privacy/governance-proto.ts';
import { loadSecAggService } from '../../shared/privacy/secagg/wire.ts';
import { pinnedChannelCredentials, type IssuedCertificate } from '../../shared/security/pki.ts';
import { loadSiteKey, siteCallCredentials } from '../../shared/security/site-identity.ts';
import type { SiteHome } from '../home.ts';
import type { WireAudit } from './wire-audit.ts';

export type ServiceClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export interface SiteConnectionOptions {
  /** Record every message the site sends (wire-audit.ts), on every service. */
  audit?: WireAudit;
  /** Lifetime of each call's token (default: site-identity's). */
  tokenTtlSeconds?: number;
  /**
   * Keepalive: a PING every `timeMs` and the connection dropped when its answer takes longer than `timeoutMs`
   * (defaults in CHANNEL_OPTIONS), so calls over a network path that died fail UNAVAILABLE instead of hanging.
   */
  keepalive?: { timeMs?: number; timeoutMs?: number };
}

/** `host:port`, with brackets around an IPv6 address. */
export function coordinatorTarget(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

/**
 * The TLS name sent when the coordinator is dialled by address. TLS's server-name extension carries host names only
 * (RFC 6066; Node warns with DEP0123 and will ignore an address there), but grpc-js puts the dialled host in it unless
 * told otherwise. A name under `.invalid` (reserved, RFC 2606: it can never resolve) stands in, and the certificate is
 * still checked against the address that was dialled (channelCredentials).
 */
export const TLS_NAME_FOR_ADDRESS = 'coordinator.medfl.invalid';

/** Channel credentials trusting only the pinned CA, checking the certificate against `host` (name or address). */
export function channelCredentials(host: string, caPem: string, client?: IssuedCertificate): grpc.ChannelCredentials {
  if (!isIP(host)) return pinnedChannelCredentials(caPem, client);
  return pinnedChannelCredentials(caPem, client, { checkServerIdentity: (_name, cert) => tls.checkServerIdentity(host, cert) });
}

/** Channel options every site channel uses: flow-control windows, limits, keepalive, and the TLS name rule above. */
export function channelOptions(host: string, o: SiteConnectionOptions = {}): grpc.ChannelOptions {
  return {
    ...CHANNEL_OPTIONS,
    ...(o.keepalive?.timeMs !== undefined ? { 'grpc.keepalive_time_ms': o.keepalive.timeMs } : {}),
    ...(o.keepalive?.timeoutMs !== undefined ? { 'grpc.keepalive_timeout_ms': o.keepalive.timeoutMs } : {}),
    // Reconnects are the agent's to pace (backoff with jitter); keep grpc's own short.
    'grpc.initial_reconnect_backoff_ms': 500,
    'grpc.max_reconnect_backoff_ms': 5000,
    ...(isIP(host) ? { 'grpc.ssl_target_name_override': TLS_NAME_FOR_ADDRESS } : {}),
  };
}

/** A client for Enroll only (no token, no client certificate yet); the caller closes it. */
export function enrolmentClient(host: string, port: number, caPem: string): ServiceClient {
  const { Enrollment } = loadProto();
  return new Enrollment(coordinatorTarget(host, port), channelCredentials(host, caPem), channelOptions(host)) as ServiceClient;
}

/** Splits `HOST:PORT` (IPv6 in brackets). */
export function parseAddress(address: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(address.trim());
  if (!m) throw new Error(`coordinator address '${address}' must be HOST:PORT, e.g. coordinator.example.org:7443`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

export class SiteConnection {
  private readonly channel: grpc.Channel;
  private readonly clients = new Map<grpc.ServiceClientConstructor, ServiceClient>();
  private readonly interceptors: grpc.Interceptor[];
  private closed = false;

  constructor(home: SiteHome, o: SiteConnectionOptions = {}) {
    const config = home.config();
    const key = loadSiteKey(home.dir);
    const { host, port } = parseAddress(config.coordinator);
    const creds = grpc.credentials.combineChannelCredentials(
      channelCredentials(host, home.caPem(), home.clientCertificate()),
      siteCallCredentials({ siteName: config.siteName, federationId: config.federationId, privateKey: key.privateKey, ttlSeconds: o.tokenTtlSeconds }),
    );
    this.channel = new grpc.Channel(coordinatorTarget(host, port), creds, channelOptions(host, o));
    this.interceptors = o.audit ? [o.audit.interceptor()] : [];
    this.countStateChanges(this.channel.getConnectivityState(false));
  }

  private stateChanges = 0;
  private readonly stateListeners = new Set<() => void>();

  /** Calls `listener` at every change of the channel's connectivity until the returned function is called. */
  onStateChange(listener: () => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /**
   * Changes whenever the channel's connectivity does (a connection lost, another one made): while it stays the same,
   * the calls went over one connection, so to one coordinator process. What a heartbeat answer said about the
   * coordinator holds only while this stays what it was then (a coordinator replaced by an older one drops the connection).
   */
  get generation(): number {
    return this.stateChanges;
  }

  private countStateChanges(current: grpc.connectivityState): void {
    if (current === grpc.connectivityState.SHUTDOWN) return;
    this.channel.watchConnectivityState(current, Number.POSITIVE_INFINITY, () => {
      this.stateChanges++;
      for (const l of [...this.stateListeners]) l();
      this.countStateChanges(this.channel.getConnectivityState(false));
    });
  }

  /** A client of `service` on this connection (one per service, built on first use). */
  client(service: grpc.ServiceClientConstructor): ServiceClient {
    let c = this.clients.get(service);
    if (!c) {
      // channelOverride: every service shares this one channel, hence one HTTP/2 connection.
      c = new service('unused:0', grpc.credentials.createInsecure(), { channelOverride: this.channel, interceptors: this.interceptors }) as ServiceClient;
      this.clients.set(service, c);
    }
    return c;
  }

  federation(): ServiceClient {
    return this.client(loadProto().Federation);
  }

  governance(): ServiceClient {
    return this.client(loadGovernanceService());
  }

  secureAggregation(): ServiceClient {
    return this.client(loadSecAggService());
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.channel.close();
  }
}
