/**
 * End to end, real processes: a site whose task file gives it its own head declines a plan that cannot take
 * one (tiny3d has no separate head) before downloading anything, and the coordinator hears why; the other
 * site trains, and the round closes as soon as it has reported (the coordinator stops waiting for a decliner).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';

let fed: TestFederation | undefined;
afterAll(() => fed?.killAll());

describe('site task file, end to end', () => {
  it('a site with its own head declines a plan without a separate head, before any download, and says why', async () => {
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 1, minSites: 1, deadline: 60, gather: 3, steps: 2 }) });
    await fed.startCoordinator();
    await fed.enrollAll();
    writeFileSync(join(fed.siteDir('site-a'), 'task.yaml'), 'head: classification\nnumClasses: 3\n');
    const auditA = join(fed.work, 'site-a-wire.jsonl');
    const a = fed.startSite('site-a', ['--audit-wire', auditA]);
    const b = fed.startSite('site-b');
    expect(await exited(b, 150_000)).toBe(0);
    expect(await exited(a, 60_000)).toBe(0);

    const logA = readFileSync(fed.logPath('site-a'), 'utf8');
    expect(logA).toMatch(/task declined: it conflicts with this site's task file/);
    expect(logA).not.toMatch(/global model ready/);
    const calls = readFileSync(auditA, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { method: string; messages: { reason?: string }[] });
    expect(calls.some((c) => c.method.endsWith('/DownloadModel'))).toBe(false);
    expect(calls.some((c) => c.method.endsWith('/UploadUpdate'))).toBe(false);
    expect(calls.find((c) => c.method.endsWith('/DeclineTask'))?.messages[0]?.reason).toMatch(/per-site heads need model\.architecture: med3d/);
    const declined = readFileSync(fed.logPath('coordinator'), 'utf8').split('\n').find((l) => l.includes('site declined its task'));
    expect(JSON.parse(declined!)).toMatchObject({ site: 'site-a', round: 1 });
    expect(fed.store().listRounds().map((r) => r.state)).toEqual(['closed']);
    const closed = readFileSync(fed.logPath('coordinator'), 'utf8').split('\n').find((l) => l.includes('"round closed"'));
    expect(JSON.parse(closed!).why).toBe('every selected site reported or declined');
  }, 240_000);
});
