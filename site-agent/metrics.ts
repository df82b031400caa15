/**
 * A site agent's own Prometheus metrics (`medfl site run --metrics-port N`): what the agent is doing, how far, on
 * which engine, and how long its downloads, training and uploads take. Nothing about the data: no case counts, no
 * losses (those go to the coordinator as the plan's metrics, and a site admin reads them in the wire audit).
 * The agent reports to it through AgentObserver; state and progress are read from the agent at scrape time.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { SecAggStep } from './secagg/round.ts';

export type AgentPhase = 'idle' | 'downloading' | 'training' | 'uploading';
export type TaskOutcome = 'completed' | 'refused' | 'declined' | 'failed';

/** What the agent tells its metrics (agent.ts calls these; none may throw). */
export interface AgentObserver {
  /** The agent entered `phase`, working on the task of `round` (none for idle). */
  phase(phase: AgentPhase, round?: number): void;
  /** A unit of work ended: update acknowledged (completed), refused by the coordinator, declined under policy, or failed. */
  task(outcome: TaskOutcome): void;
  /** Bytes that crossed the wire: a model downloaded (0 when cached), an update uploaded. */
  transferred(direction: 'download' | 'upload', bytes: number): void;
  /** A secure-aggregation round reached `step` (secagg/round.ts), synchronously, before the site sends its next message. */
  secAggStep?(step: SecAggStep, round: number): void;
}

export interface AgentActivity {
  state: AgentPhase;
  progress: number;
  engine: string | undefined;
}

const PHASES: AgentPhase[] = ['idle', 'downloading', 'training', 'uploading'];
const OUTCOMES: TaskOutcome[] = ['completed', 'refused', 'declined', 'failed'];

export class SiteMetrics implements AgentObserver {
  readonly registry = new Registry();
  private readonly phaseSeconds: Histogram<'phase'>;
  private readonly tasks: Counter<'outcome'>;
  private readonly bytes: Counter<'direction'>;
  private current: AgentPhase = 'idle';
  private since = performance.now();
  private round = 0;
  private activity: () => AgentActivity | undefined = () => undefined;

  constructor(labels: { site: string; federation: string }) {
    const registers = [this.registry];
    this.registry.setDefaultLabels(labels);
    collectDefaultMetrics({ register: this.registry });
    this.phaseSeconds = new Histogram({
      name: 'medfl_site_phase_seconds',
      help: 'Seconds spent per task in each phase: downloading the model, training, uploading the update',
      labelNames: ['phase'],
      buckets: [0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200],
      registers,
    });
    this.tasks = new Counter({ name: 'medfl_site_tasks_total', help: 'Units of work ended, by outcome', labelNames: ['outcome'], registers });
    for (const outcome of OUTCOMES) this.tasks.inc({ outcome }, 0);
    this.bytes = new Counter({ name: 'medfl_site_transfer_bytes_total', help: 'Bytes downloaded (models) and uploaded (updates)', labelNames: ['direction'], registers });
    for (const direction of ['download', 'upload']) this.bytes.inc({ direction }, 0);
    const self = this;
    new Gauge({
      name: 'medfl_site_phase',
      help: '1 for the phase the agent is in (idle, downloading, training, uploading), 0 for the others',
      labelNames: ['phase'],
      registers,
      collect() {
        const state = self.activity()?.state ?? self.current;
        for (const phase of PHASES) this.set({ phase }, phase === state ? 1 : 0);
      },
    });
    new Gauge({ name: 'medfl_site_task_progress', help: 'Progress of the current phase, 0 to 1', registers, collect() { this.set(self.activity()?.progress ?? 0); } });
    new Gauge({ name: 'medfl_site_round', help: 'Round of the latest task worked on (0 before the first)', registers, collect() { this.set(self.round); } });
    new Gauge({
      name: 'medfl_site_engine_info',
      help: 'The compute engine training runs on, as a label (value 1); absent before the first training',
      labelNames: ['engine'],
      registers,
      collect() {
        this.reset();
        const engine = self.activity()?.engine;
        if (engine) this.set({ engine }, 1);
      },
    });
  }

  /** Where state, progress and engine are read at each scrape (the agent, once constructed). */
  follow(activity: () => AgentActivity): void {
    this.activity = activity;
  }

  phase(phase: AgentPhase, round?: number): void {
    const now = performance.now();
    if (this.current !== 'idle' && this.current !== phase) this.phaseSeconds.observe({ phase: this.current }, (now - this.since) / 1000);
    if (this.current !== phase) this.since = now;
    this.current = phase;
    if (round !== undefined) this.round = round;
  }

  task(outcome: TaskOutcome): void {
    this.tasks.inc({ outcome });
  }

  transferred(direction: 'download' | 'upload', bytes: number): void {
    this.bytes.inc({ direction }, bytes);
  }

  async exposition(): Promise<{ body: string; contentType: string }> {
    return { body: await this.registry.metrics(), contentType: this.registry.contentType };
  }
}
