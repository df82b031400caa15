/**
 * The architecture registry is the one list the plan schema, the plan defaults and the trainer factory read: every
 * registered definition builds the architecture it names from a default plan, an unregistered name is refused
 * everywhere with the names there are, and FedBN's default follows the norm layer's running statistics.
 */
import { describe, expect, it } from 'vitest';
import { normLayer, NORM_KINDS } from '../../shared/model/layers/norm-layers.ts';
import { MODEL_IDS, MODELS, modelDefinition } from '../../shared/model/registry.ts';
import { createTrainer } from '../../shared/model/trainer-factory.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import { defaultPlan, parsePlan } from '../../shared/plan/load.ts';

describe('model registry', () => {
  it('lists every architecture once; each definition builds its own id from a default plan and passes its own checks', () => {
    expect(new Set(MODEL_IDS).size).toBe(MODELS.length);
    expect(MODEL_IDS).toEqual(['tiny3d', 'med3d']);
    for (const def of MODELS) {
      const plan = defaultPlan({ model: { architecture: def.id, patch: [16, 16, 16] } });
      expect(def.create(plan.model).id).toBe(def.id);
      expect(def.modelProblems(plan.model)).toEqual([]);
      expect(def.planProblems(plan)).toEqual([]);
    }
  });

  it('refuses an unregistered architecture in the plan, by definition lookup and in the trainer factory', async () => {
    expect(() => parsePlan('model: { architecture: unet3d }', 'p.yaml')).toThrow(/p\.yaml:1: model\.architecture: .*"tiny3d".*"med3d"/);
    expect(() => modelDefinition('unet3d')).toThrow('unknown model architecture "unet3d" (registered: tiny3d, med3d)');
    const stray = { ...modelDefinition('tiny3d').create(defaultPlan().model), id: 'unet3d' } as ModelArchitecture;
    await expect(createTrainer(stray)).rejects.toThrow(/unknown model architecture "unet3d"/);
  });

  it('keeps norm layers local by default exactly when they have running statistics (FedBN)', () => {
    expect(NORM_KINDS).toEqual(['batch', 'group', 'instance']);
    for (const norm of NORM_KINDS) {
      const keep = parsePlan(`model: { architecture: med3d, norm: ${norm} }`).share.keepLocal;
      expect(keep).toEqual(normLayer(norm).runningStatistics ? ['norm'] : []);
    }
    expect(parsePlan('model: { architecture: med3d, norm: instance }').model.norm).toBe('instance');
    expect(() => parsePlan('model: { architecture: med3d, norm: layer }', 'p.yaml')).toThrow(/model\.norm: .*"batch".*"group".*"instance"/);
    expect(() => normLayer('layer')).toThrow('unknown norm layer "layer" (one of batch, group, instance)');
  });
});
