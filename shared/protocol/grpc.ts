/**
 * Loads the medfl.v1 proto once and exposes the service definitions and client constructors.
 * Options are fixed here so both sides agree: camelCase fields, int64 as JS numbers, bytes as Buffers.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const PROTO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'proto');
export const PROTO_FILE = join(PROTO_ROOT, 'medfl', 'v1', 'federation.proto');

/** Largest chunk either side sends; the gRPC message cap below leaves room for framing. */
export const CHUNK_BYTES = 2 * 1024 * 1024;
export const MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024;

/**
 * HTTP/2 receive window, per connection and per stream, on both sides. A transfer moves at most one window per round
 * trip, so the window must exceed the link's bandwidth-delay product: 1 Gbit/s at 20 ms is 2.5 MB, 100 Mbit/s at
 * 40 ms 0.5 MB, where grpc-js's own 65,535 bytes moved 7 and 13 Mbit/s both ways (bench/wan.ts, BENCH_WINDOWS). 32 MiB covers 1 Gbit/s up to
 * ~250 ms. It is a limit, not an allocation: a receiver that keeps up holds little.
 */
export const FLOW_CONTROL_WINDOW = 32 * 1024 * 1024;
/** The coordinator's side of it, unless coordinator.json's `receiveWindow` says otherwise (coordinator/server/receive-window.ts). */
export const SERVER_FLOW_CONTROL_WINDOW = FLOW_CONTROL_WINDOW;

/**
 * The site's channel options (site-agent/transport/connection.ts adds its own). Every option here is one grpc-js
 * 1.14 knows (channel-options.ts there); 'grpc.http2.write_buffer_size' and BDP probing are gRPC C-core's and do not
 * exist in grpc-js. grpc-js leaves 'grpc-node.max_session_memory' unlimited by default, which the wide window needs.
 */
export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW,
  // One connection carries every call, model transfers included: a PING every 20 s, and a connection whose PING is
  // not answered within 60 s is dropped (its calls fail UNAVAILABLE; downloads resume from their offset, uploads are
  // sent again). 60 s, not grpc's 20 s: during an upload the PING waits behind the bytes already in the socket's
  // buffers (megabytes: seconds at a few Mbit/s), and on a site whose CPU is taken by training the answer is read
  // late; a shorter timeout dropped transfers that were moving. A dead path is still noticed within 80 s.
  'grpc.keepalive_time_ms': 20_000,
  'grpc.keepalive_timeout_ms': 60_000,
  'grpc.keepalive_permit_without_calls': 1,
};

/** How often the coordinator pings a site's connection, and how long it waits for the answer before closing it. */
export const SERVER_KEEPALIVE = { timeMs: 60_000, timeoutMs: 120_000 };

export const SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5_000,
  // The coordinator pings each site's connection too, so a connection whose path died is closed and its calls end:
  // a download blocked on a dead socket otherwise keeps its transfer slot until TCP gives up (~15 min). The answer may
  // wait behind the megabytes already in the socket buffers on a slow link (a minute at 1 Mbit/s), hence 2 minutes.
  'grpc.keepalive_time_ms': SERVER_KEEPALIVE.timeMs,
  'grpc.keepalive_timeout_ms': SERVER_KEEPALIVE.timeoutMs,
  // Read by grpc-js servers once they honour it (1.14 reads it on clients only); until then widenServerWindows does it.
  // The coordinator replaces it with its configured window (receiveWindowServerOptions).
  'grpc-node.flow_control_window': SERVER_FLOW_CONTROL_WINDOW,
};

export const AUTH_METADATA_KEY = 'authorization';
/** Set by the server's auth interceptor after a token checks out; any client-sent value is dropped first. */
export const AUTHENTICATED_SITE_KEY = 'x-medfl-authenticated-site';
/**
 * Response header of UploadUpdate sent the moment the coordinator admits the upload (feature upload-go-ahead): a
 * site that saw the feature sends the update only after it. Its value is the only one defined so far.
 */
export const UPLOAD_ADMITTED_KEY = 'x-medfl-upload-admitted';
export const UPLOAD_ADMITTED_VALUE = 'go';

type ServiceCtor = grpc.ServiceClientConstructor;

let cached: { Enrollment: ServiceCtor; Federation: ServiceCtor } | undefined;

export function loadProto(): { Enrollment: ServiceCtor; Federation: ServiceCtor } {
  if (cached) return cached;
  const def = protoLoader.loadSync(PROTO_FILE, {
    keepCase: false,
    longs: Number,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  // DownloadModel's handler writes ModelChunk messages it has already encoded (shared/protocol/chunk-codec.ts)
  // as Buffers, read from disk straight into place, to skip protobuf's copy; objects are still encoded by protobufjs.
  // The wire format is the proto's either way.
  const download = (def['medfl.v1.Federation'] as grpc.ServiceDefinition).DownloadModel;
  const encode = download.responseSerialize;
  download.responseSerialize = (value: unknown) => (Buffer.isBuffer(value) ? value : encode(value));
  const pkg = grpc.loadPackageDefinition(def) as unknown as { medfl: { v1: { Enrollment: ServiceCtor; Federation: ServiceCtor } } };
  cached = { Enrollment: pkg.medfl.v1.Enrollment, Federation: pkg.medfl.v1.Federation };
  return cached;
}

/** Full method paths, as interceptors and per-method policies see them. */
export const METHODS = {
  enroll: '/medfl.v1.Enrollment/Enroll',
  heartbeat: '/medfl.v1.Federation/Heartbeat',
  subscribeTasks: '/medfl.v1.Federation/SubscribeTasks',
  downloadModel: '/medfl.v1.Federation/DownloadModel',
  uploadUpdate: '/medfl.v1.Federation/UploadUpdate',
  reportMetrics: '/medfl.v1.Federation/ReportMetrics',
} as const;
