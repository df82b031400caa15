/**
 * Issue 14, items 2 and 3, end to end: a compromised coordinator that holds the federation's real keys (an
 * in-process coordinator whose task signer alters each TRAIN task before signing it with the real key, served over its
 * real TLS endpoint) against real site agent processes.
 *   - a task whose task_id is `../../../escape/PWNED`: refused at the wire edge with a clear error; nothing is
 *     downloaded, trained or written outside the site folder;
 *   - a task that lists head tensors as shared, to a site with no policy.yaml: declined (default-deny), the
 *     decline reaches the coordinator as before, and no upload leaves the site.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { makeFederation, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { keyTaskSigner, type TaskSigner } from '../../coordinator/rounds/task-signer.ts';
import type { TaskManifest } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { waitFor } from '../../cli/processes.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';

let fed: TestFederation;
let coord: RunningCoordinator;
const events: FederationEvent[] = [];
/** What the hostile task builder does to each genuine task before signing it again with the real key. */
let tamper: (m: TaskManifest) => TaskManifest = (m) => m;

beforeAll(async () => {
  fed = await makeFederation({ sites: 2, plan: TEST_PLAN({ rounds: 1, minSites: 1, deadline: 30, gather: 0, steps: 2 }) });
  const genuine = keyTaskSigner(new CoordinatorHome(fed.coordDir).signingKey());
  const signTask: TaskSigner = (manifest) => genuine(manifest.kind === 'TRAIN' ? tamper(manifest) : manifest);
  coord = await startCoordinator({ dir: fed.coordDir, port: fed.port, host: '127.0.0.1', log: pino({ level: 'silent' }), signTask });
  coord.bus.subscribe((e) => events.push(e));
  await fed.enrollAll();
}, 60_000);

afterAll(async () => {
  fed?.killAll();
  await coord?.stop();
});

const audit = (site: string) => join(fed.work, `${site}-wire.jsonl`);
const calls = (site: string): { method: string; messages: { reason?: string }[] }[] =>
  existsSync(audit(site)) ? readFileSync(audit(site), 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l)) : [];

describe('a compromised coordinator with the real keys', () => {
  it('a task_id that climbs out of the outbox is refused with a clear error, and nothing is written outside the site', async () => {
    const escaped = join(fed.work, 'escape');
    rmSync(escaped, { recursive: true, force: true });
    tamper = (m) => ({ ...m, taskId: '../../../escape/PWNED' });
    const site = fed.startSite('site-a', ['--audit-wire', audit('site-a')]);
    const log = () => (existsSync(fed.logPath('site-a')) ? readFileSync(fed.logPath('site-a'), 'utf8') : '');
    // Today's code would download, train, write PWNED.json/.safetensors under escape/ and try to upload.
    await waitFor(() => /malformed task|refused the update|update acknowledged|task failed/.test(log()), 120_000, 'the site to act on the task');
    site.kill('SIGTERM');
    expect(log()).toMatch(/malformed task from the coordinator: ignored/);
    expect(log()).toMatch(/task \\?"..\/..\/..\/escape\/PWNED\\?" refused: taskId: task_id must be 1–90 characters/);
    expect(existsSync(escaped)).toBe(false);
    expect(calls('site-a').some((c) => c.method.endsWith('/DownloadModel') || c.method.endsWith('/UploadUpdate'))).toBe(false);
  }, 150_000);

  it('a task listing head tensors as shared is declined by a site without policy.yaml, and the coordinator hears why', async () => {
    // Enrolment wrote the commented default policy; this site's admin removed it: the default still denies heads.
    const policy = join(fed.siteDir('site-b'), 'policy.yaml');
    expect(readFileSync(policy, 'utf8')).toMatch(/^share:\n(?:\s*#.*\n)*\s*parts: \[encoder\]/m);
    rmSync(policy);
    const plan = coord.plan;
    const heads = architectureFor(plan.model).params().filter((p) => p.part === 'head').map((p) => p.name);
    expect(heads.length).toBeGreaterThan(0);
    tamper = (m) => {
      const settings = JSON.parse(m.settingsJson) as { sharedTensors: string[] };
      return { ...m, settingsJson: JSON.stringify({ ...settings, sharedTensors: [...settings.sharedTensors, ...heads] }) };
    };
    const site = fed.startSite('site-b', ['--audit-wire', audit('site-b')]);
    await waitFor(() => events.some((e) => e.type === 'task.declined' && e.site === 'site-b'), 120_000, 'the decline to reach the coordinator');
    // The site writes its audit line once the call has returned, which on a loaded machine can be after the
    // coordinator's event: wait for it before stopping the site.
    await waitFor(() => existsSync(audit('site-b')) && calls('site-b').some((c) => c.method.endsWith('/DeclineTask')), 60_000, 'the site to record its decline');
    site.kill('SIGTERM');
    const declined = events.find((e) => e.type === 'task.declined' && e.site === 'site-b')!;
    expect(String(declined.reason)).toMatch(new RegExp(`the task asks for ${heads.length} tensor\\(s\\) site policy keeps here: ${heads[0].replace(/\./g, '\\.')} \\(part head\\)`));
    expect(readFileSync(fed.logPath('site-b'), 'utf8')).toMatch(/task declined: it breaks this site's policy/);
    const siteCalls = calls('site-b');
    expect(siteCalls.some((c) => c.method.endsWith('/DeclineTask'))).toBe(true);
    expect(siteCalls.some((c) => c.method.endsWith('/DownloadModel') || c.method.endsWith('/UploadUpdate'))).toBe(false);
  }, 150_000);
});
