/**
 * Hooks of the round lifecycle that features plug into (teacher promotion, DP accounting, retention, …), so the
 * round engine keeps only the lifecycle itself and a new feature is a module of its own, listed in features/index.ts
 * (or passed to the engine as `features`), with no edit of the engine.
 *
 * Order of the calls for one round: onRoundOpening → onRoundOpened → taskSettings (each task sent) →
 * onUpdateAccepted (each update) → beforeCommit (inside the close, before its transaction) → onRoundClosed (after
 * the commit and the round.closed announcement); or onRoundFailed instead of the last two. Features are called in
 * the order they are listed. A hook that throws in beforeCommit fails the close (it is retried like a storage
 * failure); one that throws in onRoundClosed is logged and the rounds go on.
 */
import type { EventBus, FederationEvent, FederationEventType } from '../../shared/events/bus.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { AggregationStrategy } from '../aggregation/strategy.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { CoordinatorStore, RoundRow, UpdateRow } from '../store/store.ts';
import type { Stage } from './pretraining-stage.ts';

/** What a feature may use: the engine's collaborators, read as they are (features keep their own state). */
export interface RoundFeatureContext {
  readonly store: CoordinatorStore;
  readonly models: ModelFiles;
  readonly plan: Plan;
  readonly architecture: ModelArchitecture;
  readonly strategy: AggregationStrategy;
  readonly bus: EventBus;
  readonly federationId: string;
  readonly log: Logger;
  /** An event with its stable id (the same fact written twice is one outbox row). */
  event(type: FederationEventType, fields: Record<string, unknown>): FederationEvent;
}

/** A round as features see it. */
export interface RoundView {
  readonly row: RoundRow;
  /** Pretraining or fine-tuning, fixed when the round opened. */
  readonly stage: Stage;
  /** Sites whose update (or masked input) is in the aggregate. */
  readonly reported: ReadonlySet<string>;
  /** The round runs secure aggregation (the coordinator never sees a single update). */
  readonly secureAggregation: boolean;
}

/** What a feature adds to a round's close; all of it is committed in the close's one transaction. */
export interface CloseContribution {
  /** Store meta values. */
  meta?: Record<string, string>;
  /** Fields of the round.closed event. */
  closedFields?: Record<string, unknown>;
  /** Fields of the "round closed" log line. */
  logFields?: Record<string, unknown>;
  /** Further events, published after round.closed. */
  events?: FederationEvent[];
}

/** The new global model version a close publishes. */
export interface NewVersion {
  readonly hash: string;
}

export interface RoundFeature {
  /** Names the feature in log lines about it. */
  readonly name: string;
  /** The engine starts, before any round resumes or opens: restore what the feature carries across restarts. */
  start?(): void;
  /** The state committed in the store may differ from what the feature holds (a close failed, an operator rolled back): reload it. */
  reload?(): void;
  /** A round is about to open in `stage`, before its aggregator begins (the strategy may still be changed). */
  onRoundOpening?(round: number, stage: Stage): void;
  /** A round opened and was announced (not called for a round resumed after a restart). */
  onRoundOpened?(round: RoundView): void;
  /** Settings this feature adds to a round's task, for a round starting from `baseModelHash` in `stage`. */
  taskSettings?(baseModelHash: string, stage: Stage): Partial<TaskSettings>;
  /** An update was stored, acknowledged and folded (before its update.accepted announcement). */
  onUpdateAccepted?(update: UpdateRow, round: RoundView): void;
  /** The aggregate passed its checks and was saved as `version`; returns what goes into the close's transaction. */
  beforeCommit?(round: RoundView, version: NewVersion): CloseContribution | undefined;
  /** The close was committed and announced; `contribution` is what beforeCommit returned. */
  onRoundClosed?(round: RoundView, version: NewVersion, contribution: CloseContribution | undefined): void;
  /** The round failed (deadline without quorum, secure aggregation, an aggregate not published) and was announced. */
  onRoundFailed?(round: RoundView, reason: string): void;
}
