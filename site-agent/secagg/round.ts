/**
 * A site's part in a secure-aggregation round (task settings.secureAggregation): instead of uploading its
 * update, the site turns it into the round vector (weighted, clipped, quantised delta + weight word; see
 * shared/privacy/secagg/wire.ts), masks it with the library's client state machine, and walks the four
 * phases over the SecureAggregation service. Each call is answered when the coordinator closes that phase.
 *
 * What leaves the site: two X25519 public keys, Shamir shares sealed to other sites (the coordinator cannot
 * open them), the masked vector, and at the end one kind of share per peer. Its own unmasked vector stays in
 * the site directory (secagg/round-N.json + .f32), so the site admin can check what it contributed.
 */
import * as grpc from '@grpc/grpc-js';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SecAggClient } from '../../shared/privacy/secagg/client.ts';
import {
  asForwarded,
  asRoster,
  asUnmaskRequest,
  DoneWire,
  encodeRoundVector,
  parseWire,
  SECAGG_PIECE_WORDS,
  toJson,
  type RoundSecAgg,
} from '../../shared/privacy/secagg/wire.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { SiteHome } from '../home.ts';
import type { SiteConnection } from '../transport/connection.ts';

type AnyClient = grpc.Client & Record<string, (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r?: { json: string }) => void) => unknown>;

export interface SecAggRoundInput {
  home: SiteHome;
  /** The site's connection (its calls go over it, recorded by its wire audit if any). */
  connection: SiteConnection;
  log: Logger;
  round: number;
  taskId: string;
  deadlineUnixMs: number;
  settings: TaskSettings;
  /** The trained shared tensors and the round's base model (float32 safetensors). */
  update: Buffer;
  base: Buffer;
  numSamples: number;
  /** Told as each phase's answer arrives (the agent turns it into task progress); called synchronously, before the next message goes out. */
  onStep?(step: SecAggStep): void;
}

/** How far a site got: roster received, key shares forwarded to it, masked input taken (unmask request received), done. */
export const SECAGG_STEPS = ['roster', 'keys-shared', 'masked-sent', 'done'] as const;
export type SecAggStep = (typeof SECAGG_STEPS)[number];

export interface SecAggRoundOutcome {
  /** Bytes of request payload this site sent (JSON + masked vector). */
  bytesSent: number;
  survivors: number;
  seconds: number;
}

/** Δ = update − base over the task's shared tensors, in the task's order (the vector layout both sides use). */
export function flatDelta(update: Buffer, base: Buffer, names: readonly string[]): Float32Array {
  const u = decodeSafetensors(update).bundle;
  const b = decodeSafetensors(base).bundle;
  let n = 0;
  for (const name of names) {
    const t = u.get(name);
    const s = b.get(name);
    if (!t || !s || t.data.length !== s.data.length) throw new Error(`tensor ${name} is missing from the update or the base model, or their sizes differ: cannot build the secure-aggregation vector`);
    n += t.data.length;
  }
  const out = new Float32Array(n);
  let off = 0;
  for (const name of names) {
    const t = u.get(name)!.data;
    const s = b.get(name)!.data;
    for (let i = 0; i < t.length; i++) out[off + i] = t[i]! - s[i]!;
    off += t.length;
  }
  return out;
}

/** The weight and delta a site contributes: FedAvg weight min(samples, maxWeight); under DP weight 1 and Δ clipped to dp.clipNorm. */
export function contribution(delta: Float32Array, numSamples: number, settings: TaskSettings): { delta: Float32Array; weight: number } {
  const sa = settings.secureAggregation!;
  if (settings.dp) {
    let sq = 0;
    for (let i = 0; i < delta.length; i++) sq += delta[i]! * delta[i]!;
    const norm = Math.sqrt(sq);
    if (norm > settings.dp.clipNorm) {
      const f = settings.dp.clipNorm / norm;
      for (let i = 0; i < delta.length; i++) delta[i]! *= f;
    }
    return { delta, weight: 1 };
  }
  return { delta, weight: Math.max(1, Math.min(sa.maxWeight, Math.round(numSamples))) };
}

export async function runSecAggRound(o: SecAggRoundInput): Promise<SecAggRoundOutcome> {
  const sa = o.settings.secureAggregation as RoundSecAgg | undefined;
  if (!sa) throw new Error('the task has no secureAggregation settings');
  const t0 = Date.now();
  const { delta, weight } = contribution(flatDelta(o.update, o.base, o.settings.sharedTensors), o.numSamples, o.settings);
  const vector = encodeRoundVector(delta, weight, sa);
  // The site's own record of what it put in (never sent): for its admin, and for tests that check the sum.
  const dir = join(o.home.dir, 'secagg');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, `round-${o.round}.f32`), Buffer.from(delta.buffer, delta.byteOffset, delta.byteLength));
  writeFileSync(join(dir, `round-${o.round}.json`), JSON.stringify({ round: o.round, id: sa.id, weight, values: delta.length }));

  const client = o.connection.secureAggregation() as AnyClient;
  let bytesSent = 0;
  const call = (method: string, req: { json?: string; vector?: Buffer; vectorOffset?: number }): Promise<string> =>
    new Promise((resolve, reject) => {
      const full = { round: o.round, taskId: o.taskId, json: req.json ?? '', vector: req.vector ?? Buffer.alloc(0), vectorOffset: req.vectorOffset ?? 0 };
      bytesSent += full.json.length + full.vector.length;
      const deadline = o.deadlineUnixMs > 0 ? new Date(o.deadlineUnixMs + 5_000) : new Date(Date.now() + 3_600_000);
      client[method]!(full, new grpc.Metadata(), { deadline }, (e, r) => (e ? reject(new Error(`secure aggregation ${method}: ${e.details ?? e.message}`)) : resolve(r!.json)));
    });
    const me = new SecAggClient(sa.id);
    const adv = me.advertise();
    const roster = asRoster(await call('Advertise', { json: toJson({ cPk: adv.cPk, sPk: adv.sPk }) }));
    if (roster.vectorLength !== sa.vectorLength || roster.threshold !== sa.threshold) throw new Error(`the roster's vector length ${roster.vectorLength} / threshold ${roster.threshold} differ from the signed task's ${sa.vectorLength} / ${sa.threshold}: abort`);
    o.log.info({ round: o.round, members: roster.members.length, neighbours: roster.graph?.k ?? roster.members.length - 1 }, 'secure aggregation: roster received');
    o.onStep?.('roster');
    const shares = me.shareKeys(roster);
    const fwd = asForwarded(await call('ShareKeys', { json: toJson({ sealed: shares.sealed }) }));
    o.onStep?.('keys-shared');
    const masked = me.maskedInput(fwd, vector);
    const y = masked.y;
    let reply = '';
    for (let at = 0; at < y.length; at += SECAGG_PIECE_WORDS) {
      const words = y.subarray(at, Math.min(y.length, at + SECAGG_PIECE_WORDS));
      const piece = Buffer.alloc(words.length * 4);
      for (let i = 0; i < words.length; i++) piece.writeUInt32LE(words[i]!, 4 * i);
      reply = await call('MaskedInput', { vector: piece, vectorOffset: at });
    }
    const req = asUnmaskRequest(reply);
    o.log.info({ round: o.round, survivors: req.survivors.length }, 'secure aggregation: masked input sent, unmask request received');
    o.onStep?.('masked-sent');
    const un = me.unmask(req);
    parseWire(DoneWire, await call('Unmask', { json: toJson({ selfMaskShares: un.selfMaskShares, keyShares: un.keyShares }) }), 'secure aggregation done');
    const out = { bytesSent, survivors: req.survivors.length, seconds: (Date.now() - t0) / 1000 };
    o.log.info({ round: o.round, ...out, weight }, 'secure aggregation: done');
    o.onStep?.('done');
    return out;
}
