import { describe, expect, it } from 'vitest';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { initialWeights } from '../../coordinator/models/initial-model.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { pick } from '../../shared/model/sharing.ts';

const log = pino({ level: 'silent' });

describe("the first global model follows the plan's model.init", () => {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-init-'));
  const planText = (init: string, extra = '') => `model: { architecture: tiny3d, patch: [8, 8, 8], width: 2, seed: 4, init: ${init}${extra} }\n`;

  it('scratch: the architecture init at the plan seed', async () => {
    const plan = parsePlan(planText('scratch'));
    const arch = architectureFor(plan.model);
    const w = await initialWeights(arch, plan, join(dir, 'plan.yaml'), log);
    expect([...w.get('encoder.stem.conv.weight')!.data]).toEqual([...arch.init(4).get('encoder.stem.conv.weight')!.data]);
  });

  it('pretrained: the encoder comes from the file named relative to the plan', async () => {
    const plan = parsePlan(planText('pretrained', ', pretrained: weights/pre.safetensors'));
    const arch = architectureFor(plan.model);
    const source = arch.init(99);
    const encoder = pick(source, arch.params().filter((p) => p.part === 'encoder'));
    const { mkdirSync } = await import('node:fs');
    mkdirSync(join(dir, 'weights'), { recursive: true });
    writeFileSync(join(dir, 'weights', 'pre.safetensors'), encodeSafetensors(encoder));
    const w = await initialWeights(arch, plan, join(dir, 'plan.yaml'), log);
    for (const [name, t] of encoder) expect([...w.get(name)!.data]).toEqual([...t.data]);
    // the head is not pretrained
    expect([...w.get('head.out.conv.weight')!.data]).not.toEqual([...source.get('head.out.conv.weight')!.data]);
  });

  it('says what is missing when the plan asks for pretrained weights without a file', async () => {
    const plan = parsePlan(planText('mean-var'));
    await expect(initialWeights(architectureFor(plan.model), plan, join(dir, 'plan.yaml'), log)).rejects.toThrow(/needs model.pretrained/);
    const plan2 = parsePlan(planText('pretrained', ', pretrained: nowhere.safetensors'));
    await expect(initialWeights(architectureFor(plan2.model), plan2, join(dir, 'plan.yaml'), log)).rejects.toThrow(/no file at .*nowhere/);
  });

  it('refuses an unknown init in the plan, listing the choices', () => {
    expect(() => parsePlan(planText('imagenet'), 'p.yaml')).toThrow(/p\.yaml:1: model\.init: init must be one of scratch, pretrained, partial:<k>, mean-var/);
  });
});
