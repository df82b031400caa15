/**
 * A federation round on a 4-channel (multi-modal, BraTS-like) generated MSD task: a coordinator and two site
 * processes train a tiny Med3D ResNet-10 whose conv1 takes the plan's 4 input channels; the global model's conv1
 * is [7,7,7,4,P] and every site trained on its 4-channel files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { exited, makeFederation, type TestFederation } from '../helpers/federation.ts';
import { writeMultiChannelSite } from '../helpers/multichannel-site.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';

const PLAN = [
  'name: multichannel-federation',
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], numClasses: 2, seed: 5, inputChannels: 4 }',
  'rounds: 1',
  'minSites: 2',
  'roundDeadlineSeconds: 120',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 2, batchSize: 2, learningRate: 0.005 }',
  '',
].join('\n');

describe('a federation round on a 4-channel MSD task', () => {
  let fed: TestFederation;

  beforeAll(async () => {
    fed = await makeFederation({
      sites: 2,
      plan: PLAN,
      writeData: async (dir, _name, i) => void (await writeMultiChannelSite(dir, { cases: 4, valCases: 1, size: [16, 16, 16], seed: 40 + i })),
    });
    await fed.startCoordinator();
    await fed.enrollAll();
    const codes = await Promise.all(fed.sites.map((s) => exited(fed.startSite(s), 150_000)));
    expect(codes).toEqual([0, 0]);
  }, 200_000);

  afterAll(() => {
    fed?.killAll();
    if (fed) rmSync(fed.work, { recursive: true, force: true });
  });

  it('closes the round with a global model whose conv1 takes 4 channels; both sites trained and validated on 4-channel data', () => {
    const store = fed.store();
    expect(store.listRounds().map((r) => [r.round, r.state])).toEqual([[1, 'closed']]);
    const current = store.getMeta('current_model')!;
    store.close();
    const model = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${current}.safetensors`))).bundle;
    expect(model.get('encoder.conv1.weight')!.shape).toEqual([7, 7, 7, 4, 4]);
    for (const site of fed.sites) {
      const log = readFileSync(fed.logPath(site), 'utf8');
      expect(log).toMatch(/"channels":4/);
      expect(log).not.toMatch(/input channel\(s\)/);
      expect(log).toMatch(/"msg":"update acknowledged"/);
      const done = log.split('\n').find((l) => l.includes('"msg":"local training done"'));
      expect(done).toBeDefined();
      const r = JSON.parse(done!) as { loss: number; valDice: number };
      expect(Number.isFinite(r.loss)).toBe(true);
      expect(r.valDice).toBeGreaterThanOrEqual(0); // scored on the site's 4-channel validation volume
    }
  });
});
