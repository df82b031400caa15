/**
 * Hooks of the round lifecycle that features plug into (teacher promotion, DP accounting, retention, …), so the
 * round engine keeps only the lifecycle itself and a new feature is a module of its own, listed in features/index.ts
 * (or passed to the engine as `features`), with no edit of the engine.
 *
 * Order of the calls for one round: onRoundOpening → collectInput (once the round is stored as open) →
 * onRoundOpened → taskSettings (each task sent) → onUpdateAccepted (each update) → beforeCommit (inside the close,
 * before its transaction) → onRoundClosed (after the commit and the round.closed announcement); or onRoundFailed
 * instead of the last two. An open round found at start-up is first offered to resumeRefusal. Features are called
 * in the order they are listed. A hook that throws in beforeCommit fails the close (it is retried like a storage
 * failure); one that throws in onRoundClosed is logged and the rounds go on.
 */
import type { EventBus, FederationEvent, FederationEventType } from '../../shared/events/bus.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { ModelArchitecture } from '../../shared/model/types.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
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
  /** The feature that collects this round's input instead of uploads (see RoundInput); absent: sites upload updates. */
  readonly inputCollectedBy?: string;
}

/**
 * A round whose input a feature collects itself instead of taking uploads (secure aggregation's masked inputs, where
 * the coordinator never sees a single update). Such input lives in the feature's memory, not in the store, so the
 * engine refuses uploads (saying why), offers no task again and counts no declines (the feature decides who takes
 * part), hands the deadline to the feature, and fails the round where an upload round would be rebuilt from its
 * stored updates (a failed close, a restart: see resumeRefusal).
 */
export interface RoundInput {
  /** Why an upload to this round is refused. */
  uploadRefusal(site: string): string;
  /** What `site`'s task must add to take part (merged after every feature's taskSettings). */
  siteSettings(site: string): Partial<TaskSettings>;
  /** The deadline came before the input was complete: end the collection, failing the round through its control. */
  deadlineReached(): void;
  /** The round is dropped without a result (the coordinator stops, an operator rolled back): release what it holds. */
  abort(reason: string): void;
  /** The round's failure note when its result could not be stored (`error`) and the input cannot be collected again. */
  lostResultNote(error: string): string;
}

/** Several sites' weighted updates summed, as a collected input hands them to the aggregator. */
export interface SummedInput {
  /** Σ wᵢΔᵢ over the shared tensors. */
  readonly sum: TensorBundle;
  /** Σ wᵢ. */
  readonly weight: number;
  /** The sites whose updates are in the sum: they count as reported. */
  readonly sites: readonly string[];
}

/** What the engine lets the feature collecting a round's input do with that round. */
export interface RoundInputControl {
  /** The round still takes input: it is the open round and is neither closing nor failed. */
  isAccepting(): boolean;
  /**
   * Folds a sum into the round's aggregate in the engine's fold queue (one model-sized fold at a time, so `make`
   * decodes it only in its turn). False when the round no longer takes input; rejects when the aggregation strategy
   * cannot take a sum.
   */
  foldSum(make: () => SummedInput): Promise<boolean>;
  /** Closes the round on what was folded; `why` goes into its round.closed event. Never rejects. */
  close(why: string): Promise<void>;
  /** Fails the round with `note` and opens the next one; nothing once the round closes, fails or the engine stops. */
  fail(note: string): void;
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
  /**
   * The round `round` was stored as open, before its announcement and tasks: return a RoundInput to collect its input
   * instead of uploads, through `control`. The first feature that returns one collects it; the others are not asked.
   */
  collectInput?(round: RoundView, control: RoundInputControl): RoundInput | undefined;
  /**
   * A round found open at start-up (`row`): why it cannot be resumed (its input was in memory only), or undefined.
   * The first reason given fails the round with it, and a new round opens.
   */
  resumeRefusal?(row: RoundRow): string | undefined;
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
  /** The round failed (deadline without quorum, its collected input failed, an aggregate not published, not resumable) and was announced. */
  onRoundFailed?(round: RoundView, reason: string): void;
}
