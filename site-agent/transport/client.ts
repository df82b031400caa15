/**
 * The site's side of the wire: one TLS channel (CA pinned at enrolment, presenting the site's TLS client
 * certificate from enrolment whenever it has one, for coordinators running --mtls) with a fresh site-signed token
 * on every call, wrapped in promise/stream helpers. The optional wire audit records every message the
 * site sends, so a site admin can check what left the hospital.
 *
 * Model downloads and update uploads go over a second HTTP/2 connection with a lean gRPC client (h2-channel.ts),
 * the rest over grpc-js: same coordinator, same pinned CA, client certificate and per-call token.
 */
import * as grpc from '@grpc/grpc-js';
import { AUTH_METADATA_KEY, CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, METHODS, loadProto } from '../../shared/protocol/grpc.ts';
import { pinnedChannelCredentials } from '../../shared/security/pki.ts';
import { siteCallCredentials, loadSiteKey, signSiteToken } from '../../shared/security/site-identity.ts';
import { H2Channel, type ServerStreamCall } from './h2-channel.ts';
import { updateDataChunkParts } from '../../shared/protocol/chunk-codec.ts';
import { SiteHome } from '../home.ts';
import { parseAddress } from '../enroll.ts';
import type { WireAudit } from './wire-audit.ts';
import { PROTOCOL_VERSION, SITE_FEATURES, type Feature } from '../../shared/protocol/features.ts';

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

/** An open UploadUpdate call. Sends resolve once more may be written; the outcome is `ack`. */
export interface UploadCall {
  /** One UpdateChunk given as an object (the header; tests also send hand-made chunks this way). */
  send(chunk: Record<string, unknown>): Promise<void>;
  /** One data chunk, sent from `data`'s memory without a copy (it must not change until `ack` settles). */
  sendData(offset: number, data: Uint8Array): Promise<void>;
  end(): Promise<void>;
  ack: Promise<UploadAck>;
}

type AnyClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export class FederationClient {
  private readonly client: AnyClient;
  private readonly bulk: H2Channel;
  private readonly audit: WireAudit | undefined;
  private readonly download: grpc.MethodDefinition<unknown, unknown>;
  private readonly upload: grpc.MethodDefinition<unknown, unknown>;

  constructor(home: SiteHome, opts: { audit?: WireAudit; tokenTtlSeconds?: number } = {}) {
    const config = home.config();
    const key = loadSiteKey(home.dir);
    const { host, port } = parseAddress(config.coordinator);
    const tokenOptions = { siteName: config.siteName, federationId: config.federationId, privateKey: key.privateKey, ttlSeconds: opts.tokenTtlSeconds };
    const clientCertificate = home.clientCertificate();
    const caPem = home.caPem();
    const creds = grpc.credentials.combineChannelCredentials(
      pinnedChannelCredentials(caPem, clientCertificate),
      siteCallCredentials(tokenOptions),
    );
    const { Federation } = loadProto();
    this.download = (Federation.service as grpc.ServiceDefinition).DownloadModel;
    this.upload = (Federation.service as grpc.ServiceDefinition).UploadUpdate;
    this.audit = opts.audit;
    this.bulk = new H2Channel({
      host,
      port,
      caPem,
      clientCertificate,
      authHeaders: async () => ({ [AUTH_METADATA_KEY]: `Bearer ${await signSiteToken(tokenOptions)}` }),
      windowBytes: Number(CHANNEL_OPTIONS['grpc-node.flow_control_window']),
      maxMessageBytes: MAX_MESSAGE_BYTES,
    });
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
    this.bulk.close();
  }

  /** Optional protocol features the coordinator named in its last heartbeat answer (none until then). */
  private features = new Set<string>();

  heartbeat(req: { state: string; progress: number; taskId: string; engine: string }, timeoutMs = 10_000): Promise<{ serverTimeMs: number; features: string[] }> {
    return this.unary<{ serverTimeMs: number; features?: string[] }>('Heartbeat', req, timeoutMs).then((r) => {
      const features = r.features ?? [];
      this.features = new Set(features);
      return { serverTimeMs: r.serverTimeMs, features };
    });
  }

  /** Whether the coordinator offered `feature` (shared/protocol/features.ts) in its last heartbeat answer. */
  supports(feature: Feature): boolean {
    return this.features.has(feature);
  }

  /** Stops using `feature` until a heartbeat offers it again (the coordinator refused it: e.g. it was downgraded). */
  forget(feature: Feature): void {
    this.features.delete(feature);
  }

  reportMetrics(req: { round: number; taskId: string; values: Record<string, number> }): Promise<{ accepted: boolean; reason: string }> {
    return this.unary('ReportMetrics', req, 15_000);
  }

  subscribeTasks(cachedModels: string[]): grpc.ClientReadableStream<WireTask> {
    // Version and features tell the coordinator which tasks this site can honour (docs/compatibility.md).
    return this.client.SubscribeTasks({ cachedModels, protocolVersion: PROTOCOL_VERSION, features: [...SITE_FEATURES] }) as grpc.ClientReadableStream<WireTask>;
  }

  /** The model's chunks from `offset` on; errors are grpc-js-shaped (`code`, `details`). */
  downloadModel(modelHash: string, offset: number): ServerStreamCall<WireChunk> {
    const request = { modelHash, offset };
    const audit = this.audit?.begin(METHODS.downloadModel);
    audit?.sent(request);
    audit?.end();
    return this.bulk.serverStream(METHODS.downloadModel, this.download.requestSerialize(request), (b) => this.download.responseDeserialize(b) as WireChunk);
  }

  /** Opens an upload (over the lean HTTP/2 client): send the header, the data chunks, end; `ack` is the coordinator's answer. */
  openUpload(timeoutMs: number): UploadCall {
    const call = this.bulk.clientStream(METHODS.uploadUpdate, (b) => this.upload.responseDeserialize(b) as UploadAck, { deadline: Date.now() + timeoutMs });
    const audit = this.audit?.begin(METHODS.uploadUpdate);
    // The audit line is written once the call has its outcome; the caller sees that outcome through `ack`.
    call.response.finally(() => audit?.end()).catch(() => undefined);
    return {
      send: (chunk) => {
        audit?.sent(chunk);
        return call.write([this.upload.requestSerialize(chunk)]);
      },
      sendData: (offset, data) => {
        audit?.sent({ data, offset });
        return call.write(updateDataChunkParts(offset, data));
      },
      end: () => call.end(),
      ack: call.response,
    };
  }

  private unary<T>(method: string, req: unknown, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) =>
      this.client[method](req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res))),
    );
  }
}
