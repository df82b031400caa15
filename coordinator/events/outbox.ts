/**
 * The coordinator's outbox: the store is the source of truth, and the event stream and the contribution ledger are
 * fed from it. Every event is written into the store's `outbox` table first — an event that records a state change
 * (update accepted, round started / closed / failed, rollback) in the SAME transaction as that change, through the
 * store method that makes it — and then sent at least once:
 *   - `event` rows to NATS (JetStream deduplicates by the event's stable id, sent as Nats-Msg-Id);
 *   - `ledger` rows (update.accepted, model.rolled_back) to the contribution ledger, which skips a record it holds.
 * A row is marked published once its destination acknowledged it. Whatever is still unpublished is sent at start-up
 * (a coordinator killed between its commit and the send), when NATS reconnects, and otherwise with backoff, in
 * commit order per destination. Listeners in this process get each event at once, as before.
 */
import { randomUUID } from 'node:crypto';
import type { CoordinatorStore, OutboxRow, StoredOutboxRow } from '../store/store.ts';
import type { EventBus, FederationEvent, FederationEventType } from '../../shared/events/bus.ts';
import type { Logger } from '../../shared/util/log.ts';
import { ledgerRecordFor, type ContributionLedger } from '../ledger/ledger.ts';

/** Events that become a contribution-ledger entry. */
const LEDGER_EVENTS: ReadonlySet<FederationEventType> = new Set(['update.accepted', 'model.rolled_back']);

/**
 * The id of an event: the same fact always gets the same id (an update is accepted once per round and site, a round
 * closes or fails once), so writing it again — by the engine after the store method already did — changes nothing,
 * and a copy sent again is dropped by JetStream. Events that record no stored fact get a random id.
 */
export function eventId(federation: string, type: FederationEventType, fields: Record<string, unknown>): string {
  const { round, site, rollbackId, rounds } = fields;
  const known = (...parts: unknown[]) => parts.every((p) => typeof p === 'number' || (typeof p === 'string' && p !== ''));
  switch (type) {
    case 'update.accepted':
      if (known(round, site)) return `${federation}:${type}:${round}:${site}`;
      break;
    case 'round.started':
    case 'round.closed':
    case 'round.failed':
    case 'teacher.promoted':
      if (known(round)) return `${federation}:${type}:${round}`;
      break;
    case 'model.rolled_back':
      if (known(rollbackId)) return `${federation}:${type}:${rollbackId}`;
      break;
    case 'federation.finished':
    case 'privacy.budget_exhausted':
      if (known(rounds)) return `${federation}:${type}:${rounds}`;
      break;
  }
  return `${federation}:${type}:${randomUUID()}`;
}

/** The event with its id (kept when it has one). */
export function withEventId(event: FederationEvent): FederationEvent & { id: string } {
  return event.id ? (event as FederationEvent & { id: string }) : { ...event, id: eventId(event.federation, event.type, event) };
}

/** The outbox rows for events: one to send on the bus each, and one for the ledger where the event is a contribution or rollback. */
export function outboxRows(...events: readonly (FederationEvent | undefined)[]): OutboxRow[] {
  const rows: OutboxRow[] = [];
  for (const e of events) {
    if (!e) continue;
    const event = withEventId(e);
    const body = JSON.stringify(event);
    rows.push({ id: event.id, kind: 'event', body });
    if (LEDGER_EVENTS.has(event.type)) rows.push({ id: `ledger:${event.id}`, kind: 'ledger', body });
  }
  return rows;
}

/** Where events go beyond this process (NatsBus). */
export interface RemoteEvents {
  describe(): string;
  /** Resolves once the destination has the event (JetStream: stored, or dropped as a copy of its id). */
  send(event: FederationEvent): Promise<void>;
  /** Called each time the connection comes back. */
  onReconnect?(listener: () => void): void;
  close(): Promise<void>;
}

export interface OutboxOptions {
  store: CoordinatorStore;
  /** NATS; without it event rows have nowhere to go beyond this process and are marked published at once. */
  remote?: RemoteEvents;
  ledger?: ContributionLedger;
  /** The plan's aggregation as the ledger names it (ledger/index.ts strategyName). */
  strategy: string;
  log: Logger;
  /** Backoff between tries while a destination is down (default 500 ms doubling to 10 s). */
  retryMs?: { first: number; max: number };
}

interface Queue {
  kind: OutboxRow['kind'];
  running: Promise<void> | undefined;
  /** A pass is scheduled but has not read the store yet: it will see anything committed meanwhile. */
  scheduled: boolean;
  again: boolean;
  timer: NodeJS.Timeout | undefined;
  delayMs: number;
  /** Rows delivered since the destination last failed (for the "caught up" log line). */
  backlog: number;
}

/** The coordinator's event bus: events go into the outbox, reach this process's listeners, and are relayed from there. */
export class Outbox implements EventBus {
  private readonly handlers = new Set<(e: FederationEvent) => void>();
  private readonly queues: Queue[] = (['ledger', 'event'] as const).map((kind) => ({ kind, running: undefined, scheduled: false, again: false, timer: undefined, delayMs: 0, backlog: 0 }));
  private closed = false;
  private started = false;

  constructor(private readonly o: OutboxOptions) {
    // The ledger's JetStream connection comes back about when this one does; backoff covers the rest.
    o.remote?.onReconnect?.(() => this.retryNow());
  }

  describe(): string {
    return this.o.remote?.describe() ?? 'in-process';
  }

  /** Sends what an earlier run left unpublished (back-fill), then keeps relaying. */
  start(): void {
    this.started = true;
    const pending = Object.fromEntries(this.queues.map((q) => [q.kind, this.o.store.pendingOutbox(q.kind, 10_000).length]));
    if (pending.ledger || pending.event) this.o.log.info({ pending }, 'outbox: sending what an earlier run committed but did not publish');
    this.retryNow();
  }

  publish(event: FederationEvent): void {
    const e = withEventId(event);
    try {
      // A no-op for an event its state change already committed (same id); not fsync'd on its own (store.ts).
      this.o.store.addPublishedEvent(outboxRows(e));
    } catch (err) {
      this.o.log.error({ type: e.type, id: e.id, err: (err as Error).message }, 'could not keep an event in the outbox; it reaches this process only');
    }
    for (const h of this.handlers) {
      try {
        h(e);
      } catch {
        // A faulty listener must not break the round that published.
      }
    }
    // Only the queues the event has a row in; a destination waiting out its backoff is left to its timer.
    for (const q of this.queues) if (!q.timer && (q.kind === 'event' || LEDGER_EVENTS.has(e.type))) this.run(q);
  }

  subscribe(handler: (event: FederationEvent) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  /** Stops relaying; waits (at most `waitMs`) for sends in flight. Unpublished rows stay for the next start. */
  async close(waitMs = 5000): Promise<void> {
    this.closed = true;
    this.handlers.clear();
    for (const q of this.queues) if (q.timer) clearTimeout(q.timer);
    await Promise.race([Promise.all(this.queues.map((q) => q.running)), new Promise((r) => setTimeout(r, waitMs).unref())]);
  }

  /** Tries now instead of at the end of the backoff (start-up, NATS is back). */
  private retryNow(kind?: OutboxRow['kind']): void {
    for (const q of this.queues) {
      if (kind && q.kind !== kind) continue;
      if (q.timer) clearTimeout(q.timer);
      q.timer = undefined;
      q.delayMs = 0;
      this.run(q);
    }
  }

  private run(q: Queue): void {
    if (this.closed || !this.started) return;
    if (q.running) {
      if (!q.scheduled) q.again = true;
      return;
    }
    q.again = false;
    q.scheduled = true;
    // One turn of the event loop later: the events published meanwhile (a round's joins, accepted updates) are then
    // read and marked in one pass instead of a query and a commit each.
    q.running = new Promise<void>((r) => setImmediate(r))
      .then(() => {
        q.scheduled = false;
        return this.drain(q);
      })
      .finally(() => {
        q.running = undefined;
        if (q.again && !q.timer) this.run(q);
      });
  }

  private async drain(q: Queue): Promise<void> {
    let row: StoredOutboxRow | undefined;
    // Rows delivered but not yet marked: marked together, one commit per batch instead of one per row.
    const delivered: string[] = [];
    const mark = () => this.o.store.markOutboxPublished(delivered.splice(0));
    try {
      for (;;) {
        const rows = this.o.store.pendingOutbox(q.kind);
        if (rows.length === 0) break;
        for (row of rows) {
          if (this.closed) return mark();
          await this.deliver(row);
          delivered.push(row.id);
          q.backlog++;
        }
        mark();
      }
    } catch (e) {
      try {
        mark();
      } catch {
        // Those rows stay unpublished and are sent again: their destination drops the copies.
      }
      this.failed(q, row, e as Error);
      return;
    }
    if (q.delayMs > 0) this.o.log.info({ kind: q.kind, delivered: q.backlog }, 'outbox caught up: everything committed is published');
    q.delayMs = 0;
    q.backlog = 0;
  }

  private async deliver(row: StoredOutboxRow): Promise<void> {
    const event = JSON.parse(row.body) as FederationEvent;
    if (row.kind === 'event') {
      await this.o.remote?.send(event);
      return;
    }
    if (!this.o.ledger) return;
    let record;
    try {
      record = ledgerRecordFor(event, this.o.strategy);
    } catch (e) {
      // Can never become an entry: said loudly, and not retried forever (`medfl audit verify` reports the update).
      this.o.log.error({ id: row.id, reason: (e as Error).message }, 'outbox row cannot become a ledger entry');
      return;
    }
    if (record) await this.o.ledger.append(record);
  }

  private failed(q: Queue, row: StoredOutboxRow | undefined, e: Error): void {
    const first = q.delayMs === 0;
    const { first: min, max } = this.o.retryMs ?? { first: 500, max: 10_000 };
    q.delayMs = first ? min : Math.min(max, q.delayMs * 2);
    q.backlog = 0;
    const fields = { kind: q.kind, id: row?.id, reason: e.message, retryInMs: q.delayMs, destination: q.kind === 'ledger' ? this.o.ledger?.describe() : this.describe() };
    // Once per outage at warn; the rows wait in the store, so nothing is lost meanwhile.
    if (first) this.o.log.warn(fields, 'outbox: destination unavailable; committed rows wait and are sent again');
    else this.o.log.debug(fields, 'outbox: destination still unavailable');
    if (this.closed) return;
    q.timer = setTimeout(() => {
      q.timer = undefined;
      this.run(q);
    }, q.delayMs);
    q.timer.unref();
  }
}
