/**
 * Federated self-supervised pretraining in a real federation: a coordinator and two site processes run one
 * restoration pretraining round, then one fine-tuning round from its aggregate (FedBN). The coordinator writes
 * the encoder file with its provenance; each site keeps its restoration decoder and its fine-tuning head in
 * separate local files; the wire audit shows that only the shared encoder tensors left the sites, both times.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, type TestFederation } from '../helpers/federation.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { readPretrainedEncoder } from '../../shared/model/pretrained-encoder-file.ts';
import { initStrategyFromSpec } from '../../shared/model/transfer-init.ts';
import { PRETRAINED_ENCODER_KEY } from '../../coordinator/rounds/pretraining-stage.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';

const PLAN = [
  'name: pretraining-federation',
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], numClasses: 2, head: unet, seed: 5 }',
  'rounds: 1',
  'minSites: 2',
  'roundDeadlineSeconds: 90',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 2, batchSize: 2, learningRate: 0.005 }',
  'share: { parts: [encoder], keepLocal: [norm] }',
  'pretraining: { enabled: true, rounds: 1, steps: 3, learningRate: 0.002 }',
  '',
].join('\n');

describe('federated restoration pretraining, then fine-tuning, over gRPC', () => {
  let fed: TestFederation;
  const plan = parsePlan(PLAN);
  const arch = architectureFor(plan.model);
  const shared = sharedParams(arch, plan.share).map((p) => p.name).sort();

  beforeAll(async () => {
    fed = await makeFederation({ sites: 2, plan: PLAN });
    await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 150_000)));
    expect(codes).toEqual([0, 0]);
  });

  afterAll(() => fed?.killAll());

  it('closes the pretraining round and the fine-tuning round, and writes the encoder file with its provenance', () => {
    const store = fed.store();
    expect(store.listRounds().map((r) => [r.round, r.state])).toEqual([
      [1, 'closed'],
      [2, 'closed'],
    ]);
    const round1 = store.listRounds()[0];
    const recorded = JSON.parse(store.getMeta(PRETRAINED_ENCODER_KEY)!) as { path: string };
    store.close();
    expect(recorded.path.startsWith(join(fed.coordDir, 'pretrained'))).toBe(true);
    const { bundle, provenance } = readPretrainedEncoder(readFileSync(recorded.path));
    expect(provenance).toMatchObject({ objective: 'restoration', sites: fed.sites, rounds: 1, stepsPerRound: 3, sourceModelHash: round1.resultModelHash });
    // FedBN: the norm layers never left the sites, so the file says they are not pretrained.
    expect(provenance!.notPretrained.length).toBeGreaterThan(0);
    expect(provenance!.notPretrained.every((n) => /\.(bn\d|downsample\.1)\./.test(n))).toBe(true);
    const init = initStrategyFromSpec('pretrained').init(arch, { seed: 5, pretrained: bundle });
    expect(init.weights.get('encoder.conv1.weight')!.data).toEqual(bundle.get('encoder.conv1.weight')!.data);
    const coordLog = readFileSync(fed.logPath('coordinator'), 'utf8');
    expect(coordLog).toMatch(/"stage":"pretraining","stageRound":1/);
    expect(coordLog).toMatch(/"stage":"fine-tuning","stageRound":1/);
  });

  it('each site trained the restoration objective, then fine-tuned, keeping decoder and head apart at home', () => {
    for (const site of fed.sites) {
      expect(readFileSync(fed.logPath(site), 'utf8')).toMatch(/pretraining \(restoration\) done/);
      const local = readdirSync(fed.siteDir(site), { recursive: true }).map(String).filter((f) => f.endsWith('.safetensors') && /(^|\/)med3d-/.test(f) && !f.includes('optimizer-state'));
      expect(local.length).toBe(2);
      const decoder = local.find((f) => f.includes('med3d-restoration-'))!;
      const head = local.find((f) => !f.includes('restoration'))!;
      const d = decodeSafetensors(readFileSync(join(fed.siteDir(site), decoder))).bundle;
      const h = decodeSafetensors(readFileSync(join(fed.siteDir(site), head))).bundle;
      expect(d.get('head.dec.cls.weight')!.shape.at(-1)).toBe(1);
      expect(h.get('head.dec.cls.weight')!.shape.at(-1)).toBe(2);
    }
  });

  it('sent nothing but the shared encoder tensors from any site, in either stage', () => {
    for (const site of fed.sites) {
      const calls = readFileSync(join(fed.work, 'logs', `${site}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      const uploads = calls.filter((c) => c.method.endsWith('/UploadUpdate'));
      expect(uploads.length).toBe(2);
      for (const u of uploads) {
        const tensors = u.payload!.tensors as { name: string }[];
        expect(tensors.map((t) => t.name).sort()).toEqual(shared);
      }
      // Metrics carry aggregates only: the restoration loss in the pretraining round.
      const metrics = calls.filter((c) => c.method.endsWith('/ReportMetrics'));
      expect(JSON.stringify(metrics)).toMatch(/restoration_loss/);
    }
  });
});
