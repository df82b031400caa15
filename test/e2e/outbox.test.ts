/**
 * "Loses nothing": an agent that died after its update was acknowledged but before it reported the
 * metrics finds the entry in its outbox on the next start and delivers it, although the coordinator
 * (which has the update) will never send that task again.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { SiteAgent } from '../../site-agent/agent.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { uploadOnce } from '../../site-agent/transport/upload.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

let coord: RunningCoordinator | undefined;
afterAll(async () => coord?.stop());

describe('the site outbox', () => {
  it('delivers an acknowledged update whose metrics were never sent, on the next start', async () => {
    const work = mkdtempSync(join(tmpdir(), 'medfl-outbox-'));
    const coordDir = join(work, 'coordinator');
    const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(home.planPath, TEST_PLAN({ rounds: 2, minSites: 1, gather: 0, steps: 2 }));
    coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: pino({ level: 'silent' }) });
    const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
    const siteDir = join(work, 'site-a');
    await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: siteDir });
    const dataDir = join(work, 'data');
    await writePhantomSite(dataDir, { siteName: 'site-a', cases: 4, valCases: 2, size: [16, 16, 16], seed: 5, intensityShift: 0 });

    // The earlier run: it got round 1's task, trained, uploaded (acknowledged) — and died before its metrics.
    const client = new FederationClient(new SiteHome(siteDir));
    const tasks = client.subscribeTasks([]);
    tasks.on('error', () => undefined);
    const task = await new Promise<WireTask>((resolve) => tasks.on('data', (t: WireTask) => t.kind === 'TRAIN' && resolve(t)));
    const settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
    const payload = encodeSafetensors(pick(architectureFor(settings.model).init(8), settings.sharedTensors.map((name) => ({ name }))));
    const entry = { updateId: `${task.taskId}-${randomUUID()}`, taskId: task.taskId, round: task.round, baseModelHash: task.modelHash, numSamples: 4, metrics: { train_loss: 0.25, num_train: 4 } };
    expect((await uploadOnce(client, { ...entry, payload })).accepted).toBe(true);
    tasks.cancel();
    client.close();
    const outbox = new SiteHome(siteDir).outboxDir;
    mkdirSync(outbox, { recursive: true });
    writeFileSync(join(outbox, `${task.taskId}.safetensors`), payload);
    writeFileSync(join(outbox, `${task.taskId}.json`), JSON.stringify(entry));
    expect(coord.store.listMetrics().filter((m) => m.round === 1)).toEqual([]);

    // The next run: delivers the entry (a duplicate ack), reports round 1's metrics, then trains round 2.
    const agent = new SiteAgent({ dir: siteDir, dataDir, log: pino({ level: 'silent' }), exitWhenFinished: true, engine: 'cpu' });
    await agent.run();
    const r1 = coord.store.listMetrics().filter((m) => m.round === 1 && m.site === 'site-a');
    expect(Object.fromEntries(r1.map((m) => [m.key, m.value]))).toEqual({ train_loss: 0.25, num_train: 4 });
    expect(coord.store.updatesForRound(1)).toHaveLength(1);
    expect(coord.store.getRound(2)?.state).toBe('closed');
    expect(readdirSync(outbox)).toEqual([]);
  });
});
