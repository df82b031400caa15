/**
 * What a coordinator's store says about its federation, as one JSON object: `medfl status --json` prints it and the
 * admin endpoint's dashboard serves it (/api/status, with the running coordinator's live state added), so the two
 * can never disagree. Everything here is read from the store alone, so it works with the coordinator stopped too.
 */
import { statfsSync } from 'node:fs';
import type { CoordinatorStore, SiteRow } from '../store/store.ts';
import { PRIVACY_KEY, type PrivacySpent } from '../rounds/round-engine.ts';
import { parseTeacher, TEACHER_KEY } from '../rounds/teacher.ts';
import { medflVersion } from '../../shared/util/version.ts';
import { budgetStatus, standingRefusal } from '../rounds/privacy-budget.ts';
import { offlineAfterMs } from '../../shared/protocol/heartbeat.ts';

/**
 * Three missed beats and a site is shown offline. Sites beat every 5 s up to 200 enrolled sites and less often beyond
 * (the coordinator names the interval: shared/protocol/heartbeat.ts), so the wait grows with the federation; this is
 * a small federation's.
 */
export const OFFLINE_AFTER_MS = offlineAfterMs(0);

/** How long after its last beat a site of this federation is shown offline (its enrolled sites set the interval). */
export function federationOfflineAfterMs(sites: readonly Pick<SiteRow, 'state'>[]): number {
  return offlineAfterMs(sites.filter((s) => s.state === 'enrolled').length);
}

/** Free space below which the coordinator's storage counts as low: about ten 100 MB updates, or 5%. */
export const LOW_STORAGE_BYTES = 1024 ** 3;

export interface StorageCondition {
  freeBytes: number;
  totalBytes: number;
  low: boolean;
}

/**
 * Free space on the filesystem holding the coordinator folder (one statfs call), or undefined where it cannot be
 * read. On a full disk uploads are refused as retryable and round closes wait until space is freed.
 */
export function storageCondition(dir: string): StorageCondition | undefined {
  try {
    const s = statfsSync(dir);
    const freeBytes = s.bavail * s.bsize;
    const totalBytes = s.blocks * s.bsize;
    return { freeBytes, totalBytes, low: freeBytes < LOW_STORAGE_BYTES || freeBytes < 0.05 * totalBytes };
  } catch {
    return undefined;
  }
}

/**
 * How a site stands, for people: `finished` is a site that went quiet once the federation was done (its agent
 * exits after the last round), which is not the same as one that dropped out mid-federation (`offline`).
 */
export type SiteStatus = 'invited' | 'revoked' | 'never connected' | 'online' | 'offline' | 'finished';

export interface FederationFinish {
  /** When the coordinator announced it (Unix ms). */
  at: number;
  /** Rounds closed by then. */
  rounds: number;
}

/** What the event history (the store's outbox, kept in full) adds to the tables: the finish, and declines per site. */
export interface EventFacts {
  finish: FederationFinish | undefined;
  /** Tasks a site declined under its own policy or task file (task.declined). */
  declined: Map<string, number>;
  /** Tasks the coordinator withheld because the site lacks a protocol feature they need (task.withheld). */
  withheld: Map<string, number>;
  /** The round the coordinator refused for the plan's privacy budget, while that still stands (privacy-budget.ts). */
  budgetRefusal: { at: string; projected: number } | undefined;
}

type OutboxReader = Pick<CoordinatorStore, 'listOutbox' | 'closedRoundCount' | 'openRoundRow'>;

export function eventFacts(store: OutboxReader): EventFacts {
  const declined = new Map<string, number>();
  const withheld = new Map<string, number>();
  let finish: FederationFinish | undefined;
  const budgetEvents: { type?: unknown; rounds?: unknown; at?: unknown; projected?: unknown }[] = [];
  for (const row of store.listOutbox('event')) {
    let e: { type?: unknown; site?: unknown; rounds?: unknown; at?: unknown; projected?: unknown };
    try {
      e = JSON.parse(row.body) as typeof e;
    } catch {
      continue;
    }
    if (e.type === 'privacy.budget_exhausted') budgetEvents.push(e);
    const site = typeof e.site === 'string' ? e.site : undefined;
    if (e.type === 'task.declined' && site) declined.set(site, (declined.get(site) ?? 0) + 1);
    else if (e.type === 'task.withheld' && site) withheld.set(site, (withheld.get(site) ?? 0) + 1);
    else if (e.type === 'federation.finished' && typeof e.rounds === 'number') {
      const at = typeof e.at === 'string' ? Date.parse(e.at) : Number.NaN;
      finish = { at: Number.isFinite(at) ? at : row.createdAt, rounds: e.rounds };
    }
  }
  // A finish that rounds came after (a plan with more rounds, restarted) no longer holds.
  if (finish && (finish.rounds !== store.closedRoundCount() || store.openRoundRow() !== undefined)) finish = undefined;
  return { finish, declined, withheld, budgetRefusal: standingRefusal(budgetEvents, store) };
}

/**
 * The MedFL release a site runs, as its heartbeats name it: null before it ever called, `unknown` for a site that
 * calls without naming one (a release older than the heartbeat's software_version field).
 */
export function siteVersion(s: Pick<SiteRow, 'softwareVersion' | 'lastSeenAt'>): string | null {
  return s.softwareVersion ?? (s.lastSeenAt === null ? null : 'unknown');
}

/** Heard from within `offlineAfter`, and not gone since: its task stream did not close after its last call. */
function isOnline(s: Pick<SiteRow, 'lastSeenAt' | 'leftAt'>, now: number, offlineAfter: number): boolean {
  if (s.lastSeenAt === null || now - s.lastSeenAt >= offlineAfter) return false;
  return s.leftAt === null || s.leftAt < s.lastSeenAt;
}

/** `offlineAfter`: federationOfflineAfterMs of the site's federation. */
export function siteStatus(s: SiteRow, now: number, finish: FederationFinish | undefined, offlineAfter = OFFLINE_AFTER_MS): SiteStatus {
  if (s.state === 'invited') return 'invited';
  if (s.state === 'revoked') return 'revoked';
  if (s.lastSeenAt === null) return 'never connected';
  if (isOnline(s, now, offlineAfter)) return 'online';
  // Its last heartbeat may come up to one beat interval before the finish it then received.
  if (finish && s.lastSeenAt >= finish.at - offlineAfter) return 'finished';
  return 'offline';
}

/** The number of validation cases each site used in the latest round it reported (metric num_val). */
export function validationCases(store: Pick<CoordinatorStore, 'listMetrics'>): Map<string, number> {
  const latest = new Map<string, { round: number; value: number }>();
  for (const m of store.listMetrics()) {
    if (m.key !== 'num_val') continue;
    const prev = latest.get(m.site);
    if (!prev || m.round >= prev.round) latest.set(m.site, { round: m.round, value: m.value });
  }
  return new Map([...latest].map(([site, v]) => [site, v.value]));
}

const iso = (t: number | null | undefined) => (t === null || t === undefined ? null : new Date(t).toISOString());

/**
 * `medfl status --json` and the dashboard's /api/status: the same facts as the tables, for scripts and monitoring.
 * Times are ISO 8601 (UTC), hashes in full; `schema` changes only when a field changes meaning or goes away (fields
 * are added without changing it).
 */
export function statusJson(store: CoordinatorStore, federationId: string, now = Date.now(), storage?: StorageCondition): Record<string, unknown> {
  const privacy = store.getMeta(PRIVACY_KEY);
  const teacher = parseTeacher(store.getMeta(TEACHER_KEY));
  const facts = eventFacts(store);
  const validation = validationCases(store);
  const sites = store.listSites();
  const offlineAfter = federationOfflineAfterMs(sites);
  // One object per round × site; the keys are the metric names the sites report (num_train, val_dice_mean, …).
  const metrics = new Map<string, { round: number; site: string; values: Record<string, number> }>();
  for (const m of store.listMetrics()) {
    const k = `${m.round}\u0000${m.site}`;
    const entry = metrics.get(k) ?? { round: m.round, site: m.site, values: {} };
    entry.values[m.key] = m.value;
    metrics.set(k, entry);
  }
  return {
    schema: 1,
    version: medflVersion(),
    federationId,
    currentModel: store.getMeta('current_model') ?? null,
    roundsClosed: store.closedRoundCount(),
    finished: facts.finish ? { at: iso(facts.finish.at), rounds: facts.finish.rounds } : null,
    privacy: privacy ? (JSON.parse(privacy) as PrivacySpent) : null,
    // Plan privacy.epsilonBudget: spent against it, and whether a round was refused for it (null without a budget).
    privacyBudget: budgetStatus(store, facts.budgetRefusal),
    teacher: teacher ?? null,
    storage: storage ?? null,
    sites: sites.map((s) => ({
      name: s.name,
      state: s.state,
      status: siteStatus(s, now, facts.finish, offlineAfter),
      link: s.lastSeenAt === null ? null : isOnline(s, now, offlineAfter) ? 'online' : 'offline',
      lastSeenAt: iso(s.lastSeenAt),
      activity: s.activity,
      engine: s.engine,
      version: siteVersion(s),
      // null: the site has not reported a round yet; 0: it has no validation cases, so no validation Dice.
      validationCases: validation.get(s.name) ?? null,
      tasksDeclined: facts.declined.get(s.name) ?? 0,
      tasksWithheld: facts.withheld.get(s.name) ?? 0,
      invitedAt: iso(s.invitedAt),
      enrolledAt: iso(s.enrolledAt),
      revokedAt: iso(s.revokedAt),
    })),
    rounds: store.listRounds().map((r) => ({
      round: r.round,
      state: r.state,
      selected: r.selected,
      baseModel: r.baseModelHash,
      resultModel: r.resultModelHash,
      openedAt: iso(r.openedAt),
      deadlineAt: iso(r.deadlineAt),
      closedAt: iso(r.closedAt),
      seconds: r.closedAt === null ? null : (r.closedAt - r.openedAt) / 1000,
      note: r.note,
    })),
    // The global model versions: the initial one (round 0), each closed round's aggregate, rollbacks' targets.
    models: store.listModels().map((m) => ({ hash: m.hash, round: m.round, sizeBytes: m.sizeBytes, createdAt: iso(m.createdAt) })),
    metrics: [...metrics.values()].sort((a, b) => a.round - b.round || a.site.localeCompare(b.site)),
  };
}
