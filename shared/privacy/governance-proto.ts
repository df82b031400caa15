/**
 * The Governance service definition (contribution ledger fetch, task declines), loaded from the same
 * proto as Federation. Kept apart from shared/protocol/grpc.ts so that loader stays as it is.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { dirname } from 'node:path';
import { PROTO_FILE } from '../protocol/grpc.ts';

let ctor: grpc.ServiceClientConstructor | undefined;

export function loadGovernanceService(): grpc.ServiceClientConstructor {
  if (ctor) return ctor;
  const def = protoLoader.loadSync(PROTO_FILE, {
    keepCase: false,
    longs: Number,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
    includeDirs: [dirname(dirname(dirname(PROTO_FILE)))],
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { medfl: { v1: { Governance?: grpc.ServiceClientConstructor } } };
  if (!pkg.medfl.v1.Governance) throw new Error(`${PROTO_FILE} has no Governance service; update the proto`);
  ctor = pkg.medfl.v1.Governance;
  return ctor;
}
