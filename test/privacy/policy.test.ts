import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PolicyError, PRIVACY_SPENT_FILE, SitePolicy, parsePolicy } from '../../site-agent/policy.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { RdpAccountant } from '../../shared/privacy/rdp-accountant.ts';
import { architectureFor } from '../../shared/model/registry.ts';

const FED = 'fed-1';

function settings(o: Partial<TaskSettings> = {}): TaskSettings {
  return {
    federation: FED,
    model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 1, init: 'scratch' },
    local: { steps: 2, batchSize: 2, learningRate: 0.01, proximalMu: 0 },
    share: { parts: ['encoder'], keepLocal: [] },
    sharedTensors: [],
    ...o,
  } as TaskSettings;
}

function siteDir(policy?: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-policy-'));
  if (policy !== undefined) writeFileSync(join(dir, 'policy.yaml'), policy);
  return dir;
}

describe('site policy', () => {
  it('reports invalid policy files with file and line', () => {
    const text = ['dp:', '  required: yes-please', 'share:', '  parts: [encoder, liver]', 'maxRound: 3', ''].join('\n');
    let err: unknown;
    try {
      parsePolicy(text, 'policy.yaml');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(PolicyError);
    const msg = (err as Error).message;
    expect(msg).toMatch(/policy\.yaml:2: dp\.required/);
    expect(msg).toMatch(/policy\.yaml:4: share\.parts\.1/);
    expect(msg).toMatch(/policy\.yaml:5: \(top level\).*maxRound/);
    expect(() => SitePolicy.load(siteDir(text), FED)).toThrow(/policy\.yaml:2/);
  });

  it('no policy file: encoder-only tasks are accepted, a task sharing the head is declined (default-deny)', () => {
    const p = SitePolicy.load(siteDir(), FED);
    const v = p.admit({ taskId: 't1', round: 1 }, settings({ share: { parts: ['encoder', 'head'], keepLocal: [] } }));
    expect(v.ok).toBe(false);
    expect(!v.ok && v.reason).toMatch(/shares part\(s\) head, but site policy lets only encoder leave \(the default/);
    expect(p.admit({ taskId: 't2', round: 1 }, settings())).toEqual({ ok: true });
  });

  it('requires DP and says why a non-DP task is refused', () => {
    const p = SitePolicy.load(siteDir('dp: { required: true }\n'), FED);
    const v = p.admit({ taskId: 't1', round: 1 }, settings());
    expect(v.ok).toBe(false);
    expect(!v.ok && v.reason).toMatch(/requires differential privacy.*aggregation\.dp/);
    expect(p.admit({ taskId: 't2', round: 1 }, settings({ dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } })).ok).toBe(true);
  });

  it('restricts parts and layer types that may leave', () => {
    const p = SitePolicy.load(siteDir('share: { parts: [encoder], keepLocal: [norm] }\n'), FED);
    const both = p.check({ taskId: 't', round: 1 }, settings({ share: { parts: ['encoder', 'head'], keepLocal: ['norm'] } }));
    expect(!both.ok && both.reason).toMatch(/shares part\(s\) head/);
    const bn = p.check({ taskId: 't', round: 1 }, settings({ share: { parts: ['encoder'], keepLocal: [] } }));
    expect(!bn.ok && bn.reason).toMatch(/layer type\(s\) norm local/);
    expect(p.check({ taskId: 't', round: 1 }, settings({ share: { parts: ['encoder'], keepLocal: ['norm', 'dense'] } })).ok).toBe(true);
  });

  it('checks the tensors the task actually asks for, not only its share spec', () => {
    const arch = architectureFor(settings().model);
    const head = arch.params().find((p) => p.part === 'head')!;
    const conv = arch.params().find((p) => p.part === 'encoder' && p.layerType === 'conv')!;
    const p = SitePolicy.load(siteDir('share: { parts: [encoder] }\n'), FED);
    const spec = { parts: ['encoder' as const], keepLocal: [] };
    expect(p.check({ taskId: 't', round: 1 }, settings({ share: spec, sharedTensors: [conv.name] })).ok).toBe(true);
    const sneaky = p.check({ taskId: 't', round: 1 }, settings({ share: spec, sharedTensors: [conv.name, head.name, 'bogus'] }));
    expect(sneaky.ok).toBe(false);
    expect(!sneaky.ok && sneaky.reason).toContain(`${head.name} (part head)`);
    expect(!sneaky.ok && sneaky.reason).toContain('bogus (not a parameter of tiny3d)');
    // A spec that claims to keep a layer type local while the list still sends it.
    const q = SitePolicy.load(siteDir('share: { keepLocal: [conv] }\n'), FED);
    const lying = q.check({ taskId: 't', round: 1 }, settings({ share: { parts: ['encoder'], keepLocal: ['conv'] }, sharedTensors: [conv.name] }));
    expect(!lying.ok && lying.reason).toContain(`${conv.name} (layer type conv)`);
  });

  it('caps ε with its own accountant, persisted across restarts; a re-sent task is not counted twice', () => {
    const dir = siteDir('dp: { maxEpsilon: 8, delta: 1.0e-5 }\n');
    const dp = { clipNorm: 1, noiseMultiplier: 2, delta: 1e-5 };
    // Expected number of rounds from the accountant itself: q = 1 (the policy's default sampling rate).
    const acc = new RdpAccountant();
    let allowed = 0;
    for (;;) {
      acc.step(1, 2);
      if (acc.epsilon(1e-5).epsilon > 8) break;
      allowed++;
    }
    expect(allowed).toBeGreaterThan(1);
    let p = SitePolicy.load(dir, FED);
    for (let r = 1; r <= allowed; r++) {
      if (r === 2) p = SitePolicy.load(dir, FED); // agent restart in between
      const v = p.admit({ taskId: `r${r}`, round: r }, settings({ dp }));
      expect(v.ok).toBe(true);
      expect(p.admit({ taskId: `r${r}`, round: r }, settings({ dp })).ok).toBe(true); // same task again
    }
    expect(p.spentEpsilon()).toBeLessThanOrEqual(8);
    const refused = SitePolicy.load(dir, FED).admit({ taskId: 'next', round: allowed + 1 }, settings({ dp }));
    expect(refused.ok).toBe(false);
    expect(!refused.ok && refused.reason).toMatch(/above its cap 8/);
    const stored = JSON.parse(readFileSync(join(dir, PRIVACY_SPENT_FILE), 'utf8'));
    expect(stored.rounds).toHaveLength(allowed);
    expect(stored.accountant.steps).toBe(allowed);
  });

  it('a cap on ε refuses non-DP rounds; maxRounds caps participation', () => {
    const p = SitePolicy.load(siteDir('dp: { maxEpsilon: 100 }\nmaxRounds: 2\n'), FED);
    expect(p.check({ taskId: 'x', round: 1 }, settings()).ok).toBe(false);
    const dp = { clipNorm: 1, noiseMultiplier: 5, delta: 1e-5 };
    expect(p.admit({ taskId: 'a', round: 1 }, settings({ dp })).ok).toBe(true);
    expect(p.admit({ taskId: 'b', round: 2 }, settings({ dp })).ok).toBe(true);
    const third = p.admit({ taskId: 'c', round: 3 }, settings({ dp }));
    expect(!third.ok && third.reason).toMatch(/caps participation at 2 round/);
    // a retried round (new task for a round already counted) is not a new round
    expect(p.check({ taskId: 'b2', round: 2 }, settings({ dp })).ok).toBe(true);
  });

  it('a noise multiplier under the site minimum is refused', () => {
    const p = SitePolicy.load(siteDir('{"dp": {"required": true, "minNoiseMultiplier": 1.0}}'), FED);
    const v = p.check({ taskId: 'x', round: 1 }, settings({ dp: { clipNorm: 1, noiseMultiplier: 0.5, delta: 1e-5 } }));
    expect(!v.ok && v.reason).toMatch(/below the site's minimum 1/);
  });
});
