/**
 * The data behind the admin endpoint's dashboard (dashboard/): the store's view (status-json.ts, exactly what
 * `medfl status --json` prints) plus what only the running coordinator knows — the round's phase and deadline, which
 * sites are connected and on which protocol, the plan, the ε the plan will have spent by its last round — the
 * contribution ledger's head and its verification, and the event history for the live feed. Read-only.
 */
import type { Plan } from '../../shared/plan/schema.ts';
import type { EventBus, FederationEvent } from '../../shared/events/bus.ts';
import { RdpAccountant } from '../../shared/privacy/rdp-accountant.ts';
import { medflVersion } from '../../shared/util/version.ts';
import type { CoordinatorStore } from '../store/store.ts';
import { PRIVACY_KEY, type PrivacySpent, type RoundEngine } from '../rounds/round-engine.ts';
import { plannedRounds, pretrainingRounds } from '../rounds/pretraining-stage.ts';
import { verifyChain } from '../ledger/chain.ts';
import { checkCompleteness } from '../ledger/completeness.ts';
import type { ContributionLedger } from '../ledger/ledger.ts';
import { statusJson, storageCondition } from './status-json.ts';

export interface DashboardSource {
  /** /api/status: statusJson plus `live`. */
  status(): Record<string, unknown>;
  /** /api/ledger: the chain re-verified now, and its completeness against the store. */
  ledger(): Promise<Record<string, unknown>>;
  /** The latest `limit` events from the store's event history, oldest first. */
  recentEvents(limit: number): FederationEvent[];
  /** Live events as this process publishes them; returns the unsubscribe function. */
  subscribe(handler: (e: FederationEvent) => void): () => void;
}

export interface DashboardDeps {
  store: CoordinatorStore;
  federationId: string;
  plan: Plan;
  engine: Pick<RoundEngine, 'openRoundNumber' | 'isFinished' | 'connectedSites' | 'connectedCapabilities'>;
  bus: Pick<EventBus, 'subscribe'>;
  ledger: Pick<ContributionLedger, 'lines' | 'describe'>;
  /** Raw Ed25519 public key of the coordinator: ledger entries are signed with its private half. */
  coordinatorPublicKey: Uint8Array;
  /** The coordinator directory (its disk's free space). */
  dir: string;
}

const iso = (t: number) => new Date(t).toISOString();

/**
 * ε the plan will have spent after its last round, at its δ: the rounds released so far plus the rest at the plan's
 * sampling rate. With plan privacy.epsilonBudget, also how many of the remaining rounds fit in it at that rate.
 */
export function plannedPrivacy(plan: Plan, store: Pick<CoordinatorStore, 'getMeta' | 'listSites'>): Record<string, unknown> | null {
  const dp = plan.aggregation.dp;
  if (!dp) return null;
  const planned = plannedRounds(plan);
  const raw = store.getMeta(PRIVACY_KEY);
  const spent = raw ? (JSON.parse(raw) as PrivacySpent) : undefined;
  const released = spent?.rounds ?? 0;
  const enrolled = store.listSites().filter((s) => s.state === 'enrolled').length;
  // As the round engine samples: the sites asked over the sites enrolled (every enrolled site when sitesPerRound is 0).
  const q = plan.sitesPerRound > 0 && enrolled > 0 ? Math.min(1, plan.sitesPerRound / enrolled) : 1;
  const budget = plan.privacy.epsilonBudget ?? null;
  const base = { delta: dp.delta, noiseMultiplier: dp.noiseMultiplier, clipNorm: dp.clipNorm, plannedRounds: planned, roundsReleased: released, samplingRate: q, epsilonBudget: budget };
  if (dp.noiseMultiplier === 0) return { ...base, plannedEpsilon: null, roundsWithinBudget: null };
  const acc = spent?.accountant ? RdpAccountant.fromJSON(spent.accountant) : new RdpAccountant();
  const remaining = Math.max(0, planned - released);
  // Round by round, to find the last one the budget allows (one step per remaining round: cheap).
  let withinBudget = budget === null ? null : 0;
  for (let i = 0; i < remaining; i++) {
    acc.step(q, dp.noiseMultiplier);
    if (withinBudget !== null && withinBudget === i && acc.epsilon(dp.delta).epsilon <= budget!) withinBudget++;
  }
  return { ...base, plannedEpsilon: acc.epsilon(dp.delta).epsilon, roundsWithinBudget: withinBudget };
}

export function createDashboardSource(d: DashboardDeps): DashboardSource {
  const { store, plan, engine } = d;
  const live = (now: number): Record<string, unknown> => {
    const openNumber = engine.openRoundNumber;
    const open = openNumber === undefined ? undefined : store.getRound(openNumber);
    const reported = open ? store.updatesForRound(open.round).map((u) => u.site) : [];
    const phase = engine.isFinished ? 'finished' : open ? 'round open' : 'waiting for sites';
    return {
      coordinatorVersion: medflVersion(),
      now: iso(now),
      phase,
      afterLastRound: plan.afterLastRound,
      openRound: open
        ? { round: open.round, openedAt: iso(open.openedAt), deadlineAt: iso(open.deadlineAt), secondsToDeadline: Math.max(0, Math.round((open.deadlineAt - now) / 1000)), selected: open.selected, reported }
        : null,
      connectedSites: engine.connectedSites(),
      protocols: Object.fromEntries([...engine.connectedCapabilities()].map(([site, c]) => [site, { protocolVersion: c.protocolVersion, features: [...c.features].sort() }])),
      plan: {
        name: plan.name,
        architecture: plan.model.architecture,
        rounds: plan.rounds,
        pretrainingRounds: pretrainingRounds(plan),
        plannedRounds: plannedRounds(plan),
        minSites: plan.minSites,
        sitesPerRound: plan.sitesPerRound,
        roundDeadlineSeconds: plan.roundDeadlineSeconds,
        strategy: plan.aggregation.strategy,
        serverOptimizer: plan.aggregation.serverOptimizer.type,
        secureAggregation: plan.aggregation.secureAggregation.enabled,
        numClasses: plan.model.numClasses,
      },
      privacyPlan: plannedPrivacy(plan, store),
    };
  };
  // Re-verifying costs one signature check per entry: do it again only when the ledger has grown.
  let verified: { lines: number; at: number; result: Record<string, unknown> } | undefined;
  return {
    status() {
      const now = Date.now();
      const json = statusJson(store, d.federationId, now, storageCondition(d.dir)) as Record<string, unknown> & { sites: { name: string; status: string }[] };
      // The store alone calls a site online until it has missed three heartbeats (up to 3 minutes in a large
      // federation, where sites beat less often); this process knows a site whose task stream closed has left: it is
      // offline at once, or finished where the federation is.
      const connected = new Set(engine.connectedSites());
      for (const s of json.sites) if (s.status === 'online' && !connected.has(s.name)) s.status = engine.isFinished ? 'finished' : 'offline';
      return { ...json, live: live(now) };
    },
    async ledger() {
      const lines = await d.ledger.lines();
      if (verified && verified.lines === lines.length && Date.now() - verified.at < 60_000) return verified.result;
      const report = verifyChain(lines, { coordinatorPublicKey: d.coordinatorPublicKey, federation: d.federationId });
      const complete = checkCompleteness(report.entries, store);
      const result = {
        backend: d.ledger.describe(),
        entries: report.entries.length,
        head: report.head,
        verifiedAt: iso(Date.now()),
        chain: { ok: report.ok, problems: report.problems.slice(0, 20).map((p) => ({ line: p.line, seq: p.seq ?? null, problem: p.problem })) },
        completeness: { ok: complete.ok, updates: complete.updates, pending: complete.pending, problems: complete.problems.slice(0, 20) },
        ok: report.ok && complete.ok,
      };
      verified = { lines: lines.length, at: Date.now(), result };
      return result;
    },
    recentEvents(limit) {
      const rows = store.listOutbox('event');
      const out: FederationEvent[] = [];
      for (const r of rows.slice(Math.max(0, rows.length - limit))) {
        try {
          out.push(JSON.parse(r.body) as FederationEvent);
        } catch {
          // A row that is not JSON cannot be shown; the outbox relay reports it.
        }
      }
      return out;
    },
    subscribe: (handler) => d.bus.subscribe(handler),
  };
}
