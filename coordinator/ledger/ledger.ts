/**
 * The contribution ledger: one signed, hash-chained entry per accepted update (see chain.ts for the
 * format), appended from the coordinator's outbox (coordinator/events/outbox.ts), where the entry was committed
 * with the update itself; the outbox retries until the append succeeds. Two back ends:
 *   - a local append-only JSONL file (`ledger.jsonl` in the coordinator dir), fsync'd after every entry;
 *   - a JetStream stream per federation when NATS is configured (stream sequence = ledger sequence,
 *     each publish expects the previous sequence, so no entry can be slotted in between).
 * Appends are serialised; a failed append is retried by the outbox (the ledger never blocks or fails a round).
 * An update already in the ledger (same round, site and hash: an append retried after a lost ack or a crash)
 * is not recorded twice; on JetStream the message id (Nats-Msg-Id) says the same to the server.
 */
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, open } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { KeyObject } from 'node:crypto';
import { connect, StringCodec, type JetStreamClient, type JetStreamManager, type NatsConnection } from 'nats';
import type { FederationEvent } from '../../shared/events/bus.ts';
import { signManifest } from '../../shared/security/site-identity.ts';
import type { Logger } from '../../shared/util/log.ts';
import { LedgerEntrySchema, canonicalJson, entryHash, genesisHash, signedBytes, type LedgerEntry, type LedgerRecord } from './chain.ts';

export const LEDGER_FILE = 'ledger.jsonl';

export interface LedgerBackend {
  describe(): string;
  /** Every stored line, in order (a removed JetStream message reads as an empty line). */
  load(): Promise<string[]>;
  /** `msgId` is stable per record, so a back end that deduplicates (JetStream) can refuse a second copy. */
  append(line: string, seq: number, msgId: string): Promise<void>;
  close(): Promise<void>;
}

export class FileLedgerBackend implements LedgerBackend {
  constructor(readonly path: string) {}

  describe(): string {
    return `file ${this.path}`;
  }

  async load(): Promise<string[]> {
    return readLedgerFile(this.path);
  }

  /** On the thread pool: a synchronous fsync per entry held the event loop (and every site call) for its duration. */
  async append(line: string): Promise<void> {
    await mkdir(dirname(this.path), { recursive: true });
    const file = await open(this.path, 'a', 0o644);
    try {
      await file.appendFile(line + '\n');
      await file.sync();
    } finally {
      await file.close();
    }
  }

  async close(): Promise<void> {}
}

export function readLedgerFile(path: string): string[] {
  if (!existsSync(path)) return [];
  const text = readFileSync(path, 'utf8');
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  return lines;
}

/** Stream and subject for one federation's ledger (names allow only [A-Za-z0-9_-]). */
export function ledgerStreamNames(federation: string): { stream: string; subject: string } {
  const safe = federation.replace(/[^A-Za-z0-9_-]/g, '_');
  return { stream: `MEDFL_LEDGER_${safe}`, subject: `medfl-ledger.${safe}` };
}

export class JetStreamLedgerBackend implements LedgerBackend {
  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly url: string,
    private readonly stream: string,
    private readonly subject: string,
  ) {}

  static async connect(url: string, federation: string): Promise<JetStreamLedgerBackend> {
    let nc: NatsConnection;
    try {
      nc = await connect({ servers: url, name: 'medfl-ledger', reconnect: true, maxReconnectAttempts: -1, reconnectTimeWait: 500, timeout: 5000 });
    } catch (e) {
      throw new Error(`cannot reach NATS at ${url} for the contribution ledger: ${(e as Error).message}. Start nats-server with -js, or leave out --nats to keep the ledger in a local file.`);
    }
    const { stream, subject } = ledgerStreamNames(federation);
    try {
      const jsm = await nc.jetstreamManager({ timeout: 3000 });
      try {
        await jsm.streams.info(stream);
      } catch {
        await jsm.streams.add({ name: stream, subjects: [subject] });
      }
      return new JetStreamLedgerBackend(nc, nc.jetstream(), jsm, url, stream, subject);
    } catch (e) {
      await nc.close().catch(() => undefined);
      throw new Error(`NATS at ${url} has no JetStream, which the contribution ledger needs (${(e as Error).message}); start nats-server with -js.`);
    }
  }

  describe(): string {
    return `${this.url} (JetStream stream ${this.stream})`;
  }

  async load(): Promise<string[]> {
    const info = await this.jsm.streams.info(this.stream);
    const lines: string[] = [];
    const sc = StringCodec();
    for (let seq = 1; seq <= info.state.last_seq; seq++) {
      try {
        const m = await this.jsm.streams.getMessage(this.stream, { seq });
        lines.push(sc.decode(m.data));
      } catch {
        lines.push(''); // removed from the stream: verification reports the gap
      }
    }
    return lines;
  }

  async append(line: string, seq: number, msgId: string): Promise<void> {
    const ack = await this.js.publish(this.subject, StringCodec().encode(line), { msgID: msgId, expect: { lastSequence: seq - 1 }, timeout: 5000 });
    // An earlier try landed although its ack was lost: the caller re-reads the stream instead of moving its head on.
    if (ack.duplicate) throw new Error(`already stored at seq ${ack.seq} (duplicate message id ${msgId})`);
  }

  async close(): Promise<void> {
    try {
      await this.nc.drain();
    } catch {
      await this.nc.close().catch(() => undefined);
    }
  }
}

export class ContributionLedger {
  private head: { seq: number; hash: string };
  private readonly recorded = new Set<string>();
  private chain: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly backend: LedgerBackend,
    private readonly federation: string,
    private readonly signingKey: KeyObject,
    private readonly log: Logger | undefined,
    existing: LedgerEntry[],
  ) {
    const last = existing.at(-1);
    this.head = { seq: last?.seq ?? 0, hash: last?.hash ?? genesisHash(federation) };
    for (const e of existing) this.recorded.add(key(e));
  }

  /** Opens the ledger and continues from its last entry. A ledger whose tail cannot be parsed is refused. */
  static async open(backend: LedgerBackend, o: { federation: string; signingKey: KeyObject; log?: Logger }): Promise<ContributionLedger> {
    const lines = await backend.load();
    const entries: LedgerEntry[] = [];
    lines.forEach((l, i) => {
      const r = LedgerEntrySchema.safeParse(safeJson(l));
      if (r.success) entries.push(r.data);
      else if (i === lines.length - 1) {
        throw new Error(`the last line of the contribution ledger (${backend.describe()}) is not a valid entry; run \`medfl audit verify\` to see what is wrong and restore the ledger from a backup before starting`);
      }
    });
    return new ContributionLedger(backend, o.federation, o.signingKey, o.log, entries);
  }

  describe(): string {
    return this.backend.describe();
  }

  get headSeq(): number {
    return this.head.seq;
  }

  /** Appends one record (serialised with every other append). Resolves to the entry, or undefined if it was already there. */
  append(r: LedgerRecord): Promise<LedgerEntry | undefined> {
    const next = this.chain.then(async () => {
      if (this.recorded.has(key(r))) return undefined;
      const body = {
        v: 1 as const,
        seq: this.head.seq + 1,
        federation: this.federation,
        at: new Date().toISOString(),
        round: r.round,
        site: r.site,
        updateHash: r.updateHash,
        samples: r.samples,
        strategy: r.strategy,
        ...(r.metrics && Object.keys(r.metrics).length > 0 ? { metrics: r.metrics } : {}),
        ...(r.rollback ? { rollback: r.rollback } : {}),
        prev: this.head.hash,
      };
      const hash = entryHash(body);
      const entry: LedgerEntry = { ...body, hash, sig: signManifest(this.signingKey, signedBytes(hash)).toString('base64') };
      try {
        await this.backend.append(canonicalJson(entry), entry.seq, `${this.federation}:ledger:${key(r).replaceAll('\u0000', ':')}`);
      } catch (e) {
        // The write may have landed although it reported failure (e.g. a JetStream ack that timed out):
        // take the head from what is stored, so the next append links to it instead of failing forever.
        await this.resync().catch(() => undefined);
        if (this.recorded.has(key(entry))) return entry;
        throw e;
      }
      this.head = { seq: entry.seq, hash };
      this.recorded.add(key(entry));
      return entry;
    });
    this.chain = next.catch(() => undefined);
    return next;
  }

  private async resync(): Promise<void> {
    const entries = (await this.backend.load()).map((l) => LedgerEntrySchema.safeParse(safeJson(l))).filter((r) => r.success).map((r) => r.data!);
    const last = entries.at(-1);
    this.head = { seq: last?.seq ?? 0, hash: last?.hash ?? genesisHash(this.federation) };
    for (const e of entries) this.recorded.add(key(e));
  }

  /** Stored lines from sequence number `fromSeq` (1-based) on. */
  async lines(fromSeq = 1): Promise<string[]> {
    await this.chain;
    const all = await this.backend.load();
    return all.slice(Math.max(0, fromSeq - 1));
  }

  /** Waits (at most `waitMs`) for appends in flight, then closes the back end (also at most `waitMs`). */
  async close(waitMs = 5000): Promise<void> {
    const within = (p: Promise<unknown>) => Promise.race([p, new Promise((r) => setTimeout(r, waitMs).unref())]);
    await within(this.chain);
    await within(this.backend.close().catch(() => undefined));
  }
}

/**
 * The ledger record of an `update.accepted` or `model.rolled_back` event, or undefined for any other event. Numeric
 * fields of an update event other than the round and sample count (e.g. an update norm) go into `metrics`.
 * Throws for such an event without the fields an entry needs (it can never be recorded).
 */
export function ledgerRecordFor(e: FederationEvent, strategy: string): LedgerRecord | undefined {
  if (e.type === 'model.rolled_back') {
    const { round, fromModel, toModel, failedRound, rollbackId } = e as FederationEvent & Record<string, unknown>;
    if (typeof round !== 'number' || typeof fromModel !== 'string' || typeof toModel !== 'string' || typeof rollbackId !== 'string') {
      throw new Error('model.rolled_back event without round, fromModel, toModel and rollbackId');
    }
    const rollback = { id: rollbackId, fromModel, toModel, failedRound: typeof failedRound === 'number' ? failedRound : null };
    return { round, site: '', samples: 0, updateHash: toModel, strategy: 'rollback', rollback };
  }
  if (e.type !== 'update.accepted') return undefined;
  const { round, site, samples, updateHash } = e as FederationEvent & { samples?: unknown; updateHash?: unknown };
  if (typeof round !== 'number' || typeof site !== 'string' || typeof updateHash !== 'string' || typeof samples !== 'number') {
    throw new Error('update.accepted event without round, site, samples and updateHash');
  }
  const metrics: Record<string, number> = {};
  for (const [k, v] of Object.entries(e)) {
    if (!['round', 'samples'].includes(k) && typeof v === 'number' && Number.isFinite(v)) metrics[k] = v;
  }
  return { round, site, samples, updateHash, strategy, metrics };
}

function key(r: { round: number; site: string; updateHash: string; rollback?: { id: string } }): string {
  if (r.rollback) return `rollback\u0000${r.rollback.id}`;
  return `${r.round}\u0000${r.site}\u0000${r.updateHash}`;
}

function safeJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}
