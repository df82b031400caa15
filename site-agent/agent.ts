/**
 * The site agent's main loop. It dials out (hospitals open no inbound port), keeps a task stream open,
 * heartbeats on its own timer (so a long training step is never mistaken for death), and reconnects
 * with exponential backoff and full jitter, logging every retry. For each TRAIN task it downloads the
 * global model (cached by hash), trains locally with the site's own head, and sends back only the
 * plan's shared tensors. An update waits in the outbox until the coordinator acknowledges it.
 */
import { backoffDelay } from './transport/backoff.ts';
import * as grpc from '@grpc/grpc-js';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { SiteHome } from './home.ts';
import { FederationClient, type WireTask } from './transport/client.ts';
import { ModelCache, ensureWithRetry, modelSizeLimit } from './transport/model-cache.ts';
import { WireAudit } from './transport/wire-audit.ts';
import { tlsClockHint } from './transport/tls-hint.ts';
import { startHeartbeatLoop } from './transport/heartbeat-loop.ts';
import { OutboxEntrySchema, outboxPath, parseWireTask, type OutboxEntry } from './transport/task-wire.ts';
import { encodeForUpload, uploadUpdate } from './transport/upload.ts';
import { float32Safetensors } from '../shared/tensors/update-codec.ts';
import { LocalTraining } from './training/local-training.ts';
import { SitePolicy, declineTask } from './policy.ts';
import { runSecAggRound, SECAGG_STEPS } from './secagg/round.ts';
import { applySiteTask } from './task-config.ts';
import { manifestBytes, type TaskSettings } from '../shared/protocol/task.ts';
import { decodeTaskSettings, UnsupportedTaskError } from '../shared/protocol/compatibility.ts';
import { verifyManifest } from '../shared/security/site-identity.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import type { Logger } from '../shared/util/log.ts';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../shared/protocol/reconnect.ts';
import type { AgentActivity, AgentObserver, AgentPhase } from './metrics.ts';
import { medflVersion } from '../shared/util/version.ts';

export interface AgentOptions {
  dir: string;
  dataDir: string;
  log: Logger;
  /** Append every outgoing message's summary to this file (see wire-audit.ts). */
  auditPath?: string;
  /** Resolve run() when the coordinator says the federation is finished. */
  exitWhenFinished?: boolean;
  /** The heartbeat interval where the coordinator names none (an older coordinator) or a beat failed; default 5 s. */
  heartbeatMs?: number;
  maxBackoffMs?: number;
  /** Force a compute engine (e.g. "cpu"); otherwise the best available one is chosen. */
  engine?: string;
  /** Told of phases, task outcomes and bytes transferred (the agent's metrics, site-agent/metrics.ts). */
  observer?: AgentObserver;
}

export class SiteAgent {
  private readonly home: SiteHome;
  private readonly cache: ModelCache;
  private readonly training: LocalTraining;
  private readonly audit?: WireAudit;
  private client: FederationClient | undefined;
  private stopped = false;
  private finished = false;
  private state: 'idle' | 'downloading' | 'training' | 'uploading' = 'idle';
  private progress = 0;
  private currentTask = '';
  private readonly queue: WireTask[] = [];
  private working = false;
  private readonly done = new Set<string>();
  /** Set on each new connection: look for outbox entries from an earlier run before taking new work. */
  private outboxUnchecked = true;
  private wake: (() => void) | undefined;
  private readonly coordinatorKey: Buffer;
  /** The site's own policy file (site-agent/policy.ts); checked before any new task is worked on. */
  private readonly policy: SitePolicy;

  constructor(private readonly o: AgentOptions) {
    this.home = new SiteHome(o.dir);
    const config = this.home.config();
    this.coordinatorKey = Buffer.from(config.coordinatorPublicKey, 'base64');
    this.policy = SitePolicy.load(o.dir, config.federationId);
    this.cache = new ModelCache(this.home.modelCacheDir);
    this.training = new LocalTraining({ siteName: config.siteName, dataDir: o.dataDir, localDir: this.home.localDir, log: o.log, engine: o.engine });
    if (o.auditPath) this.audit = new WireAudit(o.auditPath);
    mkdirSync(this.home.outboxDir, { recursive: true });
  }

  get siteName(): string {
    return this.home.config().siteName;
  }

  /** What the agent is doing now (for its metrics). */
  get activity(): AgentActivity {
    return { state: this.state, progress: this.progress, engine: this.training.engineName };
  }

  private enter(state: AgentPhase, round?: number): void {
    this.state = state;
    this.o.observer?.phase(state, round);
  }

  stop(): void {
    this.stopped = true;
    this.client?.close();
    this.wake?.();
  }

  /** Runs until stop(), or until the federation finishes when exitWhenFinished is set. */
  async run(): Promise<void> {
    const { log } = this.o;
    let attempt = 0;
    while (!this.stopped && !(this.finished && this.o.exitWhenFinished)) {
      this.client = new FederationClient(this.home, { audit: this.audit });
      const stopHeartbeat = this.startHeartbeat(() => { attempt = 0; });
      this.outboxUnchecked = true;
      void this.drain();
      try {
        await this.consumeTasks(this.client);
        if (this.stopped || (this.finished && this.o.exitWhenFinished)) break;
        log.warn('task stream ended; reconnecting');
      } catch (e) {
        const err = e as grpc.ServiceError;
        if (err.code === grpc.status.PERMISSION_DENIED) {
          log.error({ reason: err.details }, 'the coordinator refused this site; stopping (ask the coordinator admin)');
          throw new Error(`coordinator refused this site: ${err.details}`);
        }
        if (this.stopped) break;
        const reason = err.details ?? err.message;
        // A certificate "not yet valid" is nearly always this machine's clock: say so, with the local time.
        const hint = tlsClockHint(reason, { caPem: () => this.home.caPem() });
        log.warn({ code: err.code !== undefined ? grpc.status[err.code] : undefined, reason, ...(hint ? { hint } : {}) }, 'lost the coordinator');
      } finally {
        stopHeartbeat();
        // Finished: let the task in flight send its last upload and metrics before the channel closes.
        // (On a lost connection we close at once; the task retries on the next channel.)
        if (this.finished && this.o.exitWhenFinished) {
          await this.idle();
          this.discardOutboxOfFinishedFederation();
        }
        this.client.close();
      }
      attempt++;
      const delay = backoffDelay(attempt, this.o.maxBackoffMs ?? SITE_MAX_RECONNECT_BACKOFF_MS);
      log.info({ attempt, delayMs: delay }, 'reconnecting to the coordinator after backoff');
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, delay);
      });
    }
    await this.idle();
  }

  /** Resolves when no task is being worked on. */
  private async idle(): Promise<void> {
    while (this.working) await new Promise((r) => setTimeout(r, 50));
  }

  /** Heartbeats at the interval the coordinator names (heartbeat-loop.ts); returns the stop function. */
  private startHeartbeat(onOk: () => void): () => void {
    return startHeartbeatLoop({
      fallbackMs: this.o.heartbeatMs,
      beat: async () => {
        const client = this.client;
        if (!client) return undefined;
        const r = await client.heartbeat({ state: this.state, progress: this.progress, taskId: this.currentTask, engine: this.training.engineName ?? '', softwareVersion: medflVersion() });
        onOk();
        return r.nextHeartbeatMs;
      },
      onError: (e) => this.o.log.debug({ reason: (e as grpc.ServiceError).details ?? (e as Error).message }, 'heartbeat failed'),
    });
  }

  private consumeTasks(client: FederationClient): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const stream = client.subscribeTasks(this.cache.hashes());
      const stopWatch = setInterval(() => {
        if (this.stopped || (this.finished && this.o.exitWhenFinished)) stream.cancel();
      }, 200);
      stream.on('data', (t: WireTask) => this.onTask(t));
      stream.on('error', (e: grpc.ServiceError) => {
        clearInterval(stopWatch);
        if (e.code === grpc.status.CANCELLED && (this.stopped || this.finished)) resolve();
        else reject(e);
      });
      stream.on('end', () => {
        clearInterval(stopWatch);
        resolve();
      });
    });
  }

  private onTask(raw: WireTask): void {
    const { log } = this.o;
    // The wire edge: identifiers that name files (task id, round, hashes) are checked before anything uses them.
    let t: WireTask;
    try {
      t = parseWireTask(raw);
    } catch (e) {
      log.error({ reason: (e as Error).message }, 'malformed task from the coordinator: ignored (nothing was written)');
      return;
    }
    if (!verifyManifest(this.coordinatorKey, manifestBytes(t), t.signature)) {
      log.error({ task: t.taskId }, 'task signature does not verify against the coordinator key from enrolment: ignored');
      return;
    }
    if (t.kind === 'FINISHED') {
      log.info({ rounds: t.round, model: t.modelHash.slice(0, 12) }, 'federation finished');
      this.finished = true;
      return;
    }
    if (t.kind !== 'TRAIN') return;
    if (this.done.has(t.taskId) || this.queue.some((q) => q.taskId === t.taskId) || this.currentTask === t.taskId) return;
    this.queue.push(t);
    void this.drain();
  }

  private async drain(): Promise<void> {
    if (this.working) return;
    this.working = true;
    try {
      if (this.outboxUnchecked) {
        this.outboxUnchecked = false;
        await this.flushOutbox();
      }
      while (this.queue.length > 0 && !this.stopped) {
        const t = this.queue.shift()!;
        await this.work(t.taskId, () => this.runTask(t), 'task failed; the coordinator offers it again while the round waits for this site');
      }
    } finally {
      this.working = false;
    }
  }

  private async runTask(t: WireTask): Promise<void> {
    const { log } = this.o;
    if (t.deadlineUnixMs > 0 && t.deadlineUnixMs < Date.now()) {
      log.warn({ task: t.taskId }, 'task deadline already passed: skipped');
      return;
    }
    // After the signature check (onTask): tolerance applies to verified bytes only (docs/compatibility.md).
    let settings: TaskSettings;
    try {
      const decoded = decodeTaskSettings(t.settingsJson);
      settings = decoded.settings;
      if (decoded.ignored.length > 0) log.warn({ round: t.round, task: t.taskId, ignored: decoded.ignored }, 'task settings name tuning fields this site does not know: ignored (a newer coordinator)');
    } catch (e) {
      if (!(e instanceof UnsupportedTaskError)) throw e;
      log.error({ round: t.round, task: t.taskId, reason: e.message }, 'task refused: this site cannot honour it');
      await declineTask(this.client!.connection, { round: t.round, taskId: t.taskId, reason: e.message }, log);
      this.o.observer?.task('declined');
      return;
    }
    const entryPath = outboxPath(this.home.outboxDir, t.taskId, 'json');
    let entry: OutboxEntry;
    if (existsSync(entryPath)) {
      // Trained before a crash or a lost connection: send the same update again, under the same id.
      entry = OutboxEntrySchema.parse(JSON.parse(readFileSync(entryPath, 'utf8')));
      log.info({ round: t.round }, 'resending an update from the outbox');
    } else {
      const verdict = this.policy.admit(t, settings);
      if (!verdict.ok) {
        log.warn({ round: t.round, task: t.taskId, reason: verdict.reason }, "task declined: it breaks this site's policy");
        await declineTask(this.client!.connection, { round: t.round, taskId: t.taskId, reason: verdict.reason }, log);
        this.o.observer?.task('declined');
        return;
      }
      if (verdict.epsilon !== undefined) log.info({ round: t.round, epsilonSpent: verdict.epsilon }, 'privacy spent by this site so far (if the coordinator applies the announced DP)');
      // A plan this site's own head (task.yaml) cannot train with is declined before anything is downloaded.
      let headProblem: string | undefined;
      try {
        applySiteTask(settings, this.training.siteTask);
      } catch (e) {
        headProblem = (e as Error).message;
      }
      if (headProblem) {
        log.warn({ round: t.round, task: t.taskId, reason: headProblem }, "task declined: it conflicts with this site's task file");
        await declineTask(this.client!.connection, { round: t.round, taskId: t.taskId, reason: headProblem }, log);
        this.o.observer?.task('declined');
        return;
      }
      // A site without labels (unlabelled scans only) joins the pretraining rounds and declines fine-tuning ones,
      // before downloading anything, so the round does not wait for it until the deadline.
      if (!settings.pretraining && !(await this.training.hasLabelledTrainingCases(settings))) {
        const reason = 'this site has no labelled training case: it takes part in pretraining rounds only';
        log.warn({ round: t.round, task: t.taskId }, `task declined: ${reason}`);
        await declineTask(this.client!.connection, { round: t.round, taskId: t.taskId, reason }, log);
        this.o.observer?.task('declined');
        return;
      }
      // The plan may send the model float16/int8-encoded (settings.modelFile); the task's hash stays the round's base.
      const file = settings.modelFile ?? { hash: t.modelHash, size: t.modelSize };
      const teacherSize = settings.teacherStudent?.enabled ? settings.teacher?.modelSize : undefined;
      const sizeLimit = modelSizeLimit(settings.model);
      for (const [what, size] of [['model', file.size], ['teacher model', teacherSize]] as const) {
        if (size === undefined || size <= sizeLimit) continue;
        log.error({ round: t.round, task: t.taskId, announcedBytes: size, limitBytes: sizeLimit }, `task refused: the announced ${what} is larger than the plan's architecture allows; nothing was downloaded`);
        throw new Error(`the coordinator announced a ${what} of ${size} bytes, more than the ${sizeLimit} bytes the plan's ${settings.model.architecture} architecture can account for (every parameter as float32, with header); not downloaded`);
      }
      this.enter('downloading', t.round);
      const bytes = await this.fetchModel(t, file.hash, file.size);
      this.o.observer?.transferred('download', bytes);
      log.info({ round: t.round, model: t.modelHash.slice(0, 12), downloadedBytes: bytes, cached: bytes === 0, encoding: settings.modelFile?.encoding ?? 'float32' }, 'global model ready');
      // Noisy student: the teacher is a model version like any other, fetched by hash through the same cache.
      const teacher = settings.teacherStudent?.enabled ? settings.teacher : undefined;
      if (teacher) {
        const tb = await this.fetchModel(t, teacher.modelHash, teacher.modelSize);
        this.o.observer?.transferred('download', tb);
        log.info({ round: t.round, generation: teacher.generation, model: teacher.modelHash.slice(0, 12), downloadedBytes: tb, cached: tb === 0 }, 'teacher model ready');
      }
      this.enter('training', t.round);
      this.progress = 0;
      // Decoded once: training, the secure-aggregation delta and the upload encoding all start from it.
      const baseModel = float32Safetensors(this.cache.read(file.hash));
      const result = await this.training.run(settings, baseModel, {
        round: t.round,
        modelHash: t.modelHash,
        onProgress: (p) => { this.progress = p; },
        ...(teacher ? { teacherBytes: this.cache.read(teacher.modelHash) } : {}),
      });
      if (settings.secureAggregation) {
        // The masked input replaces the upload; a session cannot be resumed, so nothing goes to the outbox.
        this.enter('uploading', t.round);
        this.progress = 0;
        await runSecAggRound({
          home: this.home, connection: this.client!.connection, log, round: t.round, taskId: t.taskId, deadlineUnixMs: t.deadlineUnixMs, settings,
          update: result.update, base: baseModel, numSamples: result.numSamples,
          onStep: (step) => {
            this.progress = (SECAGG_STEPS.indexOf(step) + 1) / SECAGG_STEPS.length;
            this.o.observer?.secAggStep?.(step, t.round);
          },
        });
        this.o.observer?.task('completed');
        const m = await this.client!.reportMetrics({ round: t.round, taskId: t.taskId, values: result.metrics });
        if (!m.accepted) log.warn({ reason: m.reason }, 'metrics refused');
        return;
      }
      entry = { updateId: `${t.taskId}-${randomUUID()}`, taskId: t.taskId, round: t.round, baseModelHash: t.modelHash, numSamples: result.numSamples, metrics: result.metrics };
      // Encoded now (plan.compression), so a resend after a crash sends the very same bytes.
      writeFileAtomic(outboxPath(this.home.outboxDir, t.taskId, 'safetensors'), encodeForUpload(result.update, settings, () => baseModel));
      writeFileAtomic(entryPath, JSON.stringify(entry));
    }
    await this.deliver(entry, t.deadlineUnixMs || undefined);
  }

  /**
   * A model for task `t`, from the cache or downloaded; a failed download is resumed with backoff until the task's
   * deadline (10 minutes for a task without one) instead of costing the site the round.
   */
  private fetchModel(t: WireTask, hash: string, size: number): Promise<number> {
    return ensureWithRetry(this.cache, () => this.client!, hash, size, {
      until: t.deadlineUnixMs > 0 ? t.deadlineUnixMs : Date.now() + 600_000,
      maxBackoffMs: this.o.maxBackoffMs,
      cancelled: () => this.stopped,
      onProgress: (d, n) => {
        this.progress = d / n;
      },
      log: this.o.log,
    });
  }

  /**
   * Uploads an outbox entry (same update id on every try), reports its metrics once acknowledged, and
   * clears the entry once the coordinator has answered for good (acknowledged or refused).
   */
  private async deliver(entry: OutboxEntry, deadlineUnixMs?: number): Promise<void> {
    const { log } = this.o;
    this.enter('uploading', entry.round);
    const payload = readFileSync(outboxPath(this.home.outboxDir, entry.taskId, 'safetensors'));
    // "Not now" answers (the coordinator's disk is full, …) are retried until the round's deadline, at least a couple
    // of minutes (a restarted coordinator extends it); the entry stays in the outbox whatever happens.
    const until = Math.max(deadlineUnixMs ?? 0, Date.now() + 120_000);
    const retry = { until, maxBackoffMs: this.o.maxBackoffMs, cancelled: () => this.stopped, log };
    const ack = await uploadUpdate(() => this.client!, { ...entry, payload }, (p) => { this.progress = p; }, retry);
    this.o.observer?.transferred('upload', payload.length);
    this.o.observer?.task(ack.accepted ? 'completed' : 'refused');
    if (!ack.accepted) {
      log.warn({ round: entry.round, reason: ack.reason }, 'the coordinator refused the update');
    } else {
      log.info({ round: entry.round, duplicate: ack.duplicate, samples: entry.numSamples }, 'update acknowledged');
      const m = await this.client!.reportMetrics({ round: entry.round, taskId: entry.taskId, values: entry.metrics });
      if (!m.accepted) log.warn({ reason: m.reason }, 'metrics refused');
    }
    // entry.taskId matched TASK_ID_PATTERN (no separators), and each f is a plain name inside the outbox.
    for (const f of readdirSync(this.home.outboxDir)) if (f.startsWith(`${entry.taskId}.`)) rmSync(join(this.home.outboxDir, f), { force: true });
  }

  /**
   * The federation is over, so every round is closed: an update still in the outbox (its upload was cut off by the end,
   * e.g. a restart that raced the last round) can never count. Said once and removed, rather than left for ever.
   */
  private discardOutboxOfFinishedFederation(): void {
    const files = readdirSync(this.home.outboxDir);
    const entries = files.filter((f) => f.endsWith('.json')).length;
    if (entries === 0) return;
    this.o.log.warn({ entries }, 'the federation finished with updates still in the outbox: their rounds are closed, so they are discarded');
    // Plain names listed from the outbox folder itself (nothing from the wire).
    for (const f of files) rmSync(join(this.home.outboxDir, f), { force: true });
  }

  /**
   * Entries left by an earlier run whose task will not come again (e.g. the agent died after the ack but
   * before its metrics, so the coordinator does not re-send the task): deliver them now. A duplicate ack
   * changes nothing at the coordinator; a refusal (round long closed) settles the entry.
   */
  private async flushOutbox(): Promise<void> {
    for (const f of readdirSync(this.home.outboxDir).filter((x) => x.endsWith('.json')).sort()) {
      const parsed = OutboxEntrySchema.safeParse(safeJson(readFileSync(join(this.home.outboxDir, f), 'utf8')));
      // Written by this agent, but checked like input: its ids name files and go back on the wire.
      if (!parsed.success || `${parsed.data.taskId}.json` !== f) {
        this.o.log.warn({ file: f }, 'outbox entry is malformed or misnamed: skipped (left in place for the site admin)');
        continue;
      }
      const entry = parsed.data;
      if (this.queue.some((q) => q.taskId === entry.taskId) || !existsSync(outboxPath(this.home.outboxDir, entry.taskId, 'safetensors'))) continue;
      this.o.log.info({ round: entry.round }, 'delivering an update left in the outbox by an earlier run');
      // As the current task: the same task re-sent meanwhile is not run twice.
      await this.work(entry.taskId, () => this.deliver(entry), 'outbox delivery failed; will retry on the next connection');
    }
  }

  /** Runs one unit of work as the current task; failures are logged (the work is retried later), state is reset. */
  private async work(taskId: string, fn: () => Promise<void>, failure: string): Promise<void> {
    this.currentTask = taskId;
    try {
      await fn();
      this.done.add(taskId);
    } catch (e) {
      this.o.log.warn({ task: taskId, reason: (e as Error).message }, failure);
      this.o.observer?.task('failed');
    } finally {
      this.enter('idle');
      this.progress = 0;
      this.currentTask = '';
    }
  }
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

export { backoffDelay } from './transport/backoff.ts';
