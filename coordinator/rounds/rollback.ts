/**
 * `medfl coordinator rollback --dir DIR --to VERSION`: the operator returns the federation to an earlier model
 * version (after a poisoned or broken aggregate was published). It works on the shared SQLite state, like
 * `site revoke`, so it needs no restart:
 *
 *   one transaction: current_model = the chosen version; the open round (if any) failed with a note; the
 *   aggregation state (server-optimiser moments, recent norms) and a teacher promoted after that version dropped,
 *   since both came from the models being abandoned; the rollback queued under ROLLBACK_PENDING_KEY.
 *
 * The coordinator process (running now, or at its next start) takes the queued record, drops its open round,
 * publishes `model.rolled_back` on its event bus and the contribution ledger records it: one writer for both.
 * Privacy spent in the abandoned rounds stays spent (the DP accountant is not rolled back), and closed rounds
 * still count towards plan.rounds.
 */
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import type { CoordinatorStore, ModelRow, OutboxRow } from '../store/store.ts';
import { SHA256_HEX } from '../../shared/util/hash.ts';
import { parseTeacher, TEACHER_KEY } from './teacher.ts';

export const ROLLBACK_PENDING_KEY = 'rollback_pending';
/** Store meta key of the aggregation state (aggregation-state.ts writes it; not imported from there to keep this module light). */
const AGGREGATION_STATE_KEY = 'aggregation_state';

export const RollbackRecordSchema = z
  .object({
    id: z.string().uuid(),
    fromModel: z.string().regex(SHA256_HEX),
    toModel: z.string().regex(SHA256_HEX),
    /** The round whose result `toModel` is (0 = the initial model). */
    toRound: z.number().int().min(0),
    /** The round that was open and has been failed, if any. */
    failedRound: z.number().int().positive().nullable(),
    requestedAt: z.string(),
    reason: z.string().max(500),
  })
  .strict();
export type RollbackRecord = z.infer<typeof RollbackRecordSchema>;

export class RollbackError extends Error {
  override name = 'RollbackError';
}

/**
 * The global model version `to` names: a round number (its result; 0 = the initial model), or a model hash
 * (full, or a prefix of at least 8 hex digits that names exactly one version).
 */
export function resolveVersion(store: CoordinatorStore, to: string): ModelRow {
  const text = to.trim();
  const versions = globalVersions(store);
  if (/^\d{1,9}$/.test(text)) {
    const round = Number(text);
    const hash = round === 0 ? versions.find((m) => m.round === 0)?.hash : store.getRound(round)?.resultModelHash;
    const row = hash ? store.getModel(hash) : undefined;
    if (!row) throw new RollbackError(`round ${round} produced no model version (it failed, is still open, or never ran); \`medfl status\` lists the closed rounds`);
    return row;
  }
  if (!/^[0-9a-f]{8,64}$/.test(text)) throw new RollbackError(`--to must be a round number or a model hash (at least 8 lowercase hex digits), got '${to}'`);
  const matches = versions.filter((m) => m.hash.startsWith(text));
  if (matches.length === 0) throw new RollbackError(`no global model version ${text} on this coordinator`);
  if (matches.length > 1) throw new RollbackError(`${text} names ${matches.length} model versions; give more digits`);
  return matches[0];
}

/** Global model versions: the initial model and every closed round's result (not encoded copies or optimiser state). */
function globalVersions(store: CoordinatorStore): ModelRow[] {
  const results = new Set(store.listRounds().flatMap((r) => (r.state === 'closed' && r.resultModelHash ? [r.resultModelHash] : [])));
  const initial = store.listRounds()[0]?.baseModelHash ?? store.getMeta('current_model');
  return store.listModels().filter((m) => results.has(m.hash) || (m.round === 0 && m.hash === initial));
}

/** Applies a rollback to the store (one transaction) and queues it for the coordinator to announce. */
export function rollbackFederation(store: CoordinatorStore, o: { to: string; reason?: string; now?: Date }): RollbackRecord {
  const target = resolveVersion(store, o.to);
  return store.transaction(() => {
    const current = store.getMeta('current_model');
    if (!current) throw new RollbackError('this coordinator has no global model yet: there is nothing to roll back');
    const open = store.openRoundRow();
    if (current === target.hash && !open) throw new RollbackError(`model ${target.hash.slice(0, 12)}… (round ${target.round}) is already the current version`);
    const record: RollbackRecord = {
      id: randomUUID(),
      fromModel: current,
      toModel: target.hash,
      toRound: target.round,
      failedRound: open?.round ?? null,
      requestedAt: (o.now ?? new Date()).toISOString(),
      reason: (o.reason ?? '').slice(0, 500),
    };
    if (open) store.failRound(open.round, `rolled back by the operator to model ${target.hash.slice(0, 12)}… (round ${target.round}); this round's updates are not used`);
    store.setMeta('current_model', target.hash);
    // Both were computed from the versions being abandoned: the optimiser restarts, norms are re-learnt.
    store.deleteMeta(AGGREGATION_STATE_KEY);
    const teacher = parseTeacher(store.getMeta(TEACHER_KEY));
    if (teacher && teacher.round > target.round) store.deleteMeta(TEACHER_KEY);
    store.setMeta(ROLLBACK_PENDING_KEY, JSON.stringify([...pendingRollbacks(store), record]));
    return record;
  });
}

/** Rollbacks applied but not yet announced by a coordinator process. */
export function pendingRollbacks(store: CoordinatorStore): RollbackRecord[] {
  const raw = store.getMeta(ROLLBACK_PENDING_KEY);
  if (!raw) return [];
  const r = z.array(RollbackRecordSchema).safeParse(JSON.parse(raw));
  return r.success ? r.data : [];
}

/**
 * Takes (reads and clears, atomically) the rollbacks waiting to be announced; `outbox` gives the rows (event, ledger
 * entry) committed in the same transaction, so the announcement survives a crash right after.
 */
export function takePendingRollbacks(store: CoordinatorStore, outbox: (taken: RollbackRecord[]) => OutboxRow[] = () => []): RollbackRecord[] {
  return store.transaction(() => {
    const pending = pendingRollbacks(store);
    if (store.getMeta(ROLLBACK_PENDING_KEY) !== undefined) store.deleteMeta(ROLLBACK_PENDING_KEY);
    if (pending.length > 0) store.addOutbox(outbox(pending));
    return pending;
  });
}
