/**
 * End to end, real processes: a site whose policy requires DP declines a plan without it, says why (its
 * log and the coordinator's), and never uploads; the other site trains. The coordinator's ledger records
 * only the update that was accepted, verifies, and each site can fetch and check it.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createPublicKey } from 'node:crypto';
import { makeFederation, exited, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';
import { verifyChain } from '../../coordinator/ledger/chain.ts';
import { readLedgerFile } from '../../coordinator/ledger/ledger.ts';
import { rawPublicKey } from '../../shared/security/site-identity.ts';
import { siteLedger } from '../../cli/audit.ts';

let fed: TestFederation | undefined;
afterAll(() => fed?.killAll());

describe('site policy, end to end', () => {
  it('a site that requires DP declines a non-DP plan and says why; the ledger records only the other site', async () => {
    fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 1, minSites: 1, deadline: 25, gather: 3, steps: 2 }) });
    await fed.startCoordinator();
    await fed.enrollAll();
    writeFileSync(join(fed.siteDir('site-a'), 'policy.yaml'), 'dp:\n  required: true\n');
    const auditA = join(fed.work, 'site-a-wire.jsonl');
    const a = fed.startSite('site-a', ['--audit-wire', auditA]);
    const b = fed.startSite('site-b');
    expect(await exited(b, 150_000)).toBe(0);
    expect(await exited(a, 60_000)).toBe(0);

    const logA = readFileSync(fed.logPath('site-a'), 'utf8');
    expect(logA).toMatch(/task declined: it breaks this site's policy/);
    expect(logA).toMatch(/requires differential privacy/);
    expect(logA).not.toMatch(/update acknowledged/);
    // The site's wire audit shows the decline and no upload.
    const calls = readFileSync(auditA, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { method: string; messages: { reason?: string }[] });
    const decline = calls.find((c) => c.method.endsWith('/DeclineTask'));
    expect(decline?.messages[0]?.reason).toMatch(/requires differential privacy/);
    expect(calls.some((c) => c.method.endsWith('/UploadUpdate'))).toBe(false);
    const logC = readFileSync(fed.logPath('coordinator'), 'utf8');
    const declined = logC.split('\n').find((l) => l.includes('site declined its task'));
    expect(declined).toBeDefined();
    expect(JSON.parse(declined!)).toMatchObject({ site: 'site-a', round: 1, level: 40 });
    expect(JSON.parse(declined!).reason).toMatch(/requires differential privacy/);

    // The ledger: one entry, for site-b, signed and chained.
    const key = rawPublicKey(createPublicKey(fed.home.signingKey()));
    const lines = readLedgerFile(join(fed.coordDir, 'ledger.jsonl'));
    const report = verifyChain(lines, { coordinatorPublicKey: key, federation: fed.home.config().federationId });
    expect(report.problems).toEqual([]);
    expect(report.entries.map((e) => [e.round, e.site, e.strategy])).toEqual([[1, 'site-b', 'fedavg']]);
    expect(report.entries[0]!.samples).toBeGreaterThan(0);

    // Each site fetches the ledger over the authenticated RPC and checks it against its pinned coordinator key.
    const forB = await siteLedger({ dir: fed.siteDir('site-b') });
    expect(forB.ok).toBe(true);
    expect(forB.own.map((e) => e.round)).toEqual([1]);
    const forA = await siteLedger({ dir: fed.siteDir('site-a') });
    expect(forA.ok).toBe(true);
    expect(forA.own).toEqual([]);

    const privacy = execFileSync(process.execPath, ['bin/medfl.js', 'site', 'privacy', '--dir', fed.siteDir('site-b')], { encoding: 'utf8' });
    expect(privacy).toMatch(/rounds accepted: 1/);
    expect(privacy).toMatch(/ε spent: ∞ \(a round without DP was accepted\)/);

    // And the CLI, as an admin runs it.
    const out = execFileSync(process.execPath, ['bin/medfl.js', 'audit', 'verify', '--dir', fed.coordDir], { encoding: 'utf8' });
    expect(out).toMatch(/ledger OK: 1 entry/);
    expect(out).toMatch(/site-b/);
  }, 240_000);
});
