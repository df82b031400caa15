/**
 * The site's side of the wire: one TLS channel (CA pinned at enrolment, presenting the site's TLS client
 * certificate from enrolment whenever it has one, for coordinators running --mtls) with a fresh site-signed token
 * on every call, wrapped in promise/stream helpers. The optional wire audit records every message the
 * site sends, so a site admin can check what left the hospital.
 */
import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS, loadProto } from '../../shared/protocol/grpc.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { siteCallCredentials, loadSiteKey } from '../../shared/security/site-identity.ts';
import { SiteHome } from '../home.ts';
import { parseAddress } from '../enroll.ts';
import type { WireAudit } from './wire-audit.ts';

export interface WireTask {
  taskId: string;
  kind: 'TRAIN' | 'FINISHED' | 'KIND_UNSPECIFIED';
  round: number;
  modelHash: string;
  modelSize: number;
  deadlineUnixMs: number;
  settingsJson: string;
  signature: Buffer;
}

export interface WireChunk {
  offset: number;
  data: Buffer;
  totalSize: number;
  sha256: string;
}

export interface UploadAck {
  updateId: string;
  accepted: boolean;
  duplicate: boolean;
  reason: string;
}

type AnyClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export class FederationClient {
  private readonly client: AnyClient;

  constructor(home: SiteHome, opts: { audit?: WireAudit; tokenTtlSeconds?: number } = {}) {
    const config = home.config();
    const key = loadSiteKey(home.dir);
    const { host, port } = parseAddress(config.coordinator);
    const creds = grpc.credentials.combineChannelCredentials(
      pinnedChannelCredentials(home.caPem(), home.clientCertificate()),
      siteCallCredentials({ siteName: config.siteName, federationId: config.federationId, privateKey: key.privateKey, ttlSeconds: opts.tokenTtlSeconds }),
    );
    const { Federation } = loadProto();
    const target = `${host.includes(':') ? `[${host}]` : host}:${port}`;
    this.client = new Federation(target, creds, {
      ...CHANNEL_OPTIONS,
      // Reconnects are ours to pace (backoff with jitter in the agent); keep grpc's own short.
      'grpc.initial_reconnect_backoff_ms': 500,
      'grpc.max_reconnect_backoff_ms': 5000,
      interceptors: opts.audit ? [opts.audit.interceptor()] : [],
    }) as AnyClient;
  }

  close(): void {
    this.client.close();
  }

  heartbeat(req: { state: string; progress: number; taskId: string; engine: string }, timeoutMs = 10_000): Promise<{ serverTimeMs: number }> {
    return this.unary('Heartbeat', req, timeoutMs);
  }

  reportMetrics(req: { round: number; taskId: string; values: Record<string, number> }): Promise<{ accepted: boolean; reason: string }> {
    return this.unary('ReportMetrics', req, 15_000);
  }

  subscribeTasks(cachedModels: string[]): grpc.ClientReadableStream<WireTask> {
    return this.client.SubscribeTasks({ cachedModels }) as grpc.ClientReadableStream<WireTask>;
  }

  downloadModel(modelHash: string, offset: number): grpc.ClientReadableStream<WireChunk> {
    return this.client.DownloadModel({ modelHash, offset }) as grpc.ClientReadableStream<WireChunk>;
  }

  /** Opens an upload; the caller writes chunks and ends it, the promise gives the coordinator's ack. */
  openUpload(timeoutMs: number): { stream: grpc.ClientWritableStream<Record<string, unknown>>; ack: Promise<UploadAck> } {
    let settle!: (err: grpc.ServiceError | null, res?: UploadAck) => void;
    const ack = new Promise<UploadAck>((resolve, reject) => {
      settle = (err, res) => (err ? reject(err) : resolve(res!));
    });
    // Outside the promise: a closed channel throws here, to the caller, instead of leaving a rejection nobody awaits.
    const stream = this.client.UploadUpdate({ deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: UploadAck) => settle(err, res)) as grpc.ClientWritableStream<Record<string, unknown>>;
    return { stream, ack };
  }

  private unary<T>(method: string, req: unknown, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) =>
      this.client[method](req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res))),
    );
  }
}
