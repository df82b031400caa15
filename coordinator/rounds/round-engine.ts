/**
 * The round engine: opens rounds when a quorum of sites is connected, pushes tasks, folds accepted
 * updates into the running aggregate, and closes each round when every selected site reported or,
 * at the deadline, when the quorum did. All state that matters is in the store before anything is
 * acknowledged, so a restarted coordinator resumes the same round by re-folding its accepted updates.
 */
import { randomUUID } from 'node:crypto';
import type { CoordinatorStore, RoundRow, UpdateRow } from '../store/store.ts';
import type { ModelFiles } from '../models/model-store.ts';
import type { AggregationStrategy, RoundAggregator, Verdict } from '../aggregation/strategy.ts';
import type { EventBus, FederationEvent, FederationEventType } from '../../shared/events/bus.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { ModelArchitecture, ParamInfo } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { sharedParams, pick } from '../../shared/model/sharing.ts';
import { manifestBytes, type TaskManifest, type TaskSettings } from '../../shared/protocol/task.ts';
import { decodeUpdate } from '../../shared/tensors/update-codec.ts';
import { readFileSync, rmSync } from 'node:fs';
import type { Logger } from '../../shared/util/log.ts';
import { acceptsSums } from '../aggregation/composed.ts';
import { aggregateProblem } from '../aggregation/validate.ts';
import { cappedWeights } from '../aggregation/weight-share.ts';
import { takePendingRollbacks, type RollbackRecord } from './rollback.ts';
import { plannedRounds, pretrainingRounds, stageAfter, stageSettings, type Stage } from './pretraining-stage.ts';
import { describeStorageFault, isStorageFault } from '../../shared/util/storage-fault.ts';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../../shared/protocol/reconnect.ts';
import { eventId, outboxRows } from '../events/outbox.ts';
import { PROTOCOL_VERSION, SITE_FEATURES, type SiteCapabilities } from '../../shared/protocol/features.ts';
import { settingsForSite } from '../../shared/protocol/compatibility.ts';
import { RefusalWarnings } from '../events/refusal-warnings.ts';
import { updateRejectionReason } from '../events/reasons.ts';
import type { CloseContribution, RoundFeature, RoundFeatureContext, RoundInput, RoundInputControl, RoundView } from './round-feature.ts';
import { standardRoundFeatures, type StandardFeatureOptions } from './features/index.ts';

export { PRIVACY_KEY, type PrivacySpent } from './features/dp-accounting.ts';
import { BUDGET_EXHAUSTED_EVENT, describeRefusal, privacyBudgetRefusal } from './privacy-budget.ts';

/** The wire shape of a Task, as handed to a site's stream. */
export interface TaskMessage extends TaskManifest {
  signature: Buffer;
}

export interface TaskSink {
  send(task: TaskMessage): void;
  /** What the site announced when it subscribed; absent = a site of this very build (in-process callers). */
  readonly capabilities?: SiteCapabilities;
  /** Another stream of the same site took over: end this one, saying why. */
  replaced?(): void;
}

/** The standard features' own options (where they keep files) pass through the engine untouched. */
export interface RoundEngineOptions extends StandardFeatureOptions {
  store: CoordinatorStore;
  models: ModelFiles;
  plan: Plan;
  architecture: ModelArchitecture;
  strategy: AggregationStrategy;
  bus: EventBus;
  federationId: string;
  sign: (bytes: Buffer) => Buffer;
  log: Logger;
  /** Extra time given to an open round found at start-up, so sites can reconnect after a coordinator restart. */
  resumeGraceMs?: number;
  /** All weights of the first global model (plan.model.init); only called when there is no model yet. */
  initialWeights?: () => Promise<TensorBundle>;
  /** How often the engine looks for a rollback made by `medfl coordinator rollback` (default 2 s). */
  rollbackPollMs?: number;
  /** How long to wait before trying again when opening, closing or failing a round hit a storage failure such as a full disk (default 10 s). */
  storageRetryMs?: number;
  /** Least time between two offers of a round's task to one site that reports idle without it (default REOFFER_MS). */
  reofferMs?: number;
  /** Features beyond the standard ones (features/index.ts), called after them (round-feature.ts). */
  features?: RoundFeature[];
  /** Collapses the warn lines of repeated refused uploads (default: one of the engine's own, closed by stop()). */
  refusals?: RefusalWarnings;
}

/**
 * A selected site that heartbeats "idle, no task" while the round waits for it is sent its task again, at most this
 * often: it gave the task up (e.g. its model download kept failing until it stopped trying) and would otherwise sit
 * idle until the deadline, since tasks are otherwise sent only when a round opens and when a site reconnects.
 */
export const REOFFER_MS = 30_000;

/** Time a resumed round gives sites beyond their longest reconnect backoff: to connect, and to resend or retrain. */
export const RESUME_GRACE_MARGIN_MS = 30_000;

/**
 * Extra time for an open round found at start-up: half the round deadline, at most 60 s, but never less than a site
 * needs to notice the restart and come back (its longest reconnect backoff plus a margin).
 */
export function resumeGraceMs(roundDeadlineSeconds: number): number {
  return Math.max(Math.min(60_000, roundDeadlineSeconds * 500), SITE_MAX_RECONNECT_BACKOFF_MS + RESUME_GRACE_MARGIN_MS);
}

/** Store meta keys of what aggregation carries across rounds (written in the round-close transaction). */
export const AGGREGATION_STATE_KEY = 'aggregation_state';

interface OpenRound {
  row: RoundRow;
  aggregator: RoundAggregator;
  reported: Set<string>;
  /** Selected sites that declined this round's task (their policy or head forbids it): not waited for. */
  declined?: Set<string>;
  timer?: NodeJS.Timeout;
  closing: boolean;
  /** The feature that collects the round's input instead of uploads (round-feature.ts RoundInput), if one does. */
  collector?: { feature: string; input: RoundInput };
  /** Pretraining or fine-tuning (plan.pretraining), fixed when the round opened. */
  stage: Stage;
}

export class RoundEngine {
  private readonly connected = new Map<string, TaskSink>();
  /** When each site was last sent the open round's task (round and time): re-offers to idle sites are spaced by it. */
  private readonly offered = new Map<string, { round: number; at: number }>();
  private open: OpenRound | undefined;
  private waitTimer: NodeJS.Timeout | undefined;
  private gatherUntil: number | undefined;
  private gatherTimer: NodeJS.Timeout | undefined;
  private finished = false;
  private stopped = false;
  private rollbackTimer: NodeJS.Timeout | undefined;
  /** Serialises the heavy part of accepting updates (decode + fold), so memory stays at about one model. */
  private foldChain: Promise<unknown> = Promise.resolve();
  readonly shared: ParamInfo[];
  readonly sharedNames: string[];
  /** What plugs into the round lifecycle (teacher promotion, DP accounting, retention, …), in call order. */
  private readonly features: readonly RoundFeature[];
  /** Work put off by a storage failure, by what it is (one pending retry each). */
  private readonly retries = new Map<string, NodeJS.Timeout>();
  private lastStorageFault: { at: number; what: string; error: string } | undefined;
  /** Warn lines of refused uploads, one per (site, reason) and window plus a count. */
  private readonly refusals: RefusalWarnings;
  private readonly ownsRefusals: boolean;

  constructor(private readonly o: RoundEngineOptions) {
    this.refusals = o.refusals ?? new RefusalWarnings(o.log);
    this.ownsRefusals = o.refusals === undefined;
    this.shared = sharedParams(o.architecture, o.plan.share);
    this.sharedNames = this.shared.map((p) => p.name);
    const context: RoundFeatureContext = {
      store: o.store,
      models: o.models,
      plan: o.plan,
      architecture: o.architecture,
      strategy: o.strategy,
      bus: o.bus,
      federationId: o.federationId,
      log: o.log,
      event: (type, fields) => this.event(type, fields),
    };
    this.features = [...standardRoundFeatures(context, o), ...(o.features ?? [])];
  }

  /** Calls a notification hook of every feature; one that throws is logged and the others still run. */
  private notify(hook: string, call: (f: RoundFeature) => void): void {
    for (const f of this.features) {
      try {
        call(f);
      } catch (e) {
        this.o.log.error({ feature: f.name, hook, err: (e as Error).message }, 'a round feature failed; the round goes on');
      }
    }
  }

  /** The round as features see it. */
  private view(open: OpenRound): RoundView {
    return { row: open.row, stage: open.stage, reported: open.reported, inputCollectedBy: open.collector?.feature };
  }

  /** The feature of class `kind` this engine runs, if any (for a service that talks to it, e.g. secure aggregation's). */
  feature<F extends RoundFeature>(kind: abstract new (...args: never[]) => F): F | undefined {
    return this.features.find((f): f is F => f instanceof kind);
  }

  /** Makes sure an initial model exists, then resumes an open round or waits to open the next one. */
  async start(): Promise<void> {
    const { store, models, architecture, plan } = this.o;
    if (!store.getMeta('current_model')) {
      const all = this.o.initialWeights ? await this.o.initialWeights() : architecture.init(plan.model.seed);
      const init = pick(all, this.shared);
      const saved = models.save(init, { architecture: architecture.id, round: '0', kind: 'initial' });
      store.addModel({ hash: saved.hash, path: saved.path, round: 0, sizeBytes: saved.sizeBytes, createdAt: Date.now() });
      store.setMeta('current_model', saved.hash);
      this.o.log.info({ model: saved.hash, params: this.shared.length, bytes: saved.sizeBytes }, 'initial global model written');
    }
    this.restoreAggregationState();
    for (const f of this.features) f.start?.();
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
    if (this.waitTimer) clearTimeout(this.waitTimer);
    if (this.gatherTimer) clearTimeout(this.gatherTimer);
    for (const t of this.retries.values()) clearTimeout(t);
    this.retries.clear();
    if (this.ownsRefusals) this.refusals.close();
  }

  /** The failure that work is waiting on (it is retried), or undefined once the retried work went through. */
  get storageFault(): { at: number; what: string; error: string } | undefined {
    return this.lastStorageFault;
  }

  /**
   * A failure in a timer or event path (a full disk, a locked database): logs it and runs `fn` again later, so the
   * coordinator carries on by itself once space returns. Never throws: in a timer that would end the process.
   * `fn` may itself fail again; it is then retried again.
   */
  private retryLater(key: string, what: string, e: unknown, fn: () => void | Promise<void>): void {
    const ms = this.o.storageRetryMs ?? 10_000;
    const error = describeStorageFault(e);
    this.lastStorageFault = { at: Date.now(), what, error };
    this.o.log.error({ err: error, storage: isStorageFault(e), retryInMs: ms }, `${what} failed; trying again later`);
    if (this.stopped || this.retries.has(key)) return;
    const run = async () => {
      this.retries.delete(key);
      if (this.stopped) return;
      try {
        await fn();
        if (this.retries.size === 0) this.lastStorageFault = undefined;
      } catch (e2) {
        this.retryLater(key, what, e2, fn);
      }
    };
    this.retries.set(key, setTimeout(() => void run(), ms));
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

  // ---- sites ----

  siteConnected(site: string, sink: TaskSink): void {
    const previous = this.connected.get(site);
    this.connected.set(site, sink);
    if (!previous) this.emit('site.joined', { site });
    // One task stream per site: an older one is a dead connection or a second agent with the same key.
    else if (previous !== sink) previous.replaced?.();
    if (this.finished) {
      sink.send(this.finishedTask());
      return;
    }
    const open = this.open;
    if (open && open.row.selected.includes(site) && !open.reported.has(site)) {
      // A site that reconnects mid-round gets its task again; its update id makes a retry count once.
      try {
        this.offer(open, site, sink);
      } catch (e) {
        this.retryLater('tasks', `sending round ${open.row.round}'s task to ${site}`, e, () => this.sendTasks(open));
      }
    } else if (!open) {
      this.maybeOpenRound();
    }
  }

  /**
   * The site's heartbeat says it is idle and working on no task. A site selected for the open round that has neither
   * reported nor declined is sent its task again (REOFFER_MS apart): it may have given the task up after a failed
   * download. Rounds whose input a feature collects are left alone: the feature decides who takes part (a
   * secure-aggregation session cannot take a site back once it has moved on).
   */
  siteIdle(site: string): void {
    const open = this.open;
    if (!open || open.closing || open.collector || this.finished || this.stopped) return;
    if (!open.row.selected.includes(site) || open.reported.has(site) || open.declined?.has(site)) return;
    const sink = this.connected.get(site);
    const last = this.offered.get(site);
    if (!sink || (last?.round === open.row.round && Date.now() - last.at < (this.o.reofferMs ?? REOFFER_MS))) return;
    try {
      if (this.offer(open, site, sink)) this.o.log.info({ round: open.row.round, site }, 'site reports idle without its task: offered it again');
    } catch (e) {
      // Only a reminder: the next idle heartbeat tries again.
      this.o.log.warn({ round: open.row.round, site, err: (e as Error).message }, 'could not offer the task again to an idle site');
    }
  }

  /** Sends `site` the round's task (shaped for it), noting when; false when the task was withheld. */
  private offer(open: OpenRound, site: string, sink: TaskSink): boolean {
    const task = this.taskFor(open, site, sink);
    if (!task) return false;
    sink.send(task);
    this.offered.set(site, { round: open.row.round, at: Date.now() });
    return true;
  }

  siteDisconnected(site: string, sink: TaskSink): void {
    if (this.connected.get(site) !== sink) return; // an older stream of a site that already reconnected
    this.connected.delete(site);
    this.emit('site.left', { site });
  }

  connectedSites(): string[] {
    return [...this.connected.keys()].sort();
  }

  /** What each connected site announced when it subscribed (protocol version and features), for the admin dashboard. */
  connectedCapabilities(): Map<string, SiteCapabilities> {
    return new Map([...this.connected].map(([site, sink]) => [site, sink.capabilities ?? { protocolVersion: PROTOCOL_VERSION, features: new Set(SITE_FEATURES) }]));
  }

  // ---- updates ----

  /**
   * Decides whether an update for `round` from `site` may be stored at all (before the bytes are kept).
   * Returns a reason to refuse, or undefined.
   */
  admissionProblem(site: string, round: number, baseModelHash: string): string | undefined {
    const open = this.open;
    if (!open) return `no round is open (the federation is ${this.finished ? 'finished' : 'between rounds'}); wait for the next task`;
    if (round !== open.row.round) return `round ${round} is not the open round ${open.row.round}; drop this update and take the current task`;
    if (!open.row.selected.includes(site)) return `site '${site}' was not selected for round ${round}`;
    if (open.collector) return open.collector.input.uploadRefusal(site);
    // The store too: an update is stored and acknowledged a moment before it is folded into `reported`.
    if (open.reported.has(site) || this.o.store.updateFor(round, site)) return `site '${site}' already reported an update for round ${round}`;
    if (baseModelHash !== open.row.baseModelHash) return `update was trained from model ${baseModelHash.slice(0, 12)}…, but round ${round} starts from ${open.row.baseModelHash.slice(0, 12)}…`;
    if (open.closing) return `round ${round} is closing`;
    return undefined;
  }

  /**
   * Folds an update that has been validated and durably recorded in the store into the running
   * aggregate. Synchronous; callers run it inside serialised(), so one model-sized fold at a time.
   */
  fold(row: UpdateRow, update: TensorBundle, opts: { isDelta?: boolean; verdict?: Verdict; folded?: boolean } = {}): boolean {
    const open = this.open;
    if (!open || open.row.round !== row.round) return false;
    // checkAndFold() already counted it: only the bookkeeping is left.
    if (!opts.folded) open.aggregator.add(pick(update, this.shared), { site: row.site, numSamples: row.numSamples, isDelta: opts.isDelta }, opts.verdict);
    open.reported.add(row.site);
    return true;
  }

  /**
   * The validation filter of the open round's strategy (names, dtypes, shapes, finite values, norm bound,
   * sample count). Changes nothing: call it inside serialised(), before the update is stored and acknowledged.
   */
  checkUpdate(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): Verdict {
    const open = this.open;
    if (!open || open.row.round !== round) return { problem: `round ${round} is not open any more` };
    return open.aggregator.check(update, { site, numSamples, isDelta });
  }

  /**
   * checkUpdate() and, where the strategy can (checkAndAdd: the mean without clipping), the fold in the same pass
   * over the update: one read of it instead of two. Call inside serialised(), before the update is stored. With
   * `folded` the update is already in the aggregate: record it with fold(…, { folded: true }) once it is stored,
   * or take it out with unfold() when storing fails. With a problem nothing was counted.
   */
  checkAndFold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean): { verdict: Verdict; folded: boolean } {
    const open = this.open;
    if (!open || open.row.round !== round) return { verdict: { problem: `round ${round} is not open any more` }, folded: false };
    const info = { site, numSamples, isDelta };
    const fused = open.aggregator.checkAndAdd?.(update, info);
    if (fused) return { verdict: fused, folded: !fused.problem };
    return { verdict: open.aggregator.check(update, info), folded: false };
  }

  /** Takes out an update that checkAndFold() counted but that could not be stored (the site sends it again). */
  unfold(site: string, round: number, update: TensorBundle, numSamples: number, isDelta: boolean, verdict: Verdict): void {
    const open = this.open;
    if (!open || open.row.round !== round) return;
    if (!open.aggregator.retract) throw new Error(`strategy ${this.o.strategy.name} counted an update it cannot take out`);
    open.aggregator.retract(update, { site, numSamples, isDelta }, verdict);
  }

  /** After fold(): announces the update and closes the round when every selected site has reported. */
  async accepted(row: UpdateRow): Promise<void> {
    const open = this.open;
    if (!open || open.row.round !== row.round) return;
    this.notify('onUpdateAccepted', (f) => f.onUpdateAccepted?.(row, this.view(open)));
    this.o.bus.publish(this.acceptedEvent(row));
    this.o.log.info({ round: row.round, site: row.site, samples: row.numSamples, reported: open.reported.size, selected: open.row.selected.length }, 'update accepted');
    if (open.row.selected.every((s) => open.reported.has(s))) await this.closeRound(open, 'all selected sites reported');
    else if (this.allAccountedFor(open) && open.reported.size >= this.o.plan.minSites) await this.closeRound(open, 'every selected site reported or declined');
  }

  /** The update's `update.accepted` event; the upload handler commits it (and its ledger entry) with the update's row. */
  acceptedEvent(row: UpdateRow): FederationEvent {
    return this.event('update.accepted', { round: row.round, site: row.site, samples: row.numSamples, updateHash: row.sha256 });
  }

  /**
   * A selected site declined its task (Governance.DeclineTask): stop waiting for it. The round closes now if
   * every other selected site has reported and the quorum is met; otherwise the deadline decides as before.
   */
  async siteDeclined(site: string, round: number): Promise<void> {
    const open = this.open;
    if (!open || open.row.round !== round || open.collector || !open.row.selected.includes(site) || open.reported.has(site)) return;
    (open.declined ??= new Set()).add(site);
    if (!open.closing && this.allAccountedFor(open) && open.reported.size >= this.o.plan.minSites) {
      await this.closeRound(open, 'every selected site reported or declined');
    }
  }

  private allAccountedFor(open: OpenRound): boolean {
    return open.row.selected.every((s) => open.reported.has(s) || open.declined?.has(s));
  }

  /** Every refusal is an event (the metrics count them all); its warn line is collapsed with the same site's like refusals. */
  rejected(site: string, round: number, reason: string): void {
    this.emit('update.rejected', { site, round, reason });
    this.refusals.refused(site, updateRejectionReason(reason), reason, { site, round, reason }, 'update rejected');
  }

  /** Runs `fn` after every earlier serialised job, so no two model-sized folds run at once. */
  serialised<T>(fn: () => T | Promise<T>): Promise<T> {
    const next = this.foldChain.then(fn, fn);
    this.foldChain = next.catch(() => undefined);
    return next;
  }

  // ---- rounds ----

  private resume(row: RoundRow): void {
    const { store, log } = this.o;
    for (const f of this.features) {
      const note = f.resumeRefusal?.(row);
      if (note === undefined) continue;
      const failed = this.event('round.failed', { round: row.round, reason: note });
      store.failRound(row.round, note, Date.now(), outboxRows(failed));
      this.o.bus.publish(failed);
      log.warn({ round: row.round }, note);
      const view: RoundView = { row, stage: stageAfter(this.o.plan, store.closedRoundCount()), reported: new Set(), inputCollectedBy: f.name };
      this.notify('onRoundFailed', (g) => g.onRoundFailed?.(view, note));
      this.maybeOpenRound();
      return;
    }
    const { aggregator, reported } = this.refold(row);
    const grace = this.o.resumeGraceMs ?? resumeGraceMs(this.o.plan.roundDeadlineSeconds);
    const deadlineAt = Math.max(row.deadlineAt, Date.now() + grace);
    try {
      if (deadlineAt !== row.deadlineAt) store.extendDeadline(row.round, deadlineAt);
    } catch (e) {
      // The later deadline holds in memory; only a second restart would fall back to the stored one.
      log.warn({ round: row.round, err: describeStorageFault(e) }, "could not store the resumed round's extended deadline");
    }
    this.open = { row: { ...row, deadlineAt }, aggregator, reported, closing: false, stage: stageAfter(this.o.plan, store.closedRoundCount()) };
    log.info({ round: row.round, reported: reported.size, selected: row.selected.length }, 'resumed open round after restart');
    if (row.selected.every((s) => reported.has(s))) {
      void this.closeRound(this.open, 'all selected sites had reported before the restart');
      return;
    }
    this.armDeadline(this.open);
  }

  /**
   * The round's aggregator rebuilt from its accepted updates in the store (after a restart, or after closing failed).
   * Accepted updates were stored before their ack, so re-folding them reproduces the running sum exactly.
   */
  private refold(row: RoundRow): { aggregator: RoundAggregator; reported: Set<string> } {
    const { store, models, strategy } = this.o;
    // The base model is handed to the strategy and not kept here: a strategy that needs it keeps it.
    const aggregator = strategy.begin(models.load(row.baseModelHash), this.shared, this.roundContext(row));
    const reported = new Set<string>();
    try {
      for (const u of store.updatesForRound(row.round)) {
        const d = decodeUpdate(readFileSync(u.path), { views: true });
        aggregator.add(pick(d.bundle, this.shared), { site: u.site, numSamples: u.numSamples, isDelta: d.isDelta });
        reported.add(u.site);
      }
    } catch (e) {
      aggregator.discard?.();
      throw e;
    }
    return { aggregator, reported };
  }

  /** Opens the next round when it is time. Runs from timers and calls, so it never throws: a failure is retried later. */
  private maybeOpenRound(): void {
    try {
      this.openNextRound();
    } catch (e) {
      this.retryLater('open', 'opening the next round', e, () => {
        if (this.open) this.sendTasks(this.open);
        else this.openNextRound();
      });
    }
  }

  private openNextRound(): void {
    if (this.stopped || this.open || this.finished) return;
    const { store, plan, log } = this.o;
    if (store.closedRoundCount() >= plannedRounds(plan)) {
      this.finish();
      return;
    }
    const eligible = this.connectedSites().filter((s) => store.getSite(s)?.state === 'enrolled');
    if (eligible.length < plan.minSites) {
      if (!this.waitTimer) {
        log.info({ connected: eligible.length, needed: plan.minSites }, 'waiting for sites to connect');
        this.waitTimer = setTimeout(() => {
          this.waitTimer = undefined;
          log.warn({ connected: this.connectedSites().length, needed: plan.minSites, waitedSeconds: plan.waitForSitesSeconds }, 'still waiting for a quorum of sites');
          this.maybeOpenRound();
        }, plan.waitForSitesSeconds * 1000);
      }
      return;
    }
    if (this.waitTimer) {
      clearTimeout(this.waitTimer);
      this.waitTimer = undefined;
    }
    // With a quorum here, give the other enrolled sites a short while to join, so one late process
    // start does not leave a site out of a whole round.
    const enrolled = store.listSites().filter((s) => s.state === 'enrolled').map((s) => s.name);
    const missing = enrolled.filter((s) => !this.connected.has(s));
    if (missing.length > 0 && plan.gatherSeconds > 0) {
      const now = Date.now();
      if (this.gatherUntil === undefined) {
        this.gatherUntil = now + plan.gatherSeconds * 1000;
        this.gatherTimer = setTimeout(() => this.maybeOpenRound(), plan.gatherSeconds * 1000);
        log.info({ connected: eligible.length, missing: missing.length, seconds: plan.gatherSeconds }, 'quorum connected; waiting briefly for the other sites');
        return;
      }
      if (now < this.gatherUntil) return;
    }
    this.gatherUntil = undefined;
    if (this.gatherTimer) {
      clearTimeout(this.gatherTimer);
      this.gatherTimer = undefined;
    }
    const selected = plan.sitesPerRound > 0 ? shuffle(eligible).slice(0, plan.sitesPerRound).sort() : eligible;
    if (this.overPrivacyBudget(selected.length)) return;
    const now = Date.now();
    const row: RoundRow = {
      round: store.lastRoundNumber() + 1,
      state: 'open',
      baseModelHash: this.currentModelHash,
      selected,
      openedAt: now,
      deadlineAt: now + plan.roundDeadlineSeconds * 1000,
      closedAt: null,
      resultModelHash: null,
      note: null,
    };
    const stage = stageAfter(plan, store.closedRoundCount());
    if (stage.kind === 'fine-tuning' && stage.index === 1 && pretrainingRounds(plan) > 0) this.forgetPretrainingAggregationState();
    for (const f of this.features) f.onRoundOpening?.(row.round, stage);
    // The aggregator first: the store says a round is open only once it can run here too.
    const aggregator = this.o.strategy.begin(this.o.models.load(row.baseModelHash), this.shared, this.roundContext(row));
    const started = this.event('round.started', { round: row.round, selected, model: row.baseModelHash, ...(pretrainingRounds(plan) > 0 ? { stage: stage.kind, stageRound: stage.index } : {}) });
    try {
      store.openRound(row, outboxRows(started));
    } catch (e) {
      aggregator.discard?.();
      throw e;
    }
    this.open = { row, aggregator, reported: new Set(), closing: false, stage };
    this.open.collector = this.inputCollector(this.open);
    this.o.bus.publish(started);
    log.info({ round: row.round, selected, model: row.baseModelHash.slice(0, 12), ...(pretrainingRounds(plan) > 0 ? { stage: stage.kind, stageRound: stage.index } : {}) }, 'round started');
    const opened = this.open;
    this.notify('onRoundOpened', (f) => f.onRoundOpened?.(this.view(opened)));
    // The deadline first: a task that cannot be sent now is sent again later, and the round still ends on time.
    this.armDeadline(this.open);
    this.sendTasks(this.open);
  }

  /** The round's task to each selected, connected site that has not reported; a failure (e.g. the encoded model file cannot be written) is retried later. */
  private sendTasks(open: OpenRound): void {
    if (this.open !== open || open.closing) return;
    try {
      for (const s of open.row.selected) {
        const sink = open.reported.has(s) ? undefined : this.connected.get(s);
        if (sink) this.offer(open, s, sink);
      }
    } catch (e) {
      this.retryLater('tasks', `sending round ${open.row.round}'s tasks`, e, () => this.sendTasks(open));
    }
  }

  private armDeadline(open: OpenRound): void {
    const delay = Math.max(0, open.row.deadlineAt - Date.now());
    // Caught: a rejection here would end the process.
    const reached = (): Promise<void> => this.onDeadline(open).catch((e: unknown) => this.retryLater(`deadline-${open.row.round}`, `round ${open.row.round}'s deadline`, e, reached));
    open.timer = setTimeout(() => void reached(), delay);
  }

  /**
   * Marks `open` failed in the store with its `round.failed` event (reason `note`, plus `fields`), announces it, then
   * runs `after` (open the next round). On a storage failure the round stays in memory, closing (so uploads are
   * refused), and the store write is tried again later.
   */
  private failDurably(open: OpenRound, note: string, after: () => void, fields: Record<string, unknown> = {}): void {
    open.closing = true;
    if (open.timer) clearTimeout(open.timer);
    const attempt = (): void => {
      if (this.open !== open) return; // an operator's rollback settled it meanwhile
      const failed = this.event('round.failed', { round: open.row.round, reason: note, ...fields });
      this.o.store.failRound(open.row.round, note, Date.now(), outboxRows(failed));
      this.o.bus.publish(failed);
      this.notify('onRoundFailed', (f) => f.onRoundFailed?.(this.view(open), note));
      after();
    };
    try {
      attempt();
    } catch (e) {
      this.retryLater(`fail-${open.row.round}`, `failing round ${open.row.round}`, e, attempt);
    }
  }

  private async onDeadline(open: OpenRound): Promise<void> {
    if (this.open !== open || open.closing) return;
    const { plan } = this.o;
    if (open.collector) {
      // The feature ends its collection, and fails the round through its control.
      open.collector.input.deadlineReached();
      return;
    }
    await this.foldChain; // an update being folded right now still counts
    if (open.reported.size >= plan.minSites) {
      await this.closeRound(open, `deadline reached with quorum (${open.reported.size} of ${open.row.selected.length} sites)`);
      return;
    }
    this.failAndMoveOn(open, `deadline reached without quorum: ${open.reported.size} of ${open.row.selected.length} selected sites reported, ${plan.minSites} needed`);
  }

  /** Fails `open` durably with `note` (a warning), drops its aggregate and opens the next round. */
  private failAndMoveOn(open: OpenRound, note: string): void {
    this.failDurably(open, note, () => {
      open.aggregator.discard?.();
      this.o.log.warn({ round: open.row.round }, note);
      this.open = undefined;
      this.maybeOpenRound();
    });
  }

  /** The first feature that collects the round's input instead of uploads (round-feature.ts collectInput), if any. */
  private inputCollector(open: OpenRound): OpenRound['collector'] {
    const control = this.inputControl(open);
    for (const f of this.features) {
      const input = f.collectInput?.(this.view(open), control);
      if (input) return { feature: f.name, input };
    }
    return undefined;
  }

  /** What a feature collecting `open`'s input may do with the round. */
  private inputControl(open: OpenRound): RoundInputControl {
    const takesInput = () => this.open === open && !open.closing;
    return {
      isAccepting: takesInput,
      foldSum: (make) =>
        this.serialised(() => {
          if (this.open !== open || open.closing) return false;
          const { sum, weight, sites } = make();
          if (!acceptsSums(open.aggregator)) throw new Error(`strategy ${this.o.strategy.name} cannot take a sum of several sites' updates`);
          open.aggregator.addSum(sum, weight, sites.length);
          for (const s of sites) open.reported.add(s);
          return true;
        }),
      close: (why) => this.closeRound(open, why),
      fail: (note) => {
        if (!this.stopped && takesInput()) this.failAndMoveOn(open, note);
      },
    };
  }

  /** Closes the round; never throws: when storing its result fails (a full disk), the close is tried again later. */
  private async closeRound(open: OpenRound, why: string): Promise<void> {
    if (open.closing) return;
    try {
      await this.closeRoundOnce(open, why);
    } catch (e) {
      this.closeFailed(open, why, e);
    }
  }

  /**
   * Closing failed: the aggregator is spent and the server state moved on in memory, but nothing was committed
   * (the store transaction is all or nothing). Later, the aggregator is rebuilt from the stored updates and the
   * close tried again; the round refuses uploads meanwhile. An input a feature collected cannot be rebuilt: that
   * round fails (durably) instead.
   */
  private closeFailed(open: OpenRound, why: string, e: unknown): void {
    const round = open.row.round;
    try {
      open.aggregator.discard?.();
      this.resetAggregationState();
    } catch (e2) {
      this.o.log.error({ round, err: describeStorageFault(e2) }, 'could not reset the aggregation state after a failed close');
    }
    if (open.collector) {
      this.o.log.error({ round, feature: open.collector.feature, err: describeStorageFault(e) }, "storing the round's result failed and its collected input cannot be rebuilt; the round fails");
      const note = open.collector.input.lostResultNote(describeStorageFault(e));
      this.failDurably(open, note, () => {
        this.open = undefined;
        this.maybeOpenRound();
      });
      return;
    }
    this.retryLater(`close-${round}`, `closing round ${round}`, e, () => {
      if (this.open !== open) return;
      if (this.o.store.getRound(round)?.state !== 'open') {
        // Settled after all (the failure came after the commit): only what follows a close is left to do.
        this.open = undefined;
        this.maybeOpenRound();
        return;
      }
      const { aggregator, reported } = this.refold(open.row);
      open.aggregator = aggregator;
      for (const s of reported) open.reported.add(s);
      open.closing = false;
      return this.closeRound(open, why);
    });
  }

  private async closeRoundOnce(open: OpenRound, why: string): Promise<void> {
    open.closing = true;
    if (open.timer) clearTimeout(open.timer);
    const { store, models, architecture, log } = this.o;
    await this.foldChain;
    if (this.open !== open) return; // rolled back by the operator meanwhile (checkRollbacks dropped it)
    this.applyWeightShare(open);
    const next = open.aggregator.finish();
    // Never publish what sites could not train from: whatever got past validation, the result is checked as a whole.
    const problem = aggregateProblem(next, this.o.plan.aggregation.validation.maxValue);
    if (problem) {
      this.failUnpublished(open, problem);
      return;
    }
    const saved = models.save(next, { architecture: architecture.id, round: String(open.row.round), parent: open.row.baseModelHash });
    // Server-optimiser moments and the DP accountant move on with the model, in the same transaction:
    // a coordinator killed before it commits redoes this round from the previous state.
    const meta: Record<string, string> = {};
    const previousState = store.getMeta(AGGREGATION_STATE_KEY);
    const state = this.o.strategy.exportState?.();
    if (state) {
      const tensors = state.tensors ? models.save(state.tensors, { kind: 'aggregation-state', round: String(open.row.round) }).hash : null;
      meta[AGGREGATION_STATE_KEY] = JSON.stringify({ json: state.json, tensors });
    }
    // What the features add (DP accountant, teacher, …) moves on with the model, in the same transaction.
    const view = this.view(open);
    const version = { hash: saved.hash };
    const contributions = this.features.map((f) => f.beforeCommit?.(view, version));
    const added: Required<CloseContribution> = { meta: {}, closedFields: {}, logFields: {}, events: [] };
    for (const c of contributions) {
      Object.assign(added.meta, c?.meta);
      Object.assign(added.closedFields, c?.closedFields);
      Object.assign(added.logFields, c?.logFields);
      added.events.push(...(c?.events ?? []));
    }
    Object.assign(meta, added.meta);
    // Committed with the close, so the events cannot be lost to a crash or a NATS outage (events/outbox.ts).
    const closed = this.event('round.closed', { round: open.row.round, model: saved.hash, sites: [...open.reported].sort(), why, strategy: this.o.strategy.name, ...added.closedFields });
    const committed = store.closeRound(open.row.round, { hash: saved.hash, path: saved.path, round: open.row.round, sizeBytes: saved.sizeBytes, createdAt: Date.now() }, Date.now(), meta, outboxRows(closed, ...added.events));
    if (!committed) {
      // An operator's rollback failed this round between our check and the commit: its result is not published.
      log.warn({ round: open.row.round }, 'round was failed by a rollback while closing; its aggregate is not published');
      this.resetAggregationState();
      if (this.open === open) this.open = undefined;
      this.checkRollbacks();
      this.maybeOpenRound();
      return;
    }
    // The previous round's optimiser state is superseded once this commit is durable (two models of disk each).
    const oldTensors = previousState ? (JSON.parse(previousState) as { tensors: string | null }).tensors : null;
    const newTensors = meta[AGGREGATION_STATE_KEY] ? (JSON.parse(meta[AGGREGATION_STATE_KEY]) as { tensors: string | null }).tensors : oldTensors;
    this.open = undefined;
    try {
      if (oldTensors && oldTensors !== newTensors && !store.getModel(oldTensors)) rmSync(models.pathFor(oldTensors), { force: true });
    } catch (e) {
      // Committed: only disk space is at stake, and the next close prunes again.
      log.warn({ round: open.row.round, err: (e as Error).message }, 'deleting superseded files after the round closed failed');
    }
    this.o.bus.publish(closed);
    log.info({ round: open.row.round, model: saved.hash.slice(0, 12), sites: open.reported.size, why, ...added.logFields }, 'round closed');
    for (const e of added.events) this.o.bus.publish(e);
    this.features.forEach((f, i) => {
      try {
        f.onRoundClosed?.(view, version, contributions[i]);
      } catch (e) {
        // Committed: the rounds go on; a feature that keeps files tries again at the next close or start.
        log.warn({ feature: f.name, hook: 'onRoundClosed', round: open.row.round, err: (e as Error).message }, 'a round feature failed after the round closed; the rounds go on');
      }
    });
    this.maybeOpenRound();
  }

  /**
   * plan aggregation.maxWeightShare: once every weight of the round is known, lowers the weights above the cap
   * (water-filling, weight-share.ts) by folding those updates again from the store with the difference. Only the
   * sample-weighted mean has weights to cap (not median / trimmed mean, not DP's uniform weights, not an input a
   * feature collected, such as secure aggregation's, where the coordinator never sees a single update).
   */
  private applyWeightShare(open: OpenRound): void {
    const { plan, store, log } = this.o;
    const share = plan.aggregation.maxWeightShare;
    const aggregator = open.aggregator;
    if (share >= 1 || !aggregator.reweight || open.collector || plan.aggregation.dp || plan.aggregation.strategy !== 'fedavg') return;
    const rows = store.updatesForRound(open.row.round).filter((u) => open.reported.has(u.site));
    const capped = cappedWeights(rows.map((u) => u.numSamples), share);
    const lowered: Record<string, { declared: number; used: number }> = {};
    rows.forEach((u, i) => {
      if (capped[i] >= u.numSamples) return;
      const d = decodeUpdate(readFileSync(u.path), { views: true });
      aggregator.reweight!(pick(d.bundle, this.shared), { site: u.site, numSamples: u.numSamples, isDelta: d.isDelta }, capped[i]);
      lowered[u.site] = { declared: u.numSamples, used: Number(capped[i].toPrecision(6)) };
    });
    if (Object.keys(lowered).length > 0) {
      log.warn({ round: open.row.round, share, lowered }, "lowered the weight of site(s) whose declared samples exceeded the plan's maxWeightShare");
    }
  }

  /** The aggregate failed its final check: the round fails, naming the cause, and the federation stays on its model. */
  private failUnpublished(open: OpenRound, problem: string): void {
    const { log } = this.o;
    const sites = [...open.reported].sort();
    const note = `aggregate not published: ${problem}; the federation stays on model ${open.row.baseModelHash.slice(0, 12)}… (updates from ${sites.join(', ')})`;
    this.resetAggregationState();
    this.failDurably(
      open,
      note,
      () => {
        log.error({ round: open.row.round, sites, problem }, 'round failed: its aggregate is not published');
        this.open = undefined;
        this.maybeOpenRound();
      },
      { cause: 'aggregate', sites },
    );
  }

  /** Back to the aggregation state last committed (finish() already moved the optimiser and norms on in memory). */
  private resetAggregationState(): void {
    this.o.strategy.reset?.();
    this.restoreAggregationState();
    for (const f of this.features) f.reload?.();
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

  /** Announces queued rollbacks (event + ledger, through the bus); true if there were any. */
  private announceRollbacks(): boolean {
    const { store, log } = this.o;
    const rolledBack = (r: RollbackRecord) =>
      this.event('model.rolled_back', { round: r.toRound, fromModel: r.fromModel, toModel: r.toModel, failedRound: r.failedRound, rollbackId: r.id, reason: r.reason, requestedAt: r.requestedAt });
    // Taken and put in the outbox in one transaction: a crash right after cannot lose the announcement or its ledger entry.
    const taken = takePendingRollbacks(store, (rs) => outboxRows(...rs.map(rolledBack)));
    if (taken.length === 0) return false;
    const open = this.open;
    if (open && store.getRound(open.row.round)?.state !== 'open') {
      open.closing = true;
      if (open.timer) clearTimeout(open.timer);
      open.collector?.input.abort('the operator rolled the federation back');
      open.aggregator.discard?.();
      this.open = undefined;
    }
    this.resetAggregationState();
    for (const r of taken) {
      this.o.bus.publish(rolledBack(r));
      log.warn({ toRound: r.toRound, toModel: r.toModel.slice(0, 12), fromModel: r.fromModel.slice(0, 12), failedRound: r.failedRound, reason: r.reason || undefined }, 'federation rolled back by the operator');
    }
    return true;
  }

  private finish(why = 'all planned rounds closed'): void {
    if (this.finished) return;
    this.finished = true;
    this.emit('federation.finished', { model: this.currentModelHash, rounds: this.o.store.closedRoundCount(), why });
    this.o.log.info({ model: this.currentModelHash }, `federation finished: ${why}`);
    for (const sink of this.connected.values()) sink.send(this.finishedTask());
  }

  /** Plan privacy.epsilonBudget: true when a round asking `selected` sites would take ε past it; the federation then ends, saying why. */
  private overPrivacyBudget(selected: number): boolean {
    const refusal = privacyBudgetRefusal(this.o.plan, this.o.store, selected);
    if (!refusal) return false;
    this.emit(BUDGET_EXHAUSTED_EVENT, { ...refusal });
    this.o.log.warn(refusal, describeRefusal(refusal));
    this.finish('privacy budget exhausted');
    return true;
  }

  // ---- pretraining ----

  /**
   * The server optimiser's moments (FedAdam, …) belong to the restoration objective's updates: the fine-tuning
   * stage starts them afresh instead of steering its first steps with another objective's history.
   */
  private forgetPretrainingAggregationState(): void {
    if (!this.o.store.getMeta(AGGREGATION_STATE_KEY)) return;
    this.o.strategy.reset?.();
    this.o.store.deleteMeta(AGGREGATION_STATE_KEY);
    this.o.log.info({ strategy: this.o.strategy.name }, 'fine-tuning starts with fresh aggregation state (the pretraining stage\'s is dropped)');
  }

  // ---- tasks ----

  /** A round's task settings: the plan's, the stage's, then what each feature adds. */
  settings(baseModelHash: string, stage: Stage): TaskSettings {
    const { plan } = this.o;
    const settings: TaskSettings = {
      federation: this.o.federationId,
      // The coordinator's file paths (pretrained, source2d) stay here: sites need the layout and seed only.
      model: { ...plan.model, pretrained: undefined, source2d: undefined },
      local: plan.local,
      share: plan.share,
      sharedTensors: this.sharedNames,
      data: plan.data,
      totalRounds: plan.rounds,
      ...stageSettings(plan, stage),
    };
    for (const f of this.features) Object.assign(settings, f.taskSettings?.(baseModelHash, stage));
    return settings;
  }

  /**
   * The round's task for `site` shaped for what its sink announced, or undefined when the task needs a feature the
   * site lacks: then it is not sent, the site is not waited for, and a task.withheld event names site and features.
   */
  private taskFor(open: OpenRound, site: string, sink: TaskSink): TaskMessage | undefined {
    const caps = sink.capabilities ?? { protocolVersion: PROTOCOL_VERSION, features: new Set(SITE_FEATURES) };
    const shaped = settingsForSite({ ...this.settings(open.row.baseModelHash, this.stageOf(open.row)), ...open.collector?.input.siteSettings(site) }, caps);
    if (shaped.ok) return this.trainTask(open.row, site, shaped.settings);
    const { round } = open.row;
    if (!open.declined?.has(site)) {
      this.emit('task.withheld', { round, site, missing: shaped.missing, protocolVersion: caps.protocolVersion });
      this.o.log.warn({ round, site, missing: shaped.missing, protocolVersion: caps.protocolVersion }, `task withheld: site ${site} (protocol version ${caps.protocolVersion}) lacks feature(s) ${shaped.missing.join(', ')} this round's settings need; upgrade it`);
    }
    // Not waited for, like a site that declined (the round may close now if everyone else has reported).
    void this.siteDeclined(site, round).catch((e: unknown) => this.retryLater(`withheld-${round}-${site}`, `closing round ${round} without ${site}`, e, () => this.siteDeclined(site, round)));
    return undefined;
  }

  /** A TRAIN task with `settings` as shaped for the site by taskFor(). */
  private trainTask(row: RoundRow, site: string, settings: TaskSettings): TaskMessage {
    const manifest: TaskManifest = {
      // Stable per round and site: a re-sent task is the same task.
      taskId: `r${row.round}-${site}`,
      kind: 'TRAIN',
      round: row.round,
      modelHash: row.baseModelHash,
      modelSize: this.o.models.size(row.baseModelHash),
      deadlineUnixMs: row.deadlineAt,
      settingsJson: JSON.stringify(settings),
    };
    return { ...manifest, signature: this.o.sign(manifestBytes(manifest)) };
  }

  /** The open round's stage; for another row, the stage a round opening now would have. */
  private stageOf(row: RoundRow): Stage {
    return this.open?.row.round === row.round ? this.open.stage : stageAfter(this.o.plan, this.o.store.closedRoundCount());
  }

  private finishedTask(): TaskMessage {
    const manifest: TaskManifest = {
      taskId: `finished-${randomUUID()}`,
      kind: 'FINISHED',
      round: this.o.store.lastRoundNumber(),
      modelHash: this.currentModelHash,
      modelSize: this.o.models.size(this.currentModelHash),
      deadlineUnixMs: 0,
      settingsJson: '{}',
    };
    return { ...manifest, signature: this.o.sign(manifestBytes(manifest)) };
  }

  private roundContext(row: RoundRow): { expected: number; deltaUpdates: boolean } {
    return { expected: row.selected.length, deltaUpdates: this.o.plan.compression.delta };
  }

  /** Strategy state and DP accountant from the store, so a restarted coordinator continues them. */
  private restoreAggregationState(): void {
    const { store, models, strategy, log } = this.o;
    const raw = store.getMeta(AGGREGATION_STATE_KEY);
    if (raw && strategy.restoreState) {
      const s = JSON.parse(raw) as { json: string; tensors: string | null };
      strategy.restoreState({ json: s.json, tensors: s.tensors ? models.load(s.tensors) : undefined });
      log.info({ strategy: strategy.name, tensors: s.tensors?.slice(0, 12) ?? null }, 'aggregation state restored');
    }
  }

  /** An event with its stable id (events/outbox.ts eventId): the same fact written twice is one outbox row. */
  private event(type: FederationEventType, fields: Record<string, unknown>): FederationEvent {
    return { id: eventId(this.o.federationId, type, fields), type, federation: this.o.federationId, at: new Date().toISOString(), ...fields };
  }

  private emit(type: FederationEventType, fields: Record<string, unknown>): void {
    this.o.bus.publish(this.event(type, fields));
  }
}

function shuffle<T>(xs: T[]): T[] {
  const a = [...xs];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}
