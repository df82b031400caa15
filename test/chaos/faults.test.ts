/**
 * Issue 15, in the default suite: the chaos run of chaos-run.ts, short — one coordinator kill -9 during an upload, one
 * at the round close, one site kill -9 while it holds an unacknowledged update, a NATS restart and (where a tmpfs
 * can be mounted) a full disk, each landing at the moment it targets (observed, not timed), over as many rounds as the schedule needs
 * (chaos-run.ts roundsFor); then
 * acknowledged == counted == ledger entries, no leftovers, audit verify passing. `npm run chaos` is the long run.
 */
import { afterAll, describe, it } from 'vitest';
import { canMountTmpfs, runChaos, undo } from './chaos-run.ts';

const SEED = Number(process.env.MEDFL_CHAOS_SEED ?? Date.now() % 100_000);

const cleanups: (() => void | Promise<void>)[] = [];
afterAll(() => undo(cleanups));

describe('faults (short chaos run)', () => {
  it(`survives a coordinator kill -9 during an upload and one at the round close, a site kill -9 holding an update, a NATS restart and ${canMountTmpfs ? 'a full disk (tmpfs)' : 'NO full disk: this machine does not let the test mount a tmpfs'}`, async () => {
    await runChaos({ kills: ['coordinator-upload', 'coordinator-close', 'site-outbox'], seed: SEED }, cleanups);
  }, 420_000);
});
