/**
 * `medfl coordinator rollback` at the store (coordinator/rounds/rollback.ts): which versions it accepts, what one
 * transaction changes, and the queue a coordinator process announces from (event + ledger; see poison-engine.test.ts).
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { pendingRollbacks, resolveVersion, rollbackFederation, takePendingRollbacks } from '../../coordinator/rounds/rollback.ts';

const H0 = '0'.repeat(64);
const H1 = 'ab'.repeat(32);
const H2 = 'ac'.repeat(32);

function federation(): CoordinatorStore {
  const s = new CoordinatorStore(join(mkdtempSync(join(tmpdir(), 'medfl-rollback-')), 'state.db'));
  const model = (hash: string, round: number) => ({ hash, path: `/m/${hash}`, round, sizeBytes: 4, createdAt: round });
  s.addModel(model(H0, 0));
  s.setMeta('current_model', H0);
  for (const [round, base, result] of [[1, H0, H1], [2, H1, H2]] as const) {
    s.openRound({ round, baseModelHash: base, selected: ['site-a'], openedAt: 0, deadlineAt: 1 });
    expect(s.closeRound(round, model(result, round), 1, { aggregation_state: '{"json":"{}","tensors":null}', teacher: JSON.stringify({ modelHash: H2, generation: 1, round: 2 }) })).toBe(true);
  }
  s.openRound({ round: 3, baseModelHash: H2, selected: ['site-a'], openedAt: 0, deadlineAt: 1 });
  return s;
}

describe('rollback', () => {
  it('names a version by round number or by hash prefix, and says clearly when it cannot', () => {
    const s = federation();
    expect(resolveVersion(s, '0').hash).toBe(H0);
    expect(resolveVersion(s, '1').hash).toBe(H1);
    expect(resolveVersion(s, H2.slice(0, 8)).hash).toBe(H2);
    expect(() => resolveVersion(s, '3')).toThrow(/round 3 produced no model version/);
    expect(() => resolveVersion(s, 'a')).toThrow(/must be a round number or a model hash/);
    expect(() => resolveVersion(s, 'a'.repeat(8))).toThrow(/names 2 model versions|no global model version/);
    expect(() => resolveVersion(s, 'ff'.repeat(4))).toThrow(/no global model version ffffffff/);
  });

  it('one transaction: current model back, open round failed, optimiser state and a later teacher dropped, queued once', () => {
    const s = federation();
    const r = rollbackFederation(s, { to: '1', reason: 'poisoned round 2' });
    expect(r).toMatchObject({ fromModel: H2, toModel: H1, toRound: 1, failedRound: 3, reason: 'poisoned round 2' });
    expect(s.getMeta('current_model')).toBe(H1);
    expect(s.getRound(3)).toMatchObject({ state: 'failed' });
    expect(s.getRound(3)!.note).toMatch(/rolled back by the operator to model abababababab… \(round 1\)/);
    expect(s.getMeta('aggregation_state')).toBeUndefined();
    expect(s.getMeta('teacher')).toBeUndefined();
    // Rounds already closed stay closed: history is not rewritten.
    expect(s.listRounds().map((x) => x.state)).toEqual(['closed', 'closed', 'failed']);
    expect(() => rollbackFederation(s, { to: '1' })).toThrow(/already the current version/);
    rollbackFederation(s, { to: '0' });
    expect(pendingRollbacks(s).map((x) => x.toRound)).toEqual([1, 0]);
    expect(takePendingRollbacks(s)).toHaveLength(2);
    expect(takePendingRollbacks(s)).toEqual([]);
  });

  it('a round close racing a rollback does not publish: closeRound refuses a round that is no longer open', () => {
    const s = federation();
    rollbackFederation(s, { to: '1' });
    expect(s.closeRound(3, { hash: 'cd'.repeat(32), path: '/m/x', round: 3, sizeBytes: 4, createdAt: 9 })).toBe(false);
    expect(s.getMeta('current_model')).toBe(H1);
    expect(s.getModel('cd'.repeat(32))).toBeUndefined();
  });
});
