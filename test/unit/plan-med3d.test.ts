import { describe, expect, it } from 'vitest';
import { parsePlan, PlanError } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';

describe('plan: med3d model and optimiser', () => {
  it('builds MedicalNet from the plan, with defaults for what is left out', () => {
    const plan = parsePlan('model: { architecture: med3d, depth: 18, shortcut: A, patch: [32, 32, 32] }\nlocal: { optimizer: { kind: sgd, groups: [{ select: { part: head }, lrScale: 100 }] } }\n');
    expect(plan.model).toMatchObject({ architecture: 'med3d', depth: 18, shortcut: 'A', widthMultiplier: 0.25, head: 'segmentation' });
    expect(plan.local.optimizer).toMatchObject({ kind: 'sgd', momentum: 0.9, groups: [{ select: { part: 'head' }, lrScale: 100 }] });
    const arch = architectureFor(plan.model);
    expect(arch.id).toBe('med3d');
    expect(arch.params().find((p) => p.name === 'encoder.layer1.1.conv2.weight')?.shape).toEqual([3, 3, 3, 16, 16]);
    const cls = architectureFor(parsePlan('model: { architecture: med3d, head: classification, numClasses: 4, dropout: 0.3 }').model);
    expect(cls.params().filter((p) => p.part === 'head').map((p) => p.name)).toEqual(['head.fc.weight', 'head.fc.bias']);
  });

  it('refuses combinations that cannot work, naming the line and the fix', () => {
    const bad = (text: string) => {
      try {
        parsePlan(text, 'p.yaml');
      } catch (e) {
        expect(e).toBeInstanceOf(PlanError);
        return (e as Error).message;
      }
      throw new Error('plan was accepted');
    };
    expect(bad('model: { architecture: tiny3d }\nlocal:\n  optimizer: { kind: sgd }\n')).toMatch(/p\.yaml:3: local\.optimizer: applies to model\.architecture med3d/);
    expect(bad('model:\n  architecture: med3d\n  patch: [20, 24, 24]\n')).toMatch(/p\.yaml:3: model\.patch: .*multiples of 8/);
    expect(bad('model: { architecture: med3d, depth: 12 }')).toMatch(/model\.depth/);
    expect(bad('local: { optimizer: { kind: rmsprop } }')).toMatch(/local\.optimizer\.kind/);
  });

  it('keeps BatchNorm at the sites by default (FedBN) for a Med3D BatchNorm encoder, and only where the plan says nothing', () => {
    expect(parsePlan('model: { architecture: med3d }').share.keepLocal).toEqual(['norm']);
    expect(parsePlan('model: { architecture: med3d }\nshare: { parts: [encoder] }').share.keepLocal).toEqual(['norm']);
    expect(parsePlan('model: { architecture: med3d }\nshare: { keepLocal: [] }').share.keepLocal).toEqual([]);
    expect(parsePlan('model: { architecture: med3d, norm: group }').share.keepLocal).toEqual([]);
    expect(parsePlan('model: { architecture: tiny3d }').share.keepLocal).toEqual([]);
  });
});

