/**
 * The teacher of federated noisy-student training (plan teacherStudent): a model version kept beside the
 * current global model. Every `promoteEvery` closed rounds the aggregated student becomes the teacher (a new
 * generation). The state is one store meta value written in the round-close transaction, so a restarted
 * coordinator keeps its teacher.
 */
import type { Plan } from '../../shared/plan/schema.ts';

/** Store meta key of the teacher state. */
export const TEACHER_KEY = 'teacher';

export interface TeacherState {
  readonly modelHash: string;
  readonly generation: number;
  /** The round whose aggregate was promoted. */
  readonly round: number;
}

export function parseTeacher(raw: string | undefined): TeacherState | undefined {
  if (!raw) return undefined;
  const t = JSON.parse(raw) as Partial<TeacherState>;
  if (typeof t.modelHash !== 'string' || typeof t.generation !== 'number' || typeof t.round !== 'number') {
    throw new Error(`stored teacher state is malformed (${raw.slice(0, 80)}); delete the meta key '${TEACHER_KEY}' to start teacher generations afresh`);
  }
  return t as TeacherState;
}

/**
 * The next teacher after `round` closed with model `modelHash`, or undefined when nothing is promoted. After a
 * pretraining stage, `fineTuningRound` (the round's number among the fine-tuning rounds) decides the cadence.
 */
export function promotion(plan: Plan, round: number, modelHash: string, current: TeacherState | undefined, fineTuningRound = round): TeacherState | undefined {
  const ts = plan.teacherStudent;
  if (!ts.enabled || fineTuningRound % ts.promoteEvery !== 0) return undefined;
  if (current && current.round >= round) return undefined;
  return { modelHash, generation: (current?.generation ?? 0) + 1, round };
}
