/**
 * The coordinator's Prometheus metrics, in a registry of its own (not prom-client's global one, so two
 * coordinators in one process, as in tests, never mix their numbers). Counters and histograms move from the
 * event stream (event-metrics.ts) and two hooks (authentication failures, finished transfers); gauges are read
 * from the engine and the store when Prometheus scrapes, so they are right after a restart too.
 * docs/operations.md lists every name and the alerts built on them.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { CoordinatorStore } from '../store/store.ts';
import { eventFacts, siteVersion } from './status-json.ts';
import { readPrivacyBudget } from '../rounds/privacy-budget.ts';
import type { RoundEngine, PrivacySpent } from '../rounds/round-engine.ts';
import { PRIVACY_KEY } from '../rounds/round-engine.ts';
import { AuthError } from '../auth/interceptor.ts';
import { AUTH_FAILURE_REASONS, ROUND_FAILURE_CAUSES, UPDATE_REJECTION_REASONS, authFailureReason } from '../events/reasons.ts';
import type { TransferAdmission } from '../server/transfer-admission.ts';

export interface CoordinatorMetricsDeps {
  federationId: string;
  store: CoordinatorStore;
  engine: Pick<RoundEngine, 'connectedSites' | 'openRoundNumber' | 'isFinished'>;
  /** Whether the plan has client-level DP (plan.aggregation.dp): only then is ε exported. */
  tracksPrivacy: boolean;
  /** The SQLite file (its -wal beside it is counted too). */
  dbPath: string;
  /** Where uploads in flight are written (updates/.partial). */
  partialDir: string;
  /** The gates model downloads and uploads pass (running and waiting transfers). */
  transfers?: Pick<TransferAdmission, 'gate'>;
}

export interface Transfer {
  direction: 'download' | 'upload';
  bytes: number;
  seconds: number;
}

const MiB = 1024 * 1024;

export class CoordinatorMetrics {
  readonly registry = new Registry();
  readonly roundsOpened: Counter;
  readonly roundsClosed: Counter;
  readonly roundsFailed: Counter<'cause'>;
  readonly roundDuration: Histogram<'outcome'>;
  readonly updatesAccepted: Counter<'site'>;
  readonly updatesRejected: Counter<'site' | 'reason'>;
  readonly updatesFlagged: Counter<'site'>;
  readonly tasksDeclined: Counter<'site'>;
  readonly tasksWithheld: Counter<'site'>;
  readonly rollbacks: Counter;
  readonly authFailures: Counter<'reason'>;
  readonly adminAuthFailures: Counter;
  readonly transferBytes: Histogram<'direction'>;
  readonly transferSeconds: Histogram<'direction'>;

  constructor(d: CoordinatorMetricsDeps) {
    const registers = [this.registry];
    const { store, engine } = d;
    const enrolled = () => store.listSites().filter((s) => s.state === 'enrolled').map((s) => s.name);
    // Counters with labels appear at 0 before their first increment (per enrolled site, for the per-site ones):
    // rate() and increase() need an earlier sample, or the first rejection or failed round would go unseen.
    const perSite = (reasons?: readonly string[]) =>
      function (this: Counter<string>) {
        for (const site of enrolled()) {
          if (reasons) for (const reason of reasons) this.inc({ site, reason }, 0);
          else this.inc({ site }, 0);
        }
      };
    this.registry.setDefaultLabels({ federation: d.federationId });
    collectDefaultMetrics({ register: this.registry });

    this.roundsOpened = new Counter({ name: 'medfl_rounds_opened_total', help: 'Rounds opened (tasks sent to the selected sites)', registers });
    this.roundsClosed = new Counter({ name: 'medfl_rounds_closed_total', help: 'Rounds closed with a new global model version', registers });
    this.roundsFailed = new Counter({ name: 'medfl_rounds_failed_total', help: 'Rounds failed, by cause (deadline without quorum, aggregate refused, secure aggregation, restart)', labelNames: ['cause'], registers });
    this.roundDuration = new Histogram({
      name: 'medfl_round_duration_seconds',
      help: 'From a round opening to its close or failure',
      labelNames: ['outcome'],
      buckets: [5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400],
      registers,
    });
    this.updatesAccepted = new Counter({ name: 'medfl_updates_accepted_total', help: 'Updates stored and folded into a round, by site', labelNames: ['site'], registers, collect: perSite() });
    this.updatesRejected = new Counter({
      name: 'medfl_updates_rejected_total',
      help: 'Updates refused, by site and reason category (the log line has the full reason)',
      labelNames: ['site', 'reason'],
      registers,
      collect: perSite(UPDATE_REJECTION_REASONS),
    });
    this.updatesFlagged = new Counter({ name: 'medfl_updates_flagged_total', help: 'Accepted updates flagged for a sample-count jump, by site', labelNames: ['site'], registers, collect: perSite() });
    this.tasksDeclined = new Counter({ name: 'medfl_tasks_declined_total', help: 'Tasks a site declined under its own policy, by site', labelNames: ['site'], registers, collect: perSite() });
    this.tasksWithheld = new Counter({
      name: 'medfl_tasks_withheld_total',
      help: 'Tasks the coordinator did not send a selected site because the site lacks a protocol feature they need (upgrade it), by site',
      labelNames: ['site'],
      registers,
      collect: perSite(),
    });
    this.rollbacks = new Counter({ name: 'medfl_rollbacks_total', help: 'Operator rollbacks of the global model announced', registers });
    this.authFailures = new Counter({ name: 'medfl_auth_failures_total', help: 'Site calls refused by authentication, by reason', labelNames: ['reason'], registers });
    this.adminAuthFailures = new Counter({ name: 'medfl_admin_auth_failures_total', help: 'Admin endpoint requests refused for a missing or wrong token', registers });
    this.transferBytes = new Histogram({
      name: 'medfl_transfer_bytes',
      help: 'Bytes per finished model download or accepted update upload',
      labelNames: ['direction'],
      buckets: [0.25, 1, 4, 16, 64, 256, 1024].map((m) => m * MiB),
      registers,
    });
    this.transferSeconds = new Histogram({
      name: 'medfl_transfer_seconds',
      help: 'Seconds per finished model download (until the last chunk is handed to HTTP/2) or accepted update upload (header to last byte)',
      labelNames: ['direction'],
      buckets: [0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600],
      registers,
    });
    for (const cause of ROUND_FAILURE_CAUSES) this.roundsFailed.inc({ cause }, 0);
    for (const reason of AUTH_FAILURE_REASONS) this.authFailures.inc({ reason }, 0);

    const openRound = () => {
      const n = engine.openRoundNumber;
      return n === undefined ? undefined : store.getRound(n);
    };
    const transfers = d.transfers;
    if (transfers) {
      new Gauge({
        name: 'medfl_transfers_running',
        help: 'Model downloads and update uploads running now (at most the configured limit)',
        labelNames: ['direction'],
        registers,
        collect() {
          for (const direction of ['download', 'upload'] as const) this.set({ direction }, transfers.gate(direction).stats().running);
        },
      });
      new Gauge({
        name: 'medfl_transfers_waiting',
        help: 'Model downloads and update uploads waiting for a slot',
        labelNames: ['direction'],
        registers,
        collect() {
          for (const direction of ['download', 'upload'] as const) this.set({ direction }, transfers.gate(direction).stats().waiting);
        },
      });
    }
    new Gauge({ name: 'medfl_sites_connected', help: 'Sites with an open task stream', registers, collect() { this.set(engine.connectedSites().length); } });
    new Gauge({ name: 'medfl_sites_selected', help: 'Sites selected for the open round (0 between rounds)', registers, collect() { this.set(openRound()?.selected.length ?? 0); } });
    new Gauge({
      name: 'medfl_sites_reporting',
      help: 'Sites whose update for the open round is accepted (0 between rounds)',
      registers,
      collect() {
        const r = openRound();
        this.set(r ? store.updatesForRound(r.round).length : 0);
      },
    });
    new Gauge({
      name: 'medfl_sites',
      help: 'Sites known to the coordinator, by state',
      labelNames: ['state'],
      registers,
      collect() {
        const counts = { invited: 0, enrolled: 0, revoked: 0 };
        for (const s of store.listSites()) counts[s.state]++;
        for (const [state, n] of Object.entries(counts)) this.set({ state }, n);
      },
    });
    new Gauge({
      name: 'medfl_site_last_seen_timestamp_seconds',
      help: 'When each enrolled site last called the coordinator (heartbeat or task stream), Unix seconds',
      labelNames: ['site'],
      registers,
      collect() {
        this.reset(); // a revoked site drops out
        for (const s of store.listSites()) if (s.state === 'enrolled' && s.lastSeenAt !== null) this.set({ site: s.name }, s.lastSeenAt / 1000);
      },
    });
    new Gauge({
      name: 'medfl_site_info',
      help: 'Always 1, per enrolled site that has called: the MedFL release (version; unknown for a site too old to name it) and engine it last reported',
      labelNames: ['site', 'version', 'engine'],
      registers,
      collect() {
        this.reset(); // an upgraded site's old release drops out
        for (const s of store.listSites()) {
          const version = siteVersion(s);
          if (s.state === 'enrolled' && version !== null) this.set({ site: s.name, version, engine: s.engine ?? 'unknown' }, 1);
        }
      },
    });
    new Gauge({ name: 'medfl_round_open', help: 'Number of the open round (0 when none is open)', registers, collect() { this.set(engine.openRoundNumber ?? 0); } });
    new Gauge({
      name: 'medfl_round_deadline_timestamp_seconds',
      help: 'Deadline of the open round, Unix seconds (0 when none is open)',
      registers,
      collect() { this.set((openRound()?.deadlineAt ?? 0) / 1000); },
    });
    new Gauge({ name: 'medfl_federation_finished', help: '1 once every planned round has closed', registers, collect() { this.set(engine.isFinished ? 1 : 0); } });
    new Gauge({
      name: 'medfl_store_bytes',
      help: 'Size of the coordinator state database (state.db and its write-ahead log)',
      registers,
      collect() { this.set(fileSize(d.dbPath) + fileSize(`${d.dbPath}-wal`)); },
    });
    new Gauge({
      name: 'medfl_uploads_in_progress',
      help: 'Update uploads being received (partial files)',
      registers,
      collect() { this.set(existsSync(d.partialDir) ? readdirSync(d.partialDir).length : 0); },
    });
    if (d.tracksPrivacy) {
      const spent = (): PrivacySpent | undefined => {
        const raw = store.getMeta(PRIVACY_KEY);
        return raw ? (JSON.parse(raw) as PrivacySpent) : undefined;
      };
      new Gauge({
        name: 'medfl_privacy_epsilon_spent',
        help: 'Client-level DP epsilon spent so far at the plan delta (+Inf when the noise multiplier is 0: no guarantee)',
        registers,
        collect() {
          const p = spent();
          this.set(p ? (p.epsilon ?? Number.POSITIVE_INFINITY) : 0);
        },
      });
      new Gauge({
        name: 'medfl_privacy_epsilon_budget',
        help: 'The plan privacy.epsilonBudget (client-level DP epsilon at the plan delta); absent without one',
        registers,
        collect() {
          this.reset();
          const b = readPrivacyBudget(store);
          if (b) this.set(b.epsilon);
        },
      });
      new Gauge({
        name: 'medfl_privacy_budget_exhausted',
        help: '1 once the coordinator refused to open a round that would take epsilon past the plan budget (the federation then finished)',
        registers,
        collect() {
          // Only a finished federation can have been stopped by its budget: skip reading the event history otherwise.
          this.set(engine.isFinished && eventFacts(store).budgetRefusal !== undefined ? 1 : 0);
        },
      });
      new Gauge({ name: 'medfl_privacy_dp_rounds', help: 'Rounds released under client-level DP so far', registers, collect() { this.set(spent()?.rounds ?? 0); } });
    }
  }

  /** The auth interceptor's hook (both transports): one refused site call. Anything but an AuthError is the coordinator's own failure. */
  readonly authFailed = (e: unknown): void => {
    this.authFailures.inc({ reason: e instanceof AuthError ? authFailureReason(e.message) : 'coordinator_error' });
  };

  /** The federation service's hook: one finished download or accepted upload. */
  readonly transferred = (t: Transfer): void => {
    this.transferBytes.observe({ direction: t.direction }, t.bytes);
    this.transferSeconds.observe({ direction: t.direction }, t.seconds);
  };

  /** The text exposition format, and its content type. */
  async exposition(): Promise<{ body: string; contentType: string }> {
    return { body: await this.registry.metrics(), contentType: this.registry.contentType };
  }
}

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}
