/**
 * The long chaos run (`npm run chaos`, `npm run chaos:short`): the fault schedule of chaos-run.ts with as many kills as
 * the env asks — MEDFL_CHAOS_COORDINATOR_KILLS (default 3: during an upload, at the round close, at random, in
 * turn), MEDFL_CHAOS_SITE_KILLS (default 2: holding an unacknowledged update, at random, in turn), MEDFL_CHAOS_SEED —
 * and as many rounds as the schedule needs. It prints its figures. The default suite runs a short variant (faults.test.ts).
 */
import { afterAll, describe, it } from 'vitest';
import { canMountTmpfs, runChaos, undo, type Fault } from './chaos-run.ts';

const COORDINATOR_KILLS = Number(process.env.MEDFL_CHAOS_COORDINATOR_KILLS ?? 3);
const SITE_KILLS = Number(process.env.MEDFL_CHAOS_SITE_KILLS ?? 2);
const SEED = Number(process.env.MEDFL_CHAOS_SEED ?? Date.now() % 100_000);

const kills: Fault[] = [];
for (let i = 0; i < COORDINATOR_KILLS; i++) kills.push((['coordinator-upload', 'coordinator-close', 'coordinator-random'] as const)[i % 3]!);
for (let i = 0; i < SITE_KILLS; i++) kills.push((['site-outbox', 'site-random'] as const)[i % 2]!);

const title =
  `survives ${COORDINATOR_KILLS} coordinator kill -9s (during an upload, at the round close, at random), ${SITE_KILLS} site kill -9s (holding an unacknowledged update, at random), a NATS restart and ` +
  (canMountTmpfs ? 'a full disk (tmpfs)' : 'NO full disk: this machine does not let the test mount a tmpfs') +
  ', with acknowledged == counted == ledger entries, no leftovers, and audit verify passing';

const cleanups: (() => void | Promise<void>)[] = [];
afterAll(() => undo(cleanups));

describe('chaos', () => {
  it(title, async () => {
    // The run plans as many rounds as its schedule needs (chaos-run.ts roundsFor).
    await runChaos({ kills, seed: SEED }, cleanups);
  }, Number(process.env.MEDFL_CHAOS_TIMEOUT_MS ?? 900_000));
});
