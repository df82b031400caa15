/**
 * A site without labels in a real federation: an archive of unlabelled scans can still help pretrain the shared
 * encoder. It trains and uploads in the pretraining round, then declines the fine-tuning task before downloading
 * anything (it has nothing to fine-tune on), and the fine-tuning round closes on the labelled site's update
 * without waiting for the deadline.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, type TestFederation } from '../helpers/federation.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { readPretrainedEncoder } from '../../shared/model/pretrained-encoder-file.ts';
import { PRETRAINED_ENCODER_KEY } from '../../coordinator/rounds/pretraining-stage.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';

const PLAN = [
  'name: pretraining-only-site',
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], numClasses: 2, head: unet, seed: 5 }',
  'rounds: 1',
  // Quorum counts sites that report: the unlabelled site declines fine-tuning, so the floor is the labelled sites.
  'minSites: 1',
  'roundDeadlineSeconds: 120',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 2, batchSize: 2, learningRate: 0.005 }',
  'share: { parts: [encoder], keepLocal: [norm] }',
  'pretraining: { enabled: true, rounds: 1, steps: 2, learningRate: 0.002 }',
  '',
].join('\n');

describe('a site with unlabelled scans only', () => {
  let fed: TestFederation;
  let seconds = 0;

  beforeAll(async () => {
    fed = await makeFederation({
      sites: 2,
      plan: PLAN,
      writeData: async (dir, name, i) => {
        await writePhantomSite(dir, { siteName: name, cases: 4, valCases: 2, size: [16, 16, 16], seed: 100 + i, intensityShift: 20 * i });
        // site-b: the same scans with every label file removed.
        if (i === 1) for (const d of ['labelsTr', 'labelsTs']) rmSync(join(dir, d), { recursive: true, force: true });
      },
    });
    await fed.startCoordinator();
    await fed.enrollAll();
    const t0 = performance.now();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    expect(await Promise.all(agents.map((a) => exited(a, 200_000)))).toEqual([0, 0]);
    seconds = (performance.now() - t0) / 1000;
  }, 240_000);

  afterAll(() => fed?.killAll());

  it('helps pretrain the encoder: its update is in the pretraining round and the encoder file names it', () => {
    const store = fed.store();
    expect(store.listRounds().map((r) => [r.round, r.state])).toEqual([
      [1, 'closed'],
      [2, 'closed'],
    ]);
    const recorded = JSON.parse(store.getMeta(PRETRAINED_ENCODER_KEY)!) as { path: string };
    store.close();
    expect(readPretrainedEncoder(readFileSync(recorded.path)).provenance).toMatchObject({ objective: 'restoration', sites: ['site-a', 'site-b'] });
    expect(readFileSync(fed.logPath('site-b'), 'utf8')).toMatch(/pretraining \(restoration\) done/);
  });

  it('declines the fine-tuning task before downloading, and the round closes without waiting for the deadline', () => {
    const calls = readFileSync(join(fed.work, 'logs', 'site-b.wire.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall & { messages: { reason?: string }[] });
    expect(calls.filter((c) => c.method.endsWith('/UploadUpdate'))).toHaveLength(1);
    expect(calls.filter((c) => c.method.endsWith('/DownloadModel'))).toHaveLength(1);
    const declines = calls.filter((c) => c.method.endsWith('/DeclineTask'));
    expect(declines).toHaveLength(1);
    expect(declines[0].messages[0]?.reason).toMatch(/no labelled training case: it takes part in pretraining rounds only/);
    const coordLines = readFileSync(fed.logPath('coordinator'), 'utf8').split('\n');
    expect(JSON.parse(coordLines.find((l) => l.includes('site declined its task'))!)).toMatchObject({ site: 'site-b', round: 2 });
    const closed = coordLines.filter((l) => l.includes('"round closed"')).map((l) => JSON.parse(l) as { round: number; why?: string });
    expect(closed.find((c) => c.round === 2)?.why).toBe('every selected site reported or declined');
    // Both rounds together well inside one fine-tuning round's deadline: nobody waited for site-b.
    expect(seconds).toBeLessThan(120);
  });
});
