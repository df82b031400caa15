/**
 * The round lifecycle's hooks (coordinator/rounds/round-feature.ts): a feature handed to the engine, with no edit of
 * the engine, is called in lifecycle order, and what it adds to a close lands in the close's transaction and event.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { waitFor } from '../../cli/processes.ts';
import { bareEngine } from '../helpers/bare-engine.ts';
import type { RoundFeature } from '../../coordinator/rounds/round-feature.ts';
import { parsePlan } from '../../shared/plan/load.ts';

const plan = parsePlan(
  [
    'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
    'rounds: 2',
    'minSites: 1',
    'gatherSeconds: 0',
    'roundDeadlineSeconds: 1.5',
    '',
  ].join('\n'),
  'plan.yaml',
);

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** Records every hook call as "hook round". */
function recorder(calls: string[]): RoundFeature {
  return {
    name: 'recorder',
    start: () => calls.push('start'),
    reload: () => calls.push('reload'),
    onRoundOpening: (round, stage) => calls.push(`onRoundOpening ${round} ${stage.kind}`),
    onRoundOpened: (r) => calls.push(`onRoundOpened ${r.row.round}`),
    taskSettings: () => {
      calls.push('taskSettings');
      return {};
    },
    onUpdateAccepted: (u, r) => calls.push(`onUpdateAccepted ${r.row.round} ${u.site}`),
    beforeCommit: (r, v) => {
      calls.push(`beforeCommit ${r.row.round} ${[...r.reported].join(',')}`);
      return { meta: { recorder: v.hash }, closedFields: { recorded: true } };
    },
    onRoundClosed: (r, _v, c) => calls.push(`onRoundClosed ${r.row.round} ${c?.meta?.recorder ? 'with its contribution' : 'without'}`),
    onRoundFailed: (r, reason) => calls.push(`onRoundFailed ${r.row.round} ${reason.split(':')[0]}`),
  };
}

describe('round features', () => {
  it('a feature passed to the engine sees the lifecycle in order, and its close contribution is committed', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-features-'));
    dirs.push(dir);
    const calls: string[] = [];
    const { store, models, engine, events, tasks, enrol, connect } = bareEngine(dir, plan, { features: [recorder(calls)] });
    enrol(['site-a']);
    await engine.start();
    connect(['site-a']);
    await waitFor(() => tasks.length > 0, 5000, 'the task of round 1');

    // Round 1: one update, the round closes.
    const row = { updateId: 'u-00000001', round: 1, site: 'site-a', numSamples: 4, sha256: 'a'.repeat(64), path: join(dir, 'none'), sizeBytes: 1, acceptedAt: Date.now() };
    store.insertUpdate(row);
    expect(engine.fold(row, models.load(engine.currentModelHash))).toBe(true);
    await engine.accepted(row);
    // Round 2: nothing arrives, so its deadline fails it.
    await waitFor(() => events.some((e) => e.type === 'round.failed'), 10_000, 'round 2 to fail at its deadline');
    engine.stop();

    // Round 3 opens as soon as round 2 failed: the calls up to the failure are round 1's and round 2's.
    expect(calls.slice(0, calls.findIndex((c) => c.startsWith('onRoundFailed')) + 1)).toEqual([
      'start',
      'onRoundOpening 1 fine-tuning',
      'onRoundOpened 1',
      'taskSettings',
      'onUpdateAccepted 1 site-a',
      'beforeCommit 1 site-a',
      'onRoundClosed 1 with its contribution',
      'onRoundOpening 2 fine-tuning',
      'onRoundOpened 2',
      'taskSettings',
      'onRoundFailed 2 deadline reached without quorum',
    ]);
    const closed = store.getRound(1)!;
    expect(store.getMeta('recorder')).toBe(closed.resultModelHash);
    expect(events.find((e) => e.type === 'round.closed')).toMatchObject({ round: 1, recorded: true });
    store.close();
  });

  it('a feature that throws in a notification hook is logged and the rounds go on', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-features-'));
    dirs.push(dir);
    const boom = () => {
      throw new Error('boom');
    };
    const logged: Array<Record<string, unknown>> = [];
    const { store, models, engine, events, tasks, enrol, connect } = bareEngine(dir, plan, {
      log: pino({ level: 'warn' }, { write: (l: string) => logged.push(JSON.parse(l) as Record<string, unknown>) }),
      features: [{ name: 'broken', onRoundOpened: boom, onUpdateAccepted: boom, onRoundClosed: boom }],
    });
    enrol(['site-a']);
    await engine.start();
    connect(['site-a']);
    await waitFor(() => tasks.length > 0, 5000, 'the task of round 1');
    const row = { updateId: 'u-00000001', round: 1, site: 'site-a', numSamples: 4, sha256: 'a'.repeat(64), path: join(dir, 'none'), sizeBytes: 1, acceptedAt: Date.now() };
    store.insertUpdate(row);
    engine.fold(row, models.load(engine.currentModelHash));
    await engine.accepted(row);
    engine.stop();
    expect(store.getRound(1)!.state).toBe('closed');
    expect(events.filter((e) => e.type === 'round.started').map((e) => e.round)).toEqual([1, 2]);
    expect(logged.filter((l) => l.feature === 'broken').map((l) => l.hook)).toEqual(['onRoundOpened', 'onUpdateAccepted', 'onRoundClosed', 'onRoundOpened']);
    store.close();
  });
});
