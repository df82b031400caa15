/**
 * The plan's stages as the round engine sees them: with `pretraining.enabled`, the first `pretraining.rounds`
 * closed rounds are self-supervised pretraining rounds, the next `rounds` are fine-tuning rounds. A round's stage
 * follows from how many rounds had closed when it opened (failed rounds do not count), so a restarted coordinator
 * finds the same stage for its open round.
 */
import type { Plan } from '../../shared/plan/schema.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';

export interface Stage {
  readonly kind: 'pretraining' | 'fine-tuning';
  /** 1-based round number within the stage. */
  readonly index: number;
}

/** Store meta key: sites whose updates went into a pretraining round (JSON array), written at each such close. */
export const PRETRAINING_SITES_KEY = 'pretraining_sites';
/** Store meta key: the encoder file written when pretraining ended (JSON: path and provenance). */
export const PRETRAINED_ENCODER_KEY = 'pretrained_encoder';

export function pretrainingRounds(plan: Plan): number {
  return plan.pretraining.enabled ? plan.pretraining.rounds : 0;
}

/** Every round the plan runs: pretraining, then fine-tuning. */
export function plannedRounds(plan: Plan): number {
  return pretrainingRounds(plan) + plan.rounds;
}

/** The stage of a round that opens after `closed` rounds have closed. */
export function stageAfter(plan: Plan, closed: number): Stage {
  const p = pretrainingRounds(plan);
  return closed < p ? { kind: 'pretraining', index: closed + 1 } : { kind: 'fine-tuning', index: closed - p + 1 };
}

/** What a task of this stage adds to the settings: the pretraining objective, or the fine-tuning round offset. */
export function stageSettings(plan: Plan, stage: Stage): Pick<TaskSettings, 'pretraining' | 'roundOffset'> {
  const p = pretrainingRounds(plan);
  if (stage.kind === 'fine-tuning') return p > 0 ? { roundOffset: p } : {};
  const { enabled: _enabled, ...pretraining } = plan.pretraining;
  return { pretraining: { ...pretraining, transforms: { ...pretraining.transforms }, round: stage.index } };
}

/** The union of the sites so far (stored JSON) and this round's, sorted. */
export function addPretrainingSites(stored: string | undefined, sites: Iterable<string>): string {
  const before = stored ? (JSON.parse(stored) as string[]) : [];
  return JSON.stringify([...new Set([...before, ...sites])].sort());
}
