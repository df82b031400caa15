/**
 * The ledger against the coordinator's store, the source of truth: a chain that verifies can still lack entries
 * (an append that never happened leaves no trace in the chain). `medfl audit verify` runs this next to verifyChain:
 *   - every accepted update (store `updates`) has exactly one entry with its round, site and SHA-256;
 *   - every entry of a site names an update the store accepted;
 *   - every rollback the coordinator put in its outbox has its entry.
 * An entry not yet appended but waiting in the outbox (NATS down, coordinator stopped) is reported as pending, which
 * also fails: the ledger is not complete until the coordinator has sent it. Entries of failed rounds are valid (the
 * update was accepted) and are marked as such, since they are in no model.
 */
import type { CoordinatorStore } from '../store/store.ts';
import type { LedgerEntry } from './chain.ts';

export interface CompletenessReport {
  ok: boolean;
  problems: string[];
  /** Entries committed in the store's outbox but not yet appended. */
  pending: number;
  /** Accepted updates the store holds. */
  updates: number;
  /** What the store says about an entry, by seq (e.g. that its round failed). */
  notes: Map<number, string>;
}

export function checkCompleteness(entries: readonly LedgerEntry[], store: Pick<CoordinatorStore, 'acceptedUpdates' | 'listOutbox'>): CompletenessReport {
  const problems: string[] = [];
  const notes = new Map<number, string>();
  const siteKey = (round: number, site: string) => `${round}\u0000${site}`;
  const bySite = new Map<string, LedgerEntry[]>();
  const rollbacks = new Set<string>();
  for (const e of entries) {
    if (e.rollback) rollbacks.add(e.rollback.id);
    else bySite.set(siteKey(e.round, e.site), [...(bySite.get(siteKey(e.round, e.site)) ?? []), e]);
  }
  // What the outbox still has to append: an update's entry by round and site, a rollback's by id.
  const waiting = new Set<string>();
  const outboxRollbacks: { id: string; published: boolean }[] = [];
  for (const row of store.listOutbox('ledger')) {
    const e = JSON.parse(row.body) as { type: string; round?: number; site?: string; rollbackId?: string };
    if (e.type === 'model.rolled_back' && typeof e.rollbackId === 'string') outboxRollbacks.push({ id: e.rollbackId, published: row.publishedAt !== null });
    else if (row.publishedAt === null && typeof e.round === 'number' && typeof e.site === 'string') waiting.add(siteKey(e.round, e.site));
  }
  let pending = 0;
  const matched = new Set<LedgerEntry>();
  const updates = store.acceptedUpdates();
  for (const u of updates) {
    const k = siteKey(u.round, u.site);
    const same = (bySite.get(k) ?? []).filter((e) => e.updateHash === u.sha256);
    for (const e of same) {
      matched.add(e);
      if (u.roundState === 'failed') notes.set(e.seq, `round ${u.round} failed: this update is in no model`);
      if (u.roundState === 'open') notes.set(e.seq, `round ${u.round} still open`);
    }
    const what = `round ${u.round}, site ${u.site}: accepted update ${u.sha256.slice(0, 12)}…`;
    if (same.length > 1) problems.push(`${what} has ${same.length} entries (seq ${same.map((e) => e.seq).join(', ')}); it must have exactly one`);
    if (same.length === 0 && waiting.has(k)) {
      pending++;
      problems.push(`${what} is not in the ledger yet: its entry waits in the coordinator's outbox (appended once the coordinator runs and reaches the ledger)`);
    } else if (same.length === 0) {
      problems.push(`${what} has no ledger entry (a gap: the store accepted it, the ledger does not record it)`);
    }
  }
  for (const e of entries) {
    if (e.rollback || matched.has(e)) continue;
    problems.push(`seq ${e.seq}: round ${e.round}, site ${e.site}, update ${e.updateHash.slice(0, 12)}… is not an update the coordinator's store accepted`);
  }
  for (const r of outboxRollbacks) {
    if (rollbacks.has(r.id)) continue;
    if (!r.published) pending++;
    problems.push(r.published ? `rollback ${r.id} has no ledger entry (a gap)` : `rollback ${r.id} is not in the ledger yet: its entry waits in the coordinator's outbox`);
  }
  return { ok: problems.length === 0, problems, pending, updates: updates.length, notes };
}
