/**
 * What publishing an event costs the coordinator's store (coordinator/events/outbox.ts, store.ts): a published event
 * is written in a commit that does not wait for the disk, and the rows a relay delivered are marked published
 * together, one commit per batch — at 1,000 sites a commit and an fsync per event and per mark were a third of the
 * coordinator's SQLite time. What the outbox promises is unchanged: each event is in the store before it is sent,
 * sent at least once, and a row whose id is there already is kept as it was.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { pino } from 'pino';
import { describe, expect, it, vi } from 'vitest';
import { Outbox, outboxRows } from '../../coordinator/events/outbox.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';
import { waitFor } from '../../cli/processes.ts';

const FED = 'fed-outbox-commits';
const dbPath = () => join(mkdtempSync(join(tmpdir(), 'medfl-outbox-commits-')), 'state.db');
const joined = (site: string): FederationEvent => ({ type: 'site.joined', federation: FED, at: new Date().toISOString(), site });

describe('outbox commits', () => {
  it('marks the rows one relay pass delivered in one commit, not one per row', async () => {
    const store = new CoordinatorStore(dbPath());
    const marks = vi.spyOn(store, 'markOutboxPublished');
    const sent: string[] = [];
    const outbox = new Outbox({
      store,
      remote: { describe: () => 'test', send: async (e) => void sent.push(e.site ?? ''), close: async () => undefined },
      strategy: 'fedavg',
      log: pino({ level: 'silent' }),
    });
    // Published before the relay starts, as events committed by an earlier run are: one pass finds all five.
    for (const site of ['a', 'b', 'c', 'd', 'e']) outbox.publish(joined(site));
    outbox.start();
    await waitFor(() => store.pendingOutbox('event').length === 0, 10_000, 'the events to be relayed');
    expect(sent).toEqual(['a', 'b', 'c', 'd', 'e']);
    const markedIds = marks.mock.calls.flatMap(([ids]) => (typeof ids === 'string' ? [ids] : [...ids]));
    expect(markedIds).toHaveLength(5);
    expect(marks.mock.calls.filter(([ids]) => ids.length > 0)).toHaveLength(1);
    await outbox.close();
    store.close();
  });

  it('reads the events published in one turn of the event loop in one query, and leaves the ledger queue alone for events without an entry', async () => {
    const store = new CoordinatorStore(dbPath());
    const outbox = new Outbox({ store, strategy: 'fedavg', log: pino({ level: 'silent' }) });
    outbox.start();
    await waitFor(() => store.pendingOutbox('event').length === 0, 10_000, 'the start-up pass');
    await new Promise((r) => setTimeout(r, 50));
    const reads = vi.spyOn(store, 'pendingOutbox');
    for (let i = 0; i < 20; i++) outbox.publish(joined(`s${i}`));
    await waitFor(() => store.listOutbox('event').every((r) => r.publishedAt !== null), 10_000, 'the joins to be relayed');
    await new Promise((r) => setTimeout(r, 50));
    // One pass: a query that finds the 20 rows and one that finds none.
    expect(reads.mock.calls.filter(([kind]) => kind === 'event')).toHaveLength(2);
    expect(reads.mock.calls.filter(([kind]) => kind === 'ledger')).toHaveLength(0);
    await outbox.close();
    store.close();
  });

  it('keeps rows whose relay failed unmarked, and marks those delivered before the failure', async () => {
    const store = new CoordinatorStore(dbPath());
    let failAt = 'c';
    const outbox = new Outbox({
      store,
      remote: {
        describe: () => 'test',
        send: async (e) => {
          if (e.site === failAt) throw new Error('NATS is down');
        },
        close: async () => undefined,
      },
      strategy: 'fedavg',
      log: pino({ level: 'silent' }),
      retryMs: { first: 20, max: 20 },
    });
    for (const site of ['a', 'b', 'c', 'd']) outbox.publish(joined(site));
    outbox.start();
    await waitFor(() => store.pendingOutbox('event').length === 2, 10_000, 'a and b to be marked');
    expect(store.pendingOutbox('event').map((r) => JSON.parse(r.body).site)).toEqual(['c', 'd']);
    failAt = '';
    await waitFor(() => store.pendingOutbox('event').length === 0, 10_000, 'c and d once the destination is back');
    await outbox.close();
    store.close();
  });

  it('writes a published event so that another process reads it at once, and keeps a row already committed', () => {
    const path = dbPath();
    const store = new CoordinatorStore(path);
    const [row] = outboxRows({ ...joined('a'), id: `${FED}:fixed` });
    store.addOutbox([row!]);
    store.addPublishedEvent([{ ...row!, body: '{"changed":true}' }, ...outboxRows(joined('b'))]);
    const other = new Database(path, { readonly: true });
    const bodies = (other.prepare('SELECT body FROM outbox ORDER BY pos').pluck().all() as string[]).map((b) => JSON.parse(b));
    other.close();
    expect(bodies).toHaveLength(2);
    expect(bodies[0]).toMatchObject({ id: `${FED}:fixed`, site: 'a' });
    expect(bodies[1]).toMatchObject({ site: 'b' });
    // The store's ordinary commits still go on (and the relaxed one left nothing half-set).
    store.markOutboxPublished([`${FED}:fixed`]);
    expect(store.pendingOutbox('event').map((r) => r.id)).not.toContain(`${FED}:fixed`);
    store.close();
  });
});
