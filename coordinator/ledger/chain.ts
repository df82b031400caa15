/**
 * The contribution ledger's entry format and its verification, shared by the coordinator (which writes),
 * `medfl audit verify` (which re-checks a coordinator's ledger) and `medfl site ledger` (a site checking
 * what was recorded for it).
 *
 * Each entry is canonical JSON (keys sorted) of
 *   { v, seq, federation, at, round, site, updateHash, samples, strategy, metrics?, prev, hash, sig }
 * (and, for an operator's rollback, `rollback`: { id, fromModel, toModel, failedRound }, with site "", samples 0,
 * updateHash = the model returned to and round = the round that produced it)
 * where `prev` is the previous entry's `hash` (the first entry's is the federation's genesis hash),
 * `hash` = SHA-256 of the canonical JSON of every other field, and `sig` = the coordinator's Ed25519
 * signature (the key sites pin at enrolment and check tasks with) over "medfl.v1.ledger:" + hash.
 *
 * What this detects: a changed value (hash), a removed / reordered / duplicated entry (seq and prev),
 * and any entry added or rewritten by someone without the coordinator's signing key (sig) — a plain
 * hash chain alone could be recomputed by whoever can edit the file. What it cannot detect by itself:
 * the newest entries cut off the end. Against that a reader compares with a head (seq, hash) it saw
 * earlier (`--expect-head`; `medfl site ledger` remembers the last head it verified).
 */
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { verifyManifest } from '../../shared/security/site-identity.ts';

export const LEDGER_VERSION = 1;

export const LedgerEntrySchema = z
  .object({
    v: z.literal(LEDGER_VERSION),
    seq: z.number().int().positive(),
    federation: z.string(),
    at: z.string(),
    round: z.number().int().min(0),
    site: z.string(),
    updateHash: z.string().regex(/^[0-9a-f]{64}$/),
    samples: z.number().int().min(0),
    strategy: z.string(),
    metrics: z.record(z.string(), z.number()).optional(),
    rollback: z
      .object({ id: z.string(), fromModel: z.string().regex(/^[0-9a-f]{64}$/), toModel: z.string().regex(/^[0-9a-f]{64}$/), failedRound: z.number().int().positive().nullable() })
      .strict()
      .optional(),
    prev: z.string().regex(/^[0-9a-f]{64}$/),
    hash: z.string().regex(/^[0-9a-f]{64}$/),
    sig: z.string(),
  })
  .strict();

export type LedgerEntry = z.infer<typeof LedgerEntrySchema>;

/** What the coordinator records per accepted update. */
export interface LedgerRecord {
  round: number;
  site: string;
  updateHash: string;
  samples: number;
  strategy: string;
  metrics?: Record<string, number>;
  /** An operator's rollback (`medfl coordinator rollback`) rather than a contribution. */
  rollback?: { id: string; fromModel: string; toModel: string; failedRound: number | null };
}

/** JSON with object keys sorted at every level: one byte string per value, whoever serialises it. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    if (typeof value === 'number' && !Number.isFinite(value)) throw new Error(`cannot put ${value} in the ledger (JSON has no non-finite numbers)`);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const obj = value as Record<string, unknown>;
  const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
}

export function genesisHash(federation: string): string {
  return sha256Hex(`medfl.v1.ledger.genesis:${federation}`);
}

export function entryHash(e: Omit<LedgerEntry, 'hash' | 'sig'>): string {
  return sha256Hex(canonicalJson(e));
}

export function signedBytes(hash: string): Buffer {
  return Buffer.from(`medfl.v1.ledger:${hash}`, 'utf8');
}

function sha256Hex(s: string): string {
  return createHash('sha256').update(s, 'utf8').digest('hex');
}

export interface ChainProblem {
  /** 1-based position of the line in what was read. */
  line: number;
  seq?: number;
  problem: string;
}

export interface ChainReport {
  ok: boolean;
  entries: LedgerEntry[];
  problems: ChainProblem[];
  head: { seq: number; hash: string };
}

/**
 * Re-checks a ledger given as its lines (JSON text, in stored order). Every problem is reported, not
 * only the first, so a reader sees exactly which entries are in doubt.
 */
export function verifyChain(
  lines: readonly string[],
  opts: { coordinatorPublicKey: Uint8Array; federation?: string; expectHead?: { seq: number; hash: string } },
): ChainReport {
  const problems: ChainProblem[] = [];
  const entries: LedgerEntry[] = [];
  let prevHash: string | undefined = opts.federation !== undefined ? genesisHash(opts.federation) : undefined;
  let expectSeq = 1;
  let federation = opts.federation;
  lines.forEach((text, i) => {
    const line = i + 1;
    if (text.trim() === '') {
      problems.push({ line, problem: 'empty line inside the ledger' });
      return;
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (e) {
      problems.push({ line, problem: `not JSON (${(e as Error).message})` });
      return;
    }
    const parsed = LedgerEntrySchema.safeParse(raw);
    if (!parsed.success) {
      problems.push({ line, problem: `not a ledger entry (${parsed.error.issues.map((x) => `${x.path.join('.') || '(top)'}: ${x.message}`).join('; ')})` });
      return;
    }
    const e = parsed.data;
    if (federation === undefined) {
      federation = e.federation;
      prevHash = genesisHash(federation);
    }
    const { hash, sig, ...body } = e;
    const recomputed = entryHash(body);
    if (e.federation !== federation) problems.push({ line, seq: e.seq, problem: `entry names federation ${e.federation}, the ledger is ${federation}'s` });
    if (e.seq !== expectSeq) problems.push({ line, seq: e.seq, problem: `sequence number ${e.seq} where ${expectSeq} was expected (an entry was removed, reordered or duplicated)` });
    if (recomputed !== hash) problems.push({ line, seq: e.seq, problem: `contents do not hash to the recorded hash (the entry was changed after it was written)` });
    if (e.prev !== prevHash) problems.push({ line, seq: e.seq, problem: `does not link to the entry before it (prev ${e.prev.slice(0, 12)}…, expected ${prevHash?.slice(0, 12)}…)` });
    if (!verifyManifest(opts.coordinatorPublicKey, signedBytes(hash), Buffer.from(sig, 'base64'))) {
      problems.push({ line, seq: e.seq, problem: `signature does not verify against the coordinator's key (written or rewritten by someone else)` });
    }
    entries.push(e);
    prevHash = hash;
    expectSeq = e.seq + 1;
  });
  const last = entries.at(-1);
  const head = { seq: last?.seq ?? 0, hash: last?.hash ?? (federation !== undefined ? genesisHash(federation) : '') };
  if (opts.expectHead && opts.expectHead.seq > 0) {
    const seen = entries.find((x) => x.seq === opts.expectHead!.seq);
    if (!seen) problems.push({ line: lines.length, seq: opts.expectHead.seq, problem: `the ledger ends at seq ${head.seq}, before the head ${opts.expectHead.seq} seen earlier (entries were cut off the end)` });
    else if (seen.hash !== opts.expectHead.hash) problems.push({ line: entries.indexOf(seen) + 1, seq: seen.seq, problem: `entry ${seen.seq} differs from the one seen earlier (history was rewritten)` });
  }
  return { ok: problems.length === 0, entries, problems, head };
}
