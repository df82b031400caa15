/**
 * The in-process federation helper leaves nothing in the temp folder: close() stops the coordinator and deletes
 * its work folder (the ~70 leftover /tmp/medfl-agg-* folders came from tests that only stopped it).
 */
import { existsSync, readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { InprocFederation } from './inproc.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

describe('InprocFederation', () => {
  it('close() deletes its work folder; stop() keeps it for a restart', async () => {
    const f = await InprocFederation.create(TEST_PLAN({ rounds: 1, minSites: 1 }), ['site-a']);
    expect(readdirSync(f.work).sort()).toEqual(['coordinator', 'site-a']);
    await f.stop();
    expect(existsSync(f.work)).toBe(true);
    await f.start();
    await f.close();
    expect(existsSync(f.work)).toBe(false);
    expect(f.coord).toBeUndefined();
  });
});
