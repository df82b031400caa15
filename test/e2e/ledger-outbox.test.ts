/**
 * The contribution record has no silent gaps (coordinator/events/outbox.ts): real coordinator and site processes,
 * a real nats-server. NATS killed and restarted during rounds, and a coordinator SIGKILLed after committing an update
 * whose ledger entry was not yet appended: afterwards every accepted update has exactly one ledger entry, every event
 * is in the JetStream stream once (by id), and `medfl audit verify` passes — after failing while the entry was missing.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { mkdirSync, mkdtempSync, renameSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, JSONCodec, type NatsConnection } from 'nats';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';
import { waitFor } from '../../cli/processes.ts';
import { auditVerify } from '../../cli/audit.ts';
import { readLedgerFile, LEDGER_FILE } from '../../coordinator/ledger/ledger.ts';
import { EVENT_STREAM } from '../../coordinator/events/nats-bus.ts';
import type { CoordinatorStore } from '../../coordinator/store/store.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';

let fed: TestFederation | undefined;
let nats: NatsServer | undefined;
let nc: NatsConnection | undefined;

afterEach(async () => {
  fed?.killAll();
  fed = undefined;
  await nc?.close().catch(() => undefined);
  nc = undefined;
  await nats?.stop();
  nats = undefined;
});

const pending = (store: CoordinatorStore) => store.pendingOutbox('ledger').length + store.pendingOutbox('event').length;

/** Every event kept in the MEDFL_EVENTS stream, in order. */
async function streamEvents(conn: NatsConnection): Promise<FederationEvent[]> {
  const jsm = await conn.jetstreamManager();
  const info = await jsm.streams.info(EVENT_STREAM);
  const codec = JSONCodec<FederationEvent>();
  const out: FederationEvent[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq; seq++) out.push(codec.decode((await jsm.streams.getMessage(EVENT_STREAM, { seq })).data));
  return out;
}

describe('NATS killed and restarted during rounds', () => {
  it('loses no ledger entry and no event, publishes each once, and audit verify --nats passes', async () => {
    const storeDir = mkdtempSync(join(tmpdir(), 'medfl-nats-store-'));
    nats = await startNats({ jetstream: true, storeDir });
    const { port, url } = nats;
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 4, minSites: 2, steps: 2, gather: 2 }) });
    const federation = fed.home.config().federationId;
    await fed.startCoordinator(['--nats', url]);
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed!.startSite(s));
    const store = fed.store();
    await waitFor(() => store.closedRoundCount() >= 1, 120_000, 'round 1 to close');

    await nats.stop();
    const updatesAtKill = store.acceptedUpdates().length;
    const closedAtKill = store.closedRoundCount();
    // The outage lasts until updates were accepted and a round closed without NATS (what used to be lost).
    await waitFor(() => store.closedRoundCount() > closedAtKill && store.acceptedUpdates().length > updatesAtKill, 120_000, 'a round to close while NATS is down');
    expect(pending(store)).toBeGreaterThan(0);

    nats = await startNats({ jetstream: true, storeDir, port });
    expect(await Promise.all(agents.map((p) => exited(p, 180_000)))).toEqual([0, 0]);
    await waitFor(() => pending(store) === 0, 60_000, 'the outbox to be published after NATS returned');

    const updates = store.acceptedUpdates();
    expect(store.closedRoundCount()).toBe(4);
    expect(updates.length).toBe(8);
    // Every event the coordinator committed is in the stream, exactly once, by its id.
    nc = await connect({ servers: url });
    const kept = await streamEvents(nc);
    const ids = kept.map((e) => e.id);
    expect(ids.every((id) => typeof id === 'string')).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    const committed = store.listOutbox('event').map((r) => r.id);
    expect(committed.filter((id) => !ids.includes(id))).toEqual([]);
    for (const u of updates) expect(ids).toContain(`${federation}:update.accepted:${u.round}:${u.site}`);
    for (const r of store.listRounds()) expect(ids).toContain(`${federation}:round.${r.state === 'closed' ? 'closed' : 'failed'}:${r.round}`);
    expect(kept.filter((e) => e.type === 'round.closed').length).toBe(4);

    const verified = await auditVerify({ dir: fed.coordDir, nats: url });
    expect(verified.text).toMatch(/ledger OK: 8 entries/);
    expect(verified.text).toMatch(/completeness OK: each of the 8 accepted update\(s\)/);
    expect(verified.ok).toBe(true);
    store.close();
  }, 420_000);
});

describe('coordinator killed between the store commit and the ledger append', () => {
  it('back-fills the entry at its next start; verify fails before and passes after', async () => {
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 2, minSites: 2, steps: 2, gather: 2 }) });
    let coordinator = await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed!.startSite(s));
    const store = fed.store();
    const ledgerPath = join(fed.coordDir, LEDGER_FILE);
    await waitFor(() => store.closedRoundCount() >= 1 && readLedgerFile(ledgerPath).length === 2, 120_000, 'round 1 to close with two entries');

    // The ledger file turns into a directory: every append fails from here on, while the store goes on committing.
    renameSync(ledgerPath, `${ledgerPath}.aside`);
    mkdirSync(ledgerPath);
    await waitFor(() => store.updatesForRound(2).length >= 1 && store.pendingOutbox('ledger').length >= 1, 120_000, 'an update of round 2 committed but not appended');
    coordinator.kill('SIGKILL');
    await exited(coordinator);
    rmdirSync(ledgerPath);
    renameSync(`${ledgerPath}.aside`, ledgerPath);

    const accepted = store.acceptedUpdates().length;
    expect(readLedgerFile(ledgerPath).length).toBeLessThan(accepted);
    const gap = await auditVerify({ dir: fed.coordDir });
    expect(gap.ok).toBe(false);
    expect(gap.text).toMatch(/ledger OK/); // the chain alone sees nothing wrong
    expect(gap.text).toMatch(/round 2, site site-[ab]: accepted update [0-9a-f]{12}… is not in the ledger yet: its entry waits in the coordinator's outbox/);

    coordinator = await fed.startCoordinator();
    expect(await Promise.all(agents.map((p) => exited(p, 180_000)))).toEqual([0, 0]);
    await waitFor(() => pending(store) === 0, 60_000, 'the outbox to be published');
    expect(store.acceptedUpdates().length).toBe(4);
    const lines = readLedgerFile(ledgerPath);
    expect(lines).toHaveLength(4);
    const keys = lines.map((l) => JSON.parse(l) as { round: number; site: string }).map((e) => `${e.round}/${e.site}`).sort();
    expect(keys).toEqual(store.acceptedUpdates().map((u) => `${u.round}/${u.site}`).sort());
    const verified = await auditVerify({ dir: fed.coordDir });
    expect(verified.text).toMatch(/completeness OK: each of the 4 accepted update\(s\)/);
    expect(verified.ok).toBe(true);
    store.close();
  }, 420_000);
});
