/**
 * Task settings as the coordinator sends them for a plan: for tests that drive a site's LocalTraining directly, with
 * no coordinator. `extra` adds or replaces fields (teacherStudent, teacher, …).
 */
import type { Plan } from '../../shared/plan/schema.ts';
import { TaskSettingsSchema, type TaskSettings } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';

export function taskSettingsFor(plan: Plan, extra: Record<string, unknown> = {}): TaskSettings {
  return TaskSettingsSchema.parse({
    federation: 'f',
    model: { ...plan.model, pretrained: undefined, source2d: undefined },
    local: plan.local,
    share: plan.share,
    sharedTensors: sharedParams(architectureFor(plan.model), plan.share).map((p) => p.name),
    data: plan.data,
    ...extra,
  });
}
