/**
 * Federated Med3D-style pretraining with per-site heads, with real processes: one shared Med3D encoder and
 * three sites with three different tasks — site-a segments two classes with the plan's head, site-b segments
 * three classes and site-c classifies cases by lesion size, each with its own head from its task.yaml. Every
 * round closes, each head keeps its own shape in the site's local file, and the wire audit shows that only the
 * encoder's tensors left any site.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, type TestFederation } from '../helpers/federation.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writeClassificationPhantomSite, writeTissuePhantomSite } from '../../site-agent/data/phantom-classification.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';
import { metricsTable } from '../../cli/status.ts';

const PLAN = [
  'name: per-site-heads',
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], numClasses: 2, seed: 5 }',
  'rounds: 2',
  'minSites: 3',
  'roundDeadlineSeconds: 90',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 3, batchSize: 2, learningRate: 0.005 }',
  'share: { parts: [encoder], keepLocal: [] }',
  '',
].join('\n');

/** site-a: the plan's head (no task file); site-b and site-c: their own. */
const TASKS: Record<string, string | undefined> = {
  'site-a': undefined,
  'site-b': 'description: air, lesion, body\nhead: segmentation\nnumClasses: 3\n',
  'site-c': 'description: lesion size class (none, small, large)\nhead: classification\nnumClasses: 3\ndropout: 0.1\n',
};

describe('federated pretraining with per-site heads (segmentation 2 and 3 classes, classification)', () => {
  let fed: TestFederation;
  const plan = parsePlan(PLAN);
  const arch = architectureFor(plan.model);
  const shared = sharedParams(arch, plan.share).map((p) => p.name).sort();

  beforeAll(async () => {
    fed = await makeFederation({
      sites: 3,
      plan: PLAN,
      writeData: async (dir, name, i) => {
        const common = { siteName: name, size: [16, 16, 16] as const, seed: 100 + i, intensityShift: 20 * i };
        if (name === 'site-a') await writePhantomSite(dir, { ...common, cases: 4, valCases: 2 });
        else if (name === 'site-b') await writeTissuePhantomSite(dir, { ...common, cases: 4, valCases: 2 });
        else await writeClassificationPhantomSite(dir, { ...common, cases: 6, valCases: 3, classes: 3 });
      },
    });
    await fed.startCoordinator();
    await fed.enrollAll();
    for (const [site, yaml] of Object.entries(TASKS)) if (yaml) writeFileSync(join(fed.siteDir(site), 'task.yaml'), yaml);
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 150_000)));
    expect(codes).toEqual([0, 0, 0]);
  }, 200_000);

  afterAll(() => fed?.killAll());

  it('closes every round with all three sites, and the global model is exactly the shared encoder', () => {
    const store = fed.store();
    const rounds = store.listRounds();
    expect(rounds.map((r) => [r.round, r.state, [...r.selected].sort()])).toEqual([
      [1, 'closed', fed.sites],
      [2, 'closed', fed.sites],
    ]);
    const current = store.getMeta('current_model')!;
    const model = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${current}.safetensors`))).bundle;
    expect([...model.keys()].sort()).toEqual(shared);
    expect(shared.every((n) => n.startsWith('encoder.'))).toBe(true);
    store.close();
  });

  it('each site keeps its own head, with its own shape, in its local file', () => {
    const heads = Object.fromEntries(
      fed.sites.map((site) => {
        const files = readdirSync(join(fed.siteDir(site), 'local')).filter((f) => f.startsWith('med3d-') && f.endsWith('.safetensors'));
        expect(files).toHaveLength(1);
        const local = decodeSafetensors(readFileSync(join(fed.siteDir(site), 'local', files[0]))).bundle;
        expect([...local.keys()].every((n) => n.startsWith('head.'))).toBe(true);
        return [site, local];
      }),
    );
    // Segmentation output layer [1, 1, 1, channels, classes]: 2 classes at site-a (the plan's), 3 at site-b.
    expect(heads['site-a'].get('head.conv_seg.6.weight')!.shape).toEqual([1, 1, 1, 2, 2]);
    expect(heads['site-b'].get('head.conv_seg.6.weight')!.shape).toEqual([1, 1, 1, 2, 3]);
    // Classification: dense from the 32 layer4 features to 3 size classes, and no segmentation head at all.
    expect(heads['site-c'].get('head.fc.weight')!.shape).toEqual([32, 3]);
    expect(heads['site-c'].get('head.fc.bias')!.shape).toEqual([3]);
    expect([...heads['site-c'].keys()].some((n) => n.includes('conv_seg'))).toBe(false);
    for (const site of ['site-b', 'site-c']) expect(readFileSync(fed.logPath(site), 'utf8')).toContain('site task file: this site trains its own');
  });

  it('sent nothing but the encoder from any site: the same tensor names whatever the site\'s head', () => {
    for (const site of fed.sites) {
      const calls = readFileSync(join(fed.work, 'logs', `${site}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      const uploads = calls.filter((c) => c.method.endsWith('/UploadUpdate'));
      expect(uploads.length).toBe(2);
      for (const u of uploads) {
        const tensors = u.payload!.tensors as { name: string }[];
        expect(tensors.map((t) => t.name).sort()).toEqual(shared);
      }
    }
  });

  it('the classification site reports accuracy, the segmentation sites Dice (three classes at site-b), and status shows both', () => {
    const store = fed.store();
    const metrics = store.listMetrics();
    const get = (round: number, site: string, key: string) => metrics.find((m) => m.round === round && m.site === site && m.key === key)?.value;
    for (const round of [1, 2]) {
      const acc = get(round, 'site-c', 'val_accuracy');
      expect(acc).toBeGreaterThanOrEqual(0);
      expect(acc).toBeLessThanOrEqual(1);
      expect(get(round, 'site-c', 'num_val')).toBe(3);
      expect(get(round, 'site-c', 'val_dice_mean')).toBeUndefined();
      for (const k of [0, 1, 2]) expect(get(round, 'site-c', `val_recall_class_${k}`)).toBeGreaterThanOrEqual(0);
      expect(get(round, 'site-a', 'val_dice_mean')).toBeGreaterThanOrEqual(0);
      expect(get(round, 'site-a', 'val_dice_class_2')).toBeUndefined();
      expect(get(round, 'site-b', 'val_dice_class_2')).toBeGreaterThanOrEqual(0);
      expect(get(round, 'site-a', 'val_accuracy')).toBeUndefined();
    }
    const table = metricsTable(metrics);
    expect(table).toContain('val acc');
    const row = table.split('\n').find((l) => l.includes(' 2 ') && l.includes('site-c'))!;
    expect(row).toContain(get(2, 'site-c', 'val_accuracy')!.toFixed(3));
    store.close();
  });
});
