/**
 * Secure aggregation over gRPC: JSON forms of the protocol messages (zod-checked on receipt, sizes bounded),
 * the SecureAggregation service definition, and the vector a site masks in a federation round:
 *
 *   v = [ q((w/W)·Δ_1) … q((w/W)·Δ_L) , w ]      Δ = x_site − x_base over the task's shared tensors, in order
 *
 * w = the site's sample count (1 under DP), W = settings.maxWeight, q = the fixed-point quantiser of the
 * session (clip, scale). The last word is the plain integer w, so the unmasked sum gives Σw exactly and the
 * coordinator divides W·Σ(w/W)Δ by it: the weighted FedAvg delta.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { dirname } from 'node:path';
import { z } from 'zod';
import { PROTO_FILE } from '../../protocol/grpc.ts';
import { quantizer, type Quantizer } from './quantize.ts';
import type { AdvertiseKeys, ForwardedShares, Roster, ShareKeys, UnmaskRequest, UnmaskResponse } from './messages.ts';

/** Largest JSON a SecAgg call may carry (sealed shares are O(n) per site: ~0.2 kB each). */
export const SECAGG_MAX_JSON = 1024 * 1024;
/** Words per masked-vector piece (2 MiB, under the gRPC message cap). */
export const SECAGG_PIECE_WORDS = 512 * 1024;
export const SECAGG_MAX_SITES = 1000;

const b64 = (len?: number) =>
  z
    .string()
    .max(4096)
    .regex(/^[A-Za-z0-9+/]*={0,2}$/, 'must be base64')
    .transform((s) => Buffer.from(s, 'base64'))
    .refine((b) => len === undefined || b.length === len, { message: `must decode to ${len} bytes` });
const id = z.number().int().min(1).max(SECAGG_MAX_SITES);

export const AdvertiseWire = z.object({ cPk: b64(32), sPk: b64(32) }).strict();
const SealedWire = z.object({ from: id, to: id, iv: b64(12), ct: b64(), tag: b64(16) }).strict();
export const ShareKeysWire = z.object({ sealed: z.array(SealedWire).max(SECAGG_MAX_SITES) }).strict();
export const UnmaskWire = z
  .object({
    selfMaskShares: z.array(z.object({ of: id, share: b64() }).strict()).max(SECAGG_MAX_SITES),
    keyShares: z.array(z.object({ of: id, share: b64() }).strict()).max(SECAGG_MAX_SITES),
  })
  .strict();
export const RosterWire = z
  .object({
    session: z.string().max(200),
    threshold: z.number().int().min(2),
    vectorLength: z.number().int().min(1),
    members: z.array(z.object({ id, cPk: b64(32), sPk: b64(32) }).strict()).max(SECAGG_MAX_SITES),
    graph: z.object({ k: z.number().int(), ring: z.array(id).max(SECAGG_MAX_SITES) }).strict().optional(),
  })
  .strict();
export const ForwardedWire = z.object({ to: id, sharers: z.array(id).max(SECAGG_MAX_SITES), sealed: z.array(SealedWire).max(SECAGG_MAX_SITES) }).strict();
export const UnmaskRequestWire = z.object({ survivors: z.array(id).max(SECAGG_MAX_SITES) }).strict();
export const DoneWire = z.object({ ok: z.literal(true) }).strict();

/** Buffers become base64, everything else stays: the JSON form of any protocol message (minus type / id). */
export function toJson(m: object): string {
  const { type: _type, ...rest } = m as { type?: unknown };
  return JSON.stringify(rest, (_k, v: unknown) => {
    if (v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' && Array.isArray((v as { data?: unknown }).data)) return Buffer.from((v as { data: number[] }).data).toString('base64');
    return v;
  });
}

/** Parses a JSON payload with a schema; throws a message that says which field is wrong. */
export function parseWire<T extends z.ZodType>(schema: T, json: string, what: string): z.output<T> {
  if (json.length > SECAGG_MAX_JSON) throw new Error(`${what}: ${json.length} bytes of JSON, more than the ${SECAGG_MAX_JSON} allowed`);
  let raw: unknown;
  try {
    raw = JSON.parse(json);
  } catch {
    throw new Error(`${what}: not JSON`);
  }
  const r = schema.safeParse(raw);
  if (!r.success) throw new Error(`${what}: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
  return r.data;
}

export const asAdvertise = (siteId: number, j: string): AdvertiseKeys => ({ type: 'advertise', id: siteId, ...parseWire(AdvertiseWire, j, 'AdvertiseKeys') });
export const asShareKeys = (siteId: number, j: string): ShareKeys => ({ type: 'share-keys', id: siteId, ...parseWire(ShareKeysWire, j, 'ShareKeys') });
export const asUnmask = (siteId: number, j: string): UnmaskResponse => ({ type: 'unmask', id: siteId, ...parseWire(UnmaskWire, j, 'UnmaskResponse') });
export const asRoster = (j: string): Roster => ({ type: 'roster', ...parseWire(RosterWire, j, 'Roster') });
export const asForwarded = (j: string): ForwardedShares => ({ type: 'forwarded-shares', ...parseWire(ForwardedWire, j, 'ForwardedShares') });
export const asUnmaskRequest = (j: string): UnmaskRequest => ({ type: 'unmask-request', ...parseWire(UnmaskRequestWire, j, 'UnmaskRequest') });

/** What a TRAIN task tells a site about the round's secure aggregation (settings.secureAggregation). */
export interface RoundSecAgg {
  id: number;
  threshold: number;
  neighbours?: number;
  clip: number;
  maxWeight: number;
  /** Sites in the session (fixes the quantiser's scale). */
  sites: number;
  /** Shared parameters + 1 (the weight word). */
  vectorLength: number;
}

/** Both sides derive the same quantiser from the task settings. */
export function roundQuantizer(s: Pick<RoundSecAgg, 'clip' | 'sites'>): Quantizer {
  return quantizer({ clip: s.clip, maxSites: s.sites });
}

/** The site's vector: quantised (w/W)·Δ over the shared tensors, then w as a plain integer. */
export function encodeRoundVector(delta: Float32Array, weight: number, s: RoundSecAgg): Uint32Array {
  if (delta.length + 1 !== s.vectorLength) throw new RangeError(`the update has ${delta.length} shared values, the session expects ${s.vectorLength - 1}`);
  if (!Number.isInteger(weight) || weight < 1 || weight > s.maxWeight) throw new RangeError(`weight ${weight} must be a whole number in [1, ${s.maxWeight}] (secureAggregation.maxWeight)`);
  const f = weight / s.maxWeight;
  const scaled = new Float32Array(delta.length);
  for (let i = 0; i < delta.length; i++) scaled[i] = f * delta[i]!;
  const out = new Uint32Array(s.vectorLength);
  out.set(roundQuantizer(s).encode(scaled));
  out[delta.length] = weight;
  return out;
}

/** The coordinator's side: Σ w_i Δ_i (float32) and Σ w_i from the unmasked ring sum. */
export function decodeRoundSum(sum: Uint32Array, s: Pick<RoundSecAgg, 'clip' | 'sites' | 'maxWeight'>): { weightedDelta: Float32Array; weight: number } {
  const q = roundQuantizer(s);
  const weightedDelta = q.decode(sum.subarray(0, sum.length - 1));
  for (let i = 0; i < weightedDelta.length; i++) weightedDelta[i]! *= s.maxWeight;
  return { weightedDelta, weight: sum[sum.length - 1]! };
}

let ctor: grpc.ServiceClientConstructor | undefined;

/** The SecureAggregation service from the federation proto (same loader options as the others). */
export function loadSecAggService(): grpc.ServiceClientConstructor {
  if (ctor) return ctor;
  const def = protoLoader.loadSync(PROTO_FILE, { keepCase: false, longs: Number, enums: String, bytes: Buffer, defaults: true, oneofs: true, includeDirs: [dirname(dirname(dirname(PROTO_FILE)))] });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { medfl: { v1: { SecureAggregation?: grpc.ServiceClientConstructor } } };
  if (!pkg.medfl.v1.SecureAggregation) throw new Error(`${PROTO_FILE} has no SecureAggregation service; update the proto`);
  ctor = pkg.medfl.v1.SecureAggregation;
  return ctor;
}
