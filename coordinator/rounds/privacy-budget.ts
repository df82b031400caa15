/**
 * The plan's privacy budget (plan `privacy.epsilonBudget`): the client-level ε, at the plan's δ, the federation may
 * spend. Before a round opens the coordinator asks what the accountant would say after that round's release; a round
 * that would take it past the budget does not open (the round engine then ends the federation, with a
 * `privacy.budget_exhausted` event). Everything here reads the store only, so `medfl status` shows the same facts
 * with the coordinator stopped.
 */
import { RdpAccountant } from '../../shared/privacy/rdp-accountant.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { CoordinatorStore } from '../store/store.ts';
import { PRIVACY_KEY, type PrivacySpent } from './features/dp-accounting.ts';

/** Store meta key: the budget of the plan the coordinator last started with (status reads it without the plan). */
export const PRIVACY_BUDGET_KEY = 'privacy_budget';

export const BUDGET_EXHAUSTED_EVENT = 'privacy.budget_exhausted';

/** What the store keeps of the plan's budget. */
export interface PrivacyBudget {
  epsilon: number;
  delta: number;
}

/** Why a round may not open: its release would take ε past the budget. The fields of the event and log line. */
export interface BudgetRefusal {
  /** ε spent by the rounds closed so far (0 before the first). */
  spent: number;
  /** ε after the refused round's release. */
  projected: number;
  budget: number;
  delta: number;
  /** Rounds closed when it was refused (the event's stable id). */
  rounds: number;
  /** The sampling rate the round would have had (sites asked / sites enrolled). */
  samplingRate: number;
}

/**
 * The sampling rate of one DP release: the sites asked over the sites enrolled (never above 1). The round engine's
 * accountant is stepped with exactly this at each round close.
 */
export function samplingRate(selected: number, enrolled: number): number {
  return Math.min(1, selected / Math.max(1, enrolled, selected));
}

function spentOf(store: Pick<CoordinatorStore, 'getMeta'>): PrivacySpent | undefined {
  const raw = store.getMeta(PRIVACY_KEY);
  return raw ? (JSON.parse(raw) as PrivacySpent) : undefined;
}

/**
 * Refusal of a round that asks `selected` sites, or undefined when it fits the budget (or the plan has none). Asked
 * with the sites actually selected, since the sampling rate, and so the round's ε, depends on how many are asked.
 */
export function privacyBudgetRefusal(plan: Plan, store: Pick<CoordinatorStore, 'getMeta' | 'listSites' | 'closedRoundCount'>, selected: number): BudgetRefusal | undefined {
  const budget = plan.privacy.epsilonBudget;
  const dp = plan.aggregation.dp;
  // The plan schema refuses a budget without noise; guard anyway so a budget never turns into "no limit".
  if (budget === undefined || !dp) return undefined;
  const enrolled = store.listSites().filter((s) => s.state === 'enrolled').length;
  const q = samplingRate(selected, enrolled);
  const spent = spentOf(store);
  const accountant = spent?.accountant ? RdpAccountant.fromJSON(spent.accountant) : new RdpAccountant();
  let projected = Number.POSITIVE_INFINITY;
  if (dp.noiseMultiplier > 0) {
    accountant.step(q, dp.noiseMultiplier);
    projected = accountant.epsilon(dp.delta).epsilon;
  }
  if (projected <= budget) return undefined;
  return { spent: spent?.epsilon ?? 0, projected, budget, delta: dp.delta, rounds: store.closedRoundCount(), samplingRate: q };
}

/** One line for the operator's log and for `medfl status`. */
export function describeRefusal(r: Pick<BudgetRefusal, 'spent' | 'projected' | 'budget' | 'delta'>): string {
  return `privacy budget exhausted: the next round would bring ε to ${r.projected.toFixed(3)} (δ = ${r.delta}), above the plan's budget ${r.budget} (privacy.epsilonBudget); ε spent ${r.spent.toFixed(3)}. No further round opens`;
}

/** Keeps the plan's budget in the store for `medfl status` (which reads no plan); a plan without one removes it. */
export function recordPrivacyBudget(store: Pick<CoordinatorStore, 'getMeta' | 'setMeta' | 'deleteMeta'>, plan: Plan): void {
  const budget = plan.privacy.epsilonBudget;
  const dp = plan.aggregation.dp;
  if (budget === undefined || !dp) {
    if (store.getMeta(PRIVACY_BUDGET_KEY) !== undefined) store.deleteMeta(PRIVACY_BUDGET_KEY);
    return;
  }
  const value: PrivacyBudget = { epsilon: budget, delta: dp.delta };
  store.setMeta(PRIVACY_BUDGET_KEY, JSON.stringify(value));
}

export function readPrivacyBudget(store: Pick<CoordinatorStore, 'getMeta'>): PrivacyBudget | undefined {
  const raw = store.getMeta(PRIVACY_BUDGET_KEY);
  return raw ? (JSON.parse(raw) as PrivacyBudget) : undefined;
}

/** Spent against the budget, for `medfl status --json`, the dashboard and /metrics; null without a budget. */
export interface BudgetStatus {
  budget: number;
  delta: number;
  spent: number;
  remaining: number;
  /** The coordinator refused a round for the budget, and no round opened or closed since. */
  exhausted: boolean;
  exhaustedAt: string | null;
  /** ε the refused round would have reached. */
  refusedAt: number | null;
}

/** The latest refusal the event history holds that still stands (no round closed or opened since); undefined if none. */
export function standingRefusal(events: readonly { type?: unknown; rounds?: unknown; at?: unknown; projected?: unknown }[], store: Pick<CoordinatorStore, 'closedRoundCount' | 'openRoundRow'>): { at: string; projected: number } | undefined {
  let latest: { at: string; projected: number; rounds: number } | undefined;
  for (const e of events) {
    if (e.type !== BUDGET_EXHAUSTED_EVENT || typeof e.rounds !== 'number' || typeof e.projected !== 'number') continue;
    latest = { at: typeof e.at === 'string' ? e.at : '', projected: e.projected, rounds: e.rounds };
  }
  if (!latest || latest.rounds !== store.closedRoundCount() || store.openRoundRow() !== undefined) return undefined;
  return { at: latest.at, projected: latest.projected };
}

export function budgetStatus(store: Pick<CoordinatorStore, 'getMeta'>, refusal: { at: string; projected: number } | undefined): BudgetStatus | null {
  const b = readPrivacyBudget(store);
  if (!b) return null;
  const spent = spentOf(store)?.epsilon ?? 0;
  return {
    budget: b.epsilon,
    delta: b.delta,
    spent,
    remaining: Math.max(0, b.epsilon - spent),
    exhausted: refusal !== undefined,
    exhaustedAt: refusal?.at || null,
    refusedAt: refusal?.projected ?? null,
  };
}
