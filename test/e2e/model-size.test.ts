/**
 * Issue 14, item 5d: a site does not download a model larger than the plan's architecture can account for.
 * A coordinator with the real keys (a task signer that alters each TRAIN task, then signs it with the real key) announces a
 * 64 GiB model to an in-process site agent: the agent refuses the task with a clear error before any download
 * call, and leaves no partial file behind. The limit itself stays just above the genuine model's size.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { makeFederation, TEST_PLAN, type TestFederation } from '../helpers/federation.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { keyTaskSigner, type TaskSigner } from '../../coordinator/rounds/task-signer.ts';
import { TaskSettingsSchema, type TaskManifest } from '../../shared/protocol/task.ts';
import { SiteAgent } from '../../site-agent/agent.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { modelSizeLimit } from '../../site-agent/transport/model-cache.ts';
import { waitFor } from '../../cli/processes.ts';

let fed: TestFederation;
let coord: RunningCoordinator;
const genuineTasks: TaskManifest[] = [];

beforeAll(async () => {
  fed = await makeFederation({ sites: 1, plan: TEST_PLAN({ rounds: 1, minSites: 1, deadline: 120, gather: 0, steps: 1 }) });
  const genuine = keyTaskSigner(new CoordinatorHome(fed.coordDir).signingKey());
  const signTask: TaskSigner = (manifest) => {
    if (manifest.kind !== 'TRAIN') return genuine(manifest);
    genuineTasks.push(manifest);
    return genuine({ ...manifest, modelSize: 64 * 1024 ** 3 });
  };
  coord = await startCoordinator({ dir: fed.coordDir, port: fed.port, host: '127.0.0.1', log: pino({ level: 'silent' }), signTask });
  await fed.enrollAll();
}, 60_000);

afterAll(async () => {
  await coord?.stop();
  if (fed) rmSync(fed.work, { recursive: true, force: true });
});

describe('the model size a coordinator announces', () => {
  it('is refused before downloading when the architecture cannot account for it', async () => {
    const lines: Array<Record<string, unknown>> = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
        done();
      },
    });
    const auditPath = join(fed.work, 'site-a-wire.jsonl');
    const agent = new SiteAgent({ dir: fed.siteDir('site-a'), dataDir: fed.dataDir('site-a'), log: pino({ level: 'info' }, sink), auditPath, engine: 'cpu', maxBackoffMs: 1000 });
    const run = agent.run().catch((e: Error) => e);
    try {
      await waitFor(() => lines.some((l) => String(l.msg).startsWith('task refused: the announced model is larger')), 60_000, 'the site to refuse the task');
    } finally {
      agent.stop();
      await run;
    }
    const refused = lines.find((l) => String(l.msg).startsWith('task refused'))!;
    const settings = TaskSettingsSchema.parse(JSON.parse(genuineTasks[0]!.settingsJson));
    expect(refused).toMatchObject({ announcedBytes: 64 * 1024 ** 3, limitBytes: modelSizeLimit(settings.model) });
    expect(lines.some((l) => String(l.reason).includes(`the coordinator announced a model of ${64 * 1024 ** 3} bytes, more than the`))).toBe(true);
    // No download was started: no call on the wire, no partial file in the cache.
    const calls = existsSync(auditPath) ? readFileSync(auditPath, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { method: string }) : [];
    expect(calls.some((c) => c.method.endsWith('/DownloadModel'))).toBe(false);
    const cache = new SiteHome(fed.siteDir('site-a')).modelCacheDir;
    expect(existsSync(cache) ? readdirSync(cache) : []).toEqual([]);
  }, 90_000);

  it('stays just above the genuine model file', () => {
    const t = genuineTasks[0]!;
    const settings = TaskSettingsSchema.parse(JSON.parse(t.settingsJson));
    const real = coord.store.getModel(t.modelHash)!.sizeBytes;
    expect(real).toBe(t.modelSize);
    const limit = modelSizeLimit(settings.model);
    expect(limit).toBeGreaterThanOrEqual(real);
    expect(limit - real).toBeLessThanOrEqual(2 * 1024 * 1024);
  });
});
