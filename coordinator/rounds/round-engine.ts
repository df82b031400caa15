/**
 * The round engine: opens rounds when a quorum of sites is connected, pushes tasks, folds accepted
 * updates into the running aggregate, and closes each round when every selected site reported or,
 * at the deadline, when the quorum did. All state that matters is in the store before anything is
 * acknowledged, so a restarted coordinator resumes the same round by re-folding its accepted updates.
 *
 * This class is the lifecycle only; each concern is a module of its own: which site gets which task
 * (task-offers.ts), taking uploads (upload-intake.ts, fold-queue.ts), when a round may open
 * (opening-quorum.ts) and when it ends (round-deadline.ts), the close itself (round-close.ts), resume after a
 * restart (round-recovery.ts), storage-failure retries (storage-retries.ts), rollbacks (rollback-announcer.ts)
 * and the features' hooks (feature-hooks.ts).
 */
import type { RoundRow, UpdateRow } from '../store/store.ts';
import type { BatchItem, Verdict } from '../aggregation/strategy.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';
import type { ParamInfo } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { plannedRounds } from './pretraining-stage.ts';
import type { SiteCapabilities } from '../../shared/protocol/features.ts';
import { RefusalWarnings } from '../events/refusal-warnings.ts';
import type { RoundFeature, RoundFeatureContext, RoundInputControl } from './round-feature.ts';
import { standardRoundFeatures } from './features/index.ts';
import { BUDGET_EXHAUSTED_EVENT, describeRefusal, privacyBudgetRefusal } from './privacy-budget.ts';
import { AggregationState } from './aggregation-state.ts';
import { FeatureHooks } from './feature-hooks.ts';
import { FoldQueue } from './fold-queue.ts';
import { ensureInitialModel } from './initial-model.ts';
import { inputControl } from './input-control.ts';
import { type OpenRound, roundView } from './open-round.ts';
import { OpeningQuorum } from './opening-quorum.ts';
import { RollbackAnnouncer } from './rollback-announcer.ts';
import { RoundClose } from './round-close.ts';
import { deadlineVerdict, earlyCloseReason } from './round-deadline.ts';
import type { RoundEngineOptions } from './round-engine-options.ts';
import { RoundEnding } from './round-ending.ts';
import { RoundEvents } from './round-events.ts';
import { RoundOpening } from './round-opening.ts';
import { RoundRecovery } from './round-recovery.ts';
import { SiteConnections, type TaskMessage, type TaskSink } from './site-connections.ts';
import { StorageRetries, type StorageFault } from './storage-retries.ts';
import { finishedManifest, REOFFER_MS, TaskOffers, trainManifest } from './task-offers.ts';
import { UploadIntake } from './upload-intake.ts';

export { PRIVACY_KEY, type PrivacySpent } from './features/dp-accounting.ts';
export { AGGREGATION_STATE_KEY } from './aggregation-state.ts';
export { RESUME_GRACE_MARGIN_MS, resumeGraceMs } from './round-recovery.ts';
export type { TaskMessage, TaskSink } from './site-connections.ts';
export { REOFFER_MS } from './task-offers.ts';
export type { RoundEngineOptions } from './round-engine-options.ts';

export class RoundEngine {
  private readonly connections = new SiteConnections();
  private open: OpenRound | undefined;
  private finished = false;
  private stopped = false;
  private rollbackTimer: NodeJS.Timeout | undefined;
  /** Serialises the heavy part of accepting updates (decode + fold), so memory stays at about one model. */
  private readonly folds = new FoldQueue();
  readonly shared: ParamInfo[];
  readonly sharedNames: string[];
  /** What plugs into the round lifecycle (teacher promotion, DP accounting, retention, …), in call order. */
  private readonly features: FeatureHooks;
  private readonly events: RoundEvents;
  private readonly retries: StorageRetries;
  private readonly refusals: RefusalWarnings;
  private readonly ownsRefusals: boolean;
  private readonly aggregationState: AggregationState;
  private readonly quorum: OpeningQuorum;
  private readonly offers: TaskOffers;
  private readonly intake: UploadIntake;
  private readonly recovery: RoundRecovery;
  private readonly opening: RoundOpening;
  private readonly ending: RoundEnding;
  private readonly rollbacks: RollbackAnnouncer;

  constructor(private readonly o: RoundEngineOptions) {
    const { store, models, plan, strategy, log } = o;
    this.refusals = o.refusals ?? new RefusalWarnings(log);
    this.ownsRefusals = o.refusals === undefined;
    const shared = (this.shared = sharedParams(o.architecture, plan.share));
    this.sharedNames = shared.map((p) => p.name);
    const events = (this.events = new RoundEvents(o.federationId, o.bus));
    const context: RoundFeatureContext = { store, models, plan, architecture: o.architecture, strategy, bus: o.bus, federationId: o.federationId, log, event: (type, fields) => events.event(type, fields) };
    const features = (this.features = new FeatureHooks([...standardRoundFeatures(context, o), ...(o.features ?? [])], log));
    const retries = (this.retries = new StorageRetries(log, o.storageRetryMs ?? 10_000));
    const aggregationState = (this.aggregationState = new AggregationState(store, models, strategy, log));
    this.quorum = new OpeningQuorum({ plan, log, connectedCount: () => this.connections.sites().length, retry: () => this.maybeOpenRound() });
    const withheld = (site: string, round: number) =>
      void this.siteDeclined(site, round).catch((e: unknown) => retries.later(`withheld-${round}-${site}`, `closing round ${round} without ${site}`, e, () => this.siteDeclined(site, round)));
    const trainTask = (row: RoundRow, site: string, settings: TaskSettings) => this.trainTask(row, site, settings);
    this.offers = new TaskOffers({ plan, federationId: o.federationId, sharedNames: this.sharedNames, features, connections: this.connections, events, log, trainTask, withheld, reofferMs: o.reofferMs ?? REOFFER_MS });
    this.intake = new UploadIntake({ store, shared, events, refusals: this.refusals, strategyName: strategy.name, open: () => this.open, finished: () => this.finished });
    const recovery = (this.recovery = new RoundRecovery({ store, models, plan, strategy, shared, features, events, log, graceMs: o.resumeGraceMs }));
    this.opening = new RoundOpening({ store, models, plan, strategy, shared, features, aggregationState, events, log });
    const closing = new RoundClose({ store, models, plan, architecture: o.architecture, strategy, shared, features, aggregationState, events, log });
    this.ending = new RoundEnding({
      ...{ store, log, events, features, folds: this.folds, closing, recovery, retries },
      isCurrent: (open) => this.open === open,
      forget: () => (this.open = undefined),
      next: () => this.maybeOpenRound(),
      resetAggregationState: () => this.resetAggregationState(),
      checkRollbacks: () => this.checkRollbacks(),
    });
    this.rollbacks = new RollbackAnnouncer(store, events, log);
  }

  /** The feature of class `kind` this engine runs, if any (for a service that talks to it, e.g. secure aggregation's). */
  feature<F extends RoundFeature>(kind: abstract new (...args: never[]) => F): F | undefined {
    return this.features.find(kind);
  }

  /** Makes sure an initial model exists, then resumes an open round or waits to open the next one. */
  async start(): Promise<void> {
    const { store, models, architecture, plan, log, initialWeights } = this.o;
    await ensureInitialModel({ store, models, architecture, plan, log, initialWeights, shared: this.shared });
    this.aggregationState.restore();
    this.features.start();
    // A rollback made while this coordinator was down: announce it before anything else happens.
    this.announceRollbacks();
    const openRow = store.openRoundRow();
    if (openRow) this.resume(openRow);
    else this.maybeOpenRound();
    this.rollbackTimer = setInterval(() => this.checkRollbacks(), this.o.rollbackPollMs ?? 2000);
    this.rollbackTimer.unref();
  }

  stop(): void {
    this.stopped = true;
    if (this.rollbackTimer) clearInterval(this.rollbackTimer);
    if (this.open?.timer) clearTimeout(this.open.timer);
    // Ends what a collected input holds (e.g. a session's timers and waiting calls); the next start decides the round (resume()).
    this.open?.collector?.input.abort('the coordinator is stopping');
    this.quorum.stop();
    this.retries.stop();
    if (this.ownsRefusals) this.refusals.close();
  }

  /** The failure that work is waiting on (it is retried), or undefined once the retried work went through. */
  get storageFault(): StorageFault | undefined {
    return this.retries.fault;
  }

  get currentModelHash(): string {
    return this.o.store.getMeta('current_model')!;
  }

  get isFinished(): boolean {
    return this.finished;
  }

  get openRoundNumber(): number | undefined {
    return this.open?.row.round;
  }

  // ---- sites (site-connections.ts, task-offers.ts) ----

  siteConnected(site: string, sink: TaskSink): void {
    if (this.connections.connect(site, sink)) this.events.emit('site.joined', { site });
    if (this.finished) {
      sink.send(this.finishedTask());
      return;
    }
    const open = this.open;
    if (open && open.row.selected.includes(site) && !open.reported.has(site)) {
      // A site that reconnects mid-round gets its task again; its update id makes a retry count once.
      try {
        this.offers.offer(open, site, sink);
      } catch (e) {
        this.retries.later('tasks', `sending round ${open.row.round}'s task to ${site}`, e, () => this.sendTasks(open));
      }
    } else if (!open) {
      this.maybeOpenRound();
    }
  }

  /**
   * The site's heartbeat says it is idle and working on no task: a selected site that has neither reported nor
   * declined is sent its task again (task-offers.ts). Rounds whose input a feature collects are left alone: the
   * feature decides who takes part (a secure-aggregation session cannot take a site back once it has moved on).
   */
  siteIdle(site: string): void {
    const open = this.open;
    if (!open || open.closing || open.collector || this.finished || this.stopped) return;
    this.offers.reofferToIdle(open, site);
  }

  /** True when this was the site's stream (not an older one a newer stream of the site replaced): the site left. */
  siteDisconnected(site: string, sink: TaskSink): boolean {
    if (!this.connections.disconnect(site, sink)) return false;
    this.events.emit('site.left', { site });
    return true;
  }

  connectedSites(): string[] {
    return this.connections.sites();
  }

  /** What each connected site announced when it subscribed (protocol version and features), for the admin dashboard. */
  connectedCapabilities(): Map<string, SiteCapabilities> {
    return this.connections.capabilities();
  }

  // ---- updates (upload-intake.ts: what each does) ----

  admissionProblem(site: string, round: number, baseModelHash: string): string | undefined {
    return this.intake.admissionProblem(site, round, baseModelHash);
  }

  /**
   * Synchronous; callers run it inside serialised(), so one model-sized fold at a time. With `folded`,
   * checkAndFold() already counted the update: only the bookkeeping is left.
   */
  fold(row: UpdateRow, update: TensorBundle, opts: { isDelta?: boolean; verdict?: Verdict; folded?: boolean } = {}): boolean {
    return this.intake.fold(row, update, opts);
  }

  /** Changes nothing: call it inside serialised(), before the update is stored and acknowledged. */
  checkUpdate(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): Verdict {
    return this.intake.check(site, round, update, numSamples, isDelta);
  }

  /**
   * checkUpdate() and, where the strategy can (checkAndAdd: the mean without clipping), the fold in the same pass
   * over the update: one read of it instead of two. Call inside serialised(), before the update is stored. With
   * `folded` the update is already in the aggregate: record it with fold(…, { folded: true }) once it is stored,
   * or take it out with unfold() when storing fails. With a problem nothing was counted.
   */
  checkAndFold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): { verdict: Verdict; folded: boolean } {
    return this.intake.checkAndFold(site, round, update, numSamples, isDelta);
  }

  /** Takes out an update that checkAndFold() counted but that could not be stored (the site sends it again). */
  unfold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean, verdict: Verdict): void {
    this.intake.unfold(site, round, update, numSamples, isDelta, verdict);
  }

  /**
   * Several stored updates of `round` checked and folded in one pass over the sums (checkAndAddBatch; items may be
   * readers over their files). Call inside serialised(), before they are stored. The verdicts in order, those without
   * a problem counted: record each with folded() once stored, or take it out with unfoldItem() when storing fails.
   * Undefined when this round cannot (median, trimmed mean; no round open): nothing counted, take them one at a time.
   */
  checkAndFoldBatch(round: number, items: readonly BatchItem[]): Verdict[] | undefined {
    return this.intake.checkAndFoldBatch(round, items);
  }

  /** Takes out an update that checkAndFoldBatch() counted but that could not be stored (the site sends it again). */
  unfoldItem(round: number, item: BatchItem, verdict: Verdict): void {
    this.intake.unfoldItem(round, item, verdict);
  }

  /** The bookkeeping of a stored update that checkAndFoldBatch() already counted; false when its round is not open. */
  folded(row: UpdateRow): boolean {
    return this.intake.folded(row);
  }

  /**
   * A fold or a take-out of round `round` failed part-way, so its running aggregate cannot be trusted: the close
   * rebuilds it from the stored updates first (no restart needed). Nothing for a round no longer open.
   */
  aggregateStale(round: number, why: string): void {
    const open = this.open;
    if (!open || open.row.round !== round) return;
    open.staleAggregate ??= why;
    this.o.log.error({ round, err: why }, "the round's running aggregate no longer matches its stored updates; it is rebuilt from them before the round closes");
  }

  acceptedEvent(row: UpdateRow): FederationEvent {
    return this.intake.acceptedEvent(row);
  }

  rejected(site: string, round: number, reason: string): void {
    this.intake.rejected(site, round, reason);
  }

  /** Runs `fn` after every earlier serialised job, so no two model-sized folds run at once. */
  serialised<T>(fn: () => T | Promise<T>): Promise<T> {
    return this.folds.run(fn);
  }

  /** After fold(): announces the update and closes the round when every selected site has reported (round-deadline.ts). */
  async accepted(row: UpdateRow): Promise<void> {
    const open = this.open;
    if (!open || open.row.round !== row.round) return;
    this.features.notify('onUpdateAccepted', (f) => f.onUpdateAccepted?.(row, roundView(open)));
    this.events.publish(this.acceptedEvent(row));
    this.o.log.info({ round: row.round, site: row.site, samples: row.numSamples, reported: open.reported.size, selected: open.row.selected.length }, 'update accepted');
    const why = earlyCloseReason(open, this.o.plan.minSites);
    if (why) await this.ending.close(open, why);
  }

  /**
   * A selected site declined its task (Governance.DeclineTask): stop waiting for it. The round closes now if
   * every other selected site has reported and the quorum is met; otherwise the deadline decides as before.
   */
  async siteDeclined(site: string, round: number): Promise<void> {
    const open = this.open;
    if (!open || open.row.round !== round || open.collector || !open.row.selected.includes(site) || open.reported.has(site)) return;
    (open.declined ??= new Set()).add(site);
    const why = open.closing ? undefined : earlyCloseReason(open, this.o.plan.minSites);
    if (why) await this.ending.close(open, why);
  }

  // ---- rounds ----

  /** The round found open at start-up: resumed from its stored updates, or failed (round-recovery.ts). */
  private resume(row: RoundRow): void {
    const recovered = this.recovery.recover(row);
    if ('failed' in recovered) {
      this.maybeOpenRound();
      return;
    }
    this.open = recovered.resumed;
    if (recovered.allReported) void this.ending.close(this.open, 'all selected sites had reported before the restart');
    else this.armDeadline(this.open);
  }

  /** Opens the next round when it is time. Runs from timers and calls, so it never throws: a failure is retried later. */
  private maybeOpenRound(): void {
    try {
      this.openNextRound();
    } catch (e) {
      this.retries.later('open', 'opening the next round', e, () => {
        if (this.open) this.sendTasks(this.open);
        else this.openNextRound();
      });
    }
  }

  private openNextRound(): void {
    if (this.stopped || this.open || this.finished) return;
    const { store, plan } = this.o;
    if (store.closedRoundCount() >= plannedRounds(plan)) {
      this.finish();
      return;
    }
    // This runs on every connect while no round is open. Fewer sites connected than minSites cannot open a round
    // whoever they are, so the quorum hears that without the enrolled names being read: reading every name on each of
    // a connection storm's N connects read N² rows (~0.5 s of CPU at 1,000 sites). Otherwise one query for the
    // names, not one per connected site (per-site lookups made N connects cost N² queries).
    const connected = this.connectedSites();
    if (connected.length < plan.minSites) {
      this.quorum.ready(connected, () => []);
      return;
    }
    const enrolled = store.enrolledSiteNames();
    const eligible = connected.filter((s) => enrolled.has(s));
    const missing = () => [...enrolled].filter((s) => !this.connections.has(s)).sort();
    if (!this.quorum.ready(eligible, missing)) return;
    const selected = this.quorum.select(eligible);
    if (this.overPrivacyBudget(selected.length)) return;
    const { opened, started } = this.opening.begin(selected, this.currentModelHash);
    this.open = opened;
    opened.collector = this.features.inputCollector(roundView(opened), this.inputControl(opened));
    this.opening.announce(opened, started);
    this.features.notify('onRoundOpened', (f) => f.onRoundOpened?.(roundView(opened)));
    // The deadline first: a task that cannot be sent now is sent again later, and the round still ends on time.
    this.armDeadline(opened);
    this.sendTasks(opened);
  }

  /** What a feature collecting `open`'s input may do with the round (input-control.ts). */
  private inputControl(open: OpenRound): RoundInputControl {
    return inputControl(open, { folds: this.folds, ending: this.ending, strategyName: this.o.strategy.name, isCurrent: (o) => this.open === o, stopped: () => this.stopped });
  }

  /** The round's task to each selected, connected site that has not reported; a failure (e.g. the encoded model file cannot be written) is retried later. */
  private sendTasks(open: OpenRound): void {
    if (this.open !== open || open.closing) return;
    try {
      this.offers.sendAll(open);
    } catch (e) {
      this.retries.later('tasks', `sending round ${open.row.round}'s tasks`, e, () => this.sendTasks(open));
    }
  }

  private armDeadline(open: OpenRound): void {
    const delay = Math.max(0, open.row.deadlineAt - Date.now());
    // Caught: a rejection here would end the process.
    const reached = (): Promise<void> => this.onDeadline(open).catch((e: unknown) => this.retries.later(`deadline-${open.row.round}`, `round ${open.row.round}'s deadline`, e, reached));
    open.timer = setTimeout(() => void reached(), delay);
  }

  private async onDeadline(open: OpenRound): Promise<void> {
    if (this.open !== open || open.closing) return;
    if (open.collector) {
      // The feature ends its collection, and fails the round through its control.
      open.collector.input.deadlineReached();
      return;
    }
    await this.folds.drained(); // an update being folded right now still counts
    const verdict = deadlineVerdict(open, this.o.plan.minSites);
    if ('close' in verdict) await this.ending.close(open, verdict.close);
    else this.ending.failAndMoveOn(open, verdict.fail);
  }

  /** Back to the aggregation state last committed (finish() already moved the optimiser and norms on in memory). */
  private resetAggregationState(): void {
    this.aggregationState.reset();
    this.features.reload();
  }

  /** Polled: a rollback made by `medfl coordinator rollback` drops the open round it failed and is announced. */
  private checkRollbacks(): void {
    if (this.stopped) return;
    try {
      if (this.announceRollbacks()) this.maybeOpenRound();
    } catch (e) {
      this.o.log.error({ err: (e as Error).message }, 'checking for an operator rollback failed');
    }
  }

  /** Announces queued rollbacks (rollback-announcer.ts), first dropping the open round one failed; true if there were any. */
  private announceRollbacks(): boolean {
    const taken = this.rollbacks.take();
    if (taken.length === 0) return false;
    const open = this.open;
    if (open && this.o.store.getRound(open.row.round)?.state !== 'open') {
      open.closing = true;
      if (open.timer) clearTimeout(open.timer);
      open.collector?.input.abort('the operator rolled the federation back');
      open.aggregator.discard?.();
      this.open = undefined;
    }
    this.resetAggregationState();
    this.rollbacks.announce(taken);
    return true;
  }

  private finish(why = 'all planned rounds closed'): void {
    if (this.finished) return;
    this.finished = true;
    this.events.emit('federation.finished', { model: this.currentModelHash, rounds: this.o.store.closedRoundCount(), why });
    this.o.log.info({ model: this.currentModelHash }, `federation finished: ${why}`);
    for (const sink of this.connections.all()) sink.send(this.finishedTask());
  }

  /** Plan privacy.epsilonBudget: true when a round asking `selected` sites would take ε past it; the federation then ends, saying why. */
  private overPrivacyBudget(selected: number): boolean {
    const refusal = privacyBudgetRefusal(this.o.plan, this.o.store, selected);
    if (!refusal) return false;
    this.events.emit(BUDGET_EXHAUSTED_EVENT, { ...refusal });
    this.o.log.warn(refusal, describeRefusal(refusal));
    this.finish('privacy budget exhausted');
    return true;
  }

  /** The one place a TRAIN task is made and signed, with `settings` as task-offers.ts shaped them for the site. */
  private trainTask(row: RoundRow, site: string, settings: TaskSettings): TaskMessage {
    return this.o.signTask(trainManifest(row, site, settings, this.o.models.size(row.baseModelHash)));
  }

  private finishedTask(): TaskMessage {
    return this.o.signTask(finishedManifest(this.o.store.lastRoundNumber(), this.currentModelHash, this.o.models.size(this.currentModelHash)));
  }
}
