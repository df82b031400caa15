/** The fold queue runs one job at a time, in order, and a failed job does not stop the ones after it. */
import { describe, expect, it } from 'vitest';
import { FoldQueue } from '../../../coordinator/rounds/fold-queue.ts';

const tick = () => new Promise((r) => setTimeout(r, 5));

describe('FoldQueue', () => {
  it('never runs two jobs at once, keeps their order, and goes on after a failure', async () => {
    const q = new FoldQueue();
    const log: string[] = [];
    let running = 0;
    const job = (name: string, fail = false) => async () => {
      running++;
      expect(running).toBe(1);
      log.push(`start ${name}`);
      await tick();
      log.push(`end ${name}`);
      running--;
      if (fail) throw new Error(name);
      return name;
    };
    const results = await Promise.allSettled([q.run(job('a')), q.run(job('b', true)), q.run(job('c'))]);
    expect(log).toEqual(['start a', 'end a', 'start b', 'end b', 'start c', 'end c']);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
  });

  it('drained() waits for the jobs queued so far and never rejects', async () => {
    const q = new FoldQueue();
    let done = false;
    void q
      .run(async () => {
        await tick();
        done = true;
        throw new Error('boom');
      })
      .catch(() => undefined);
    await q.drained();
    expect(done).toBe(true);
  });
});
