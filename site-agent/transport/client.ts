/**
 * The Federation service as the site uses it: promise and stream helpers over the site's one connection
 * (connection.ts: pinned CA, client certificate, a fresh site token on every call, one HTTP/2 connection for all
 * services). Model downloads and update uploads are ordinary grpc-js streaming calls on that connection.
 */
import * as grpc from '@grpc/grpc-js';
import { SiteHome } from '../home.ts';
import { SiteConnection, type ServiceClient, type SiteConnectionOptions } from './connection.ts';
import { PROTOCOL_VERSION, SITE_FEATURES, type Feature } from '../../shared/protocol/features.ts';
import { UPLOAD_ADMITTED_KEY, UPLOAD_ADMITTED_VALUE } from '../../shared/protocol/grpc.ts';

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
  /** One UpdateChunk given as an object (the header, the trailer; tests also send hand-made chunks this way). */
  send(chunk: Record<string, unknown>): Promise<void>;
  /** One data chunk (`data` must not change until the promise resolves). */
  sendData(offset: number, data: Uint8Array): Promise<void>;
  end(): Promise<void>;
  ack: Promise<UploadAck>;
  /**
   * True once the coordinator said the upload is admitted (its response headers carry the go-ahead, feature
   * upload-go-ahead); false when the call ended, or the headers came, without it. Only coordinators that offer the
   * feature ever send it, so only a client that saw the feature may wait for it.
   */
  admitted: Promise<boolean>;
}

/** A DownloadModel call: the model's chunks as an object-mode stream; errors carry grpc-js's `code` and `details`. */
export type DownloadCall = grpc.ClientReadableStream<WireChunk>;

export class FederationClient {
  /** The site's connection; other services (Governance, SecureAggregation) run on it too. */
  readonly connection: SiteConnection;
  private readonly client: ServiceClient;

  constructor(home: SiteHome, opts: SiteConnectionOptions = {}) {
    this.connection = new SiteConnection(home, opts);
    this.client = this.connection.federation();
  }

  close(): void {
    this.connection.close();
  }

  /** Optional protocol features the coordinator named in its last heartbeat answer (none until then). */
  private features = new Set<string>();
  /** The connection's generation when that answer came. */
  private featuresGeneration = -1;

  /** `nextHeartbeatMs` is the interval the coordinator named (0 from an older one); nextHeartbeatDelayMs bounds it. */
  heartbeat(
    req: { state: string; progress: number; taskId: string; engine: string; softwareVersion?: string },
    timeoutMs = 10_000,
  ): Promise<{ serverTimeMs: number; features: string[]; nextHeartbeatMs: number }> {
    return this.unary<{ serverTimeMs: number; features?: string[]; nextHeartbeatMs?: number }>('Heartbeat', req, timeoutMs).then((r) => {
      const features = r.features ?? [];
      this.features = new Set(features);
      this.featuresGeneration = this.connection.generation;
      return { serverTimeMs: r.serverTimeMs, features, nextHeartbeatMs: r.nextHeartbeatMs ?? 0 };
    });
  }

  /** Whether the coordinator offered `feature` (shared/protocol/features.ts) in its last heartbeat answer. */
  supports(feature: Feature): boolean {
    return this.features.has(feature);
  }

  /**
   * Whether the coordinator offered `feature` in a heartbeat answered on the connection still in use. For a feature the
   * site cannot fall back from within the call: a site waiting for the go-ahead from a coordinator replaced by an older
   * one (a new connection) would wait until that coordinator dropped the silent upload.
   */
  offeredOnThisConnection(feature: Feature): boolean {
    return this.features.has(feature) && this.featuresGeneration === this.connection.generation;
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

  /**
   * The model's chunks from `offset` on. No deadline: a model takes as long as the link needs, and a path that
   * dies is noticed by the connection's keepalive (the call then fails UNAVAILABLE and resumes from its offset).
   */
  downloadModel(modelHash: string, offset: number): DownloadCall {
    return this.client.DownloadModel({ modelHash, offset }) as DownloadCall;
  }

  /**
   * Opens an upload: send the header, the data chunks, end; `ack` is the coordinator's answer. `waitsForGoAhead`: the
   * caller sends nothing before `admitted` (feature upload-go-ahead, offered on this connection). Should the connection
   * change before the go-ahead came, the call is dropped with UNAVAILABLE: it either died with the old connection or
   * went to a coordinator that may never send one (an older one that replaced it).
   */
  openUpload(timeoutMs: number, waitsForGoAhead = false): UploadCall {
    let settle!: (err: Error | null, res?: UploadAck) => void;
    const ack = new Promise<UploadAck>((resolve, reject) => {
      settle = (err, res) => (err ? reject(err) : resolve(res!));
    });
    let call: grpc.ClientWritableStream<Record<string, unknown>>;
    try {
      call = this.client.UploadUpdate({ deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: UploadAck) => settle(err, res)) as grpc.ClientWritableStream<Record<string, unknown>>;
    } catch (e) {
      // A closed connection refuses to start the call: the upload fails like any other (through `ack`).
      settle(Object.assign(e as Error, { code: grpc.status.UNAVAILABLE, details: (e as Error).message }));
      const nothing = async () => undefined;
      return { send: nothing, sendData: nothing, end: nothing, ack, admitted: Promise.resolve(false) };
    }
    // Settled early by a refusal or a failure: later writes then return at once (the outcome is `ack`).
    let over = false;
    ack.then(
      () => (over = true),
      () => (over = true),
    );
    call.on('error', () => undefined); // the error is delivered through `ack`
    const admitted = new Promise<boolean>((resolve) => {
      let stopWatching = () => undefined as unknown;
      const settled = (go: boolean) => {
        stopWatching();
        resolve(go);
      };
      call.once('metadata', (md: grpc.Metadata) => settled(md.get(UPLOAD_ADMITTED_KEY)[0] === UPLOAD_ADMITTED_VALUE));
      ack.then(
        () => settled(false),
        () => settled(false),
      );
      if (!waitsForGoAhead) return;
      stopWatching = this.connection.onStateChange(() => {
        settle(Object.assign(new Error('the connection to the coordinator changed while the upload waited for its go-ahead'), { code: grpc.status.UNAVAILABLE, details: 'the connection to the coordinator changed while the upload waited for its go-ahead; sending it again' }));
        call.cancel();
      });
    });
    // grpc-js takes each message into its HTTP/2 stream; write() asks to wait once that stream holds more than its
    // high-water mark, so at most a window and a few chunks of an update are ever queued.
    const write = (message: Record<string, unknown>): Promise<void> =>
      new Promise<void>((resolve) => {
        if (over || call.writableEnded || call.destroyed) return resolve();
        if (call.write(message)) return resolve();
        const done = () => {
          call.off('drain', done);
          call.off('close', done);
          resolve();
        };
        call.on('drain', done);
        call.on('close', done);
        // 'drain' never comes on a call that ended meanwhile: its outcome ends the wait too.
        ack.then(done, done);
      });
    return {
      send: (chunk) => write(chunk),
      sendData: (offset, data) => write({ data, offset }),
      end: async () => {
        if (!over && !call.writableEnded) call.end();
      },
      ack,
      admitted,
    };
  }

  private unary<T>(method: string, req: unknown, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) =>
      this.client[method]!(req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res))),
    );
  }
}
