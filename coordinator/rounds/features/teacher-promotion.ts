/**
 * Federated noisy student (plan teacherStudent): tasks name the teacher once there is one, and a fine-tuning
 * aggregate becomes the teacher every `promoteEvery` rounds, in the round-close transaction (../teacher.ts).
 */
import type { TaskSettings } from '../../../shared/protocol/task.ts';
import { pretrainingRounds, type Stage } from '../pretraining-stage.ts';
import type { CloseContribution, NewVersion, RoundFeature, RoundFeatureContext, RoundView } from '../round-feature.ts';
import { parseTeacher, promotion, TEACHER_KEY } from '../teacher.ts';

export class TeacherPromotion implements RoundFeature {
  readonly name = 'teacher-promotion';

  constructor(private readonly c: RoundFeatureContext) {}

  /** The plan's settings and, once promoted, the teacher's hash (sites download it like the model). */
  taskSettings(_base: string, stage: Stage): Partial<TaskSettings> {
    const ts = this.c.plan.teacherStudent;
    if (!ts.enabled || stage.kind === 'pretraining') return {};
    const t = parseTeacher(this.c.store.getMeta(TEACHER_KEY));
    return { teacherStudent: { ...ts }, ...(t ? { teacher: { modelHash: t.modelHash, modelSize: this.c.models.size(t.modelHash), generation: t.generation } } : {}) };
  }

  beforeCommit(round: RoundView, version: NewVersion): CloseContribution | undefined {
    const { plan, store } = this.c;
    if (round.stage.kind === 'pretraining') return undefined;
    const current = parseTeacher(store.getMeta(TEACHER_KEY));
    const n = round.row.round;
    // After a pretraining stage the cadence counts fine-tuning rounds.
    const teacher = pretrainingRounds(plan) > 0 ? promotion(plan, n, version.hash, current, round.stage.index) : promotion(plan, n, version.hash, current);
    if (!teacher) return undefined;
    return { meta: { [TEACHER_KEY]: JSON.stringify(teacher) }, events: [this.c.event('teacher.promoted', { round: n, model: teacher.modelHash, generation: teacher.generation })] };
  }

  onRoundClosed(round: RoundView, _version: NewVersion, contribution: CloseContribution | undefined): void {
    const promoted = contribution?.events?.[0];
    if (promoted) this.c.log.info({ round: round.row.round, generation: promoted.generation, model: String(promoted.model).slice(0, 12) }, 'student promoted to teacher');
  }
}
