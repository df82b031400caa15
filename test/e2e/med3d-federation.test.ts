/**
 * The Med3D encoder in a real federation: a coordinator and two site processes train MedicalNet's
 * ResNet-10 (tiny width) with segmentation heads kept at the sites and BatchNorm kept local (FedBN),
 * over TLS + tokens. The wire audit shows that only the encoder's conv weights left the sites.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeFederation, exited, type TestFederation } from '../helpers/federation.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';

const PLAN = [
  'name: med3d-federation',
  'model: { architecture: med3d, depth: 10, shortcut: B, widthMultiplier: 0.0625, patch: [16, 16, 16], numClasses: 2, seed: 5 }',
  'rounds: 2',
  'minSites: 2',
  'roundDeadlineSeconds: 90',
  'waitForSitesSeconds: 60',
  'gatherSeconds: 10',
  'local: { steps: 3, batchSize: 2, learningRate: 0.005, optimizer: { kind: sgd, momentum: 0.9, groups: [{ select: { part: head }, lrScale: 10 }] } }',
  'share: { parts: [encoder], keepLocal: [norm] }',
  '',
].join('\n');

describe('a Med3D federation (FedBN, heads at the sites)', () => {
  let fed: TestFederation;
  const plan = parsePlan(PLAN);
  const arch = architectureFor(plan.model);

  beforeAll(async () => {
    fed = await makeFederation({ sites: 2, plan: PLAN });
    await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => fed.startSite(s, ['--audit-wire', join(fed.work, 'logs', `${s}.wire.jsonl`)]));
    const codes = await Promise.all(agents.map((a) => exited(a, 150_000)));
    expect(codes).toEqual([0, 0]);
  });

  afterAll(() => fed?.killAll());

  it('closes both rounds and the global model holds exactly the shared encoder convolutions', () => {
    const store = fed.store();
    const rounds = store.listRounds();
    expect(rounds.map((r) => [r.round, r.state])).toEqual([
      [1, 'closed'],
      [2, 'closed'],
    ]);
    const current = store.getMeta('current_model')!;
    const model = decodeSafetensors(readFileSync(join(fed.coordDir, 'models', `${current}.safetensors`))).bundle;
    const shared = sharedParams(arch, plan.share);
    expect(shared.every((p) => p.part === 'encoder' && p.layerType === 'conv')).toBe(true);
    expect([...model.keys()].sort()).toEqual(shared.map((p) => p.name).sort());
    store.close();
  });

  it('sites report the Med3D engine and kept their heads and BatchNorm layers locally', () => {
    for (const site of fed.sites) {
      const log = readFileSync(fed.logPath(site), 'utf8');
      expect(log).toMatch(/"engine":"(onednn|js)","architecture":"med3d"/);
      const localDir = readdirSync(fed.siteDir(site), { recursive: true }).map(String).filter((f) => f.endsWith('.safetensors') && f.includes('med3d-') && !f.includes('optimizer-state'));
      expect(localDir.length).toBe(1);
      const local = decodeSafetensors(readFileSync(join(fed.siteDir(site), localDir[0]))).bundle;
      expect(local.has('head.conv_seg.6.weight')).toBe(true);
      expect(local.has('encoder.bn1.running_var')).toBe(true);
      expect(local.has('encoder.conv1.weight')).toBe(false);
    }
  });

  it('a site scores the final global model with its own head on a labelled folder (`medfl site evaluate`), and refuses a plan it did not train under', async () => {
    const { execFileSync, spawnSync } = await import('node:child_process');
    const { writeFileSync } = await import('node:fs');
    const { MEDFL_BIN } = await import('../../cli/processes.ts');
    const store = fed.store();
    const model = join(fed.coordDir, 'models', `${store.getMeta('current_model')!}.safetensors`);
    store.close();
    const planFile = join(fed.work, 'plan-copy.yaml');
    writeFileSync(planFile, PLAN);
    const site = fed.sites[0];
    // The site's own data folder holds labelled imagesTs/labelsTs: score on those.
    const out = execFileSync(process.execPath, [MEDFL_BIN, 'site', 'evaluate', '--dir', fed.siteDir(site), '--data', fed.dataDir(site), '--test', fed.dataDir(site), '--model', model, '--plan', planFile], { encoding: 'utf8', env: { ...process.env, MEDFL_LOG_LEVEL: 'warn' } });
    expect(out).toMatch(/^test Dice [01]\.\d{4} \(per class: [01]\.\d{4}\) on \d+ case\(s\)$/m);
    const other = join(fed.work, 'plan-other.yaml');
    writeFileSync(other, PLAN.replace('widthMultiplier: 0.0625', 'widthMultiplier: 0.125'));
    const bad = spawnSync(process.execPath, [MEDFL_BIN, 'site', 'evaluate', '--dir', fed.siteDir(site), '--data', fed.dataDir(site), '--test', fed.dataDir(site), '--model', model, '--plan', other], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/no local tensors for the plan's model/);
  }, 60_000);

  it('sent nothing but the encoder convolutions (no head, no BatchNorm) from any site', () => {
    const shared = sharedParams(arch, plan.share).map((p) => p.name).sort();
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
});
