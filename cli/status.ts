/**
 * `medfl status`: what a coordinator knows, as tables for people — rounds, sites, metrics.
 */
import Table from 'cli-table3';
import type { CoordinatorStore, MetricRow, RoundRow, SiteRow } from '../coordinator/store/store.ts';
import { eventFacts, federationOfflineAfterMs, siteStatus, siteVersion, validationCases, type FederationFinish, type StorageCondition } from '../coordinator/admin-http/status-json.ts';
import { PRIVACY_KEY, type PrivacySpent } from '../coordinator/rounds/round-engine.ts';
import { parseTeacher, TEACHER_KEY } from '../coordinator/rounds/teacher.ts';
import { budgetStatus, describeRefusal, type BudgetStatus } from '../coordinator/rounds/privacy-budget.ts';

const short = (h: string | null | undefined) => (h ? `${h.slice(0, 12)}…` : '—');
const ago = (t: number | null, now: number) => (t === null ? 'never' : `${Math.max(0, Math.round((now - t) / 1000))} s ago`);
/** Colour only for a terminal; logs and CI get plain text. */
const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });
const fmt = (v: number | undefined, digits = 3) => (v === undefined || Number.isNaN(v) ? '—' : v.toFixed(digits));

export { OFFLINE_AFTER_MS, LOW_STORAGE_BYTES, storageCondition, statusJson, type StorageCondition } from '../coordinator/admin-http/status-json.ts';

/** What the event history and the metrics add to a site's row (status-json.ts); without them a row shows the raw link. */
export interface SiteContext {
  finish?: FederationFinish;
  /** Validation cases of each site's latest reported round (0: none, so no validation Dice). */
  validation?: ReadonlyMap<string, number>;
}

export function sitesTable(sites: SiteRow[], now = Date.now(), ctx: SiteContext = {}): string {
  const t = new Table({ head: ['site', 'state', 'link', 'last seen', 'activity', 'engine', 'version', 'validation'], ...style() });
  const offlineAfter = federationOfflineAfterMs(sites);
  for (const s of sites) {
    const status = siteStatus(s, now, ctx.finish, offlineAfter);
    const link = s.lastSeenAt === null ? '—' : status === 'online' || status === 'finished' ? status : 'offline';
    // A finished site's last activity is whatever it did before it exited: not worth an alarm.
    const activity = status === 'online' ? (s.activity ?? '—') : status === 'finished' ? '—' : `(was ${s.activity ?? '—'})`;
    const val = ctx.validation?.get(s.name);
    const validation = val === undefined ? '—' : val === 0 ? 'NONE (no validation Dice)' : `${val} case${val === 1 ? '' : 's'}`;
    t.push([s.name, s.state, link, ago(s.lastSeenAt, now), activity, s.engine ?? '—', siteVersion(s) ?? '—', validation]);
  }
  return t.toString();
}

export function roundsTable(rounds: RoundRow[]): string {
  const t = new Table({ head: ['round', 'state', 'sites', 'from model', 'result model', 'seconds', 'note'], ...style() });
  for (const r of rounds) {
    const secs = r.closedAt ? ((r.closedAt - r.openedAt) / 1000).toFixed(1) : '—';
    t.push([r.round, r.state, r.selected.join(', '), short(r.baseModelHash), short(r.resultModelHash), secs, r.note ?? '']);
  }
  return t.toString();
}

/** round × site → samples, local loss, validation Dice. */
export function metricsTable(metrics: MetricRow[]): string {
  const byKey = new Map<string, Record<string, number>>();
  for (const m of metrics) {
    const k = `${m.round}\u0000${m.site}`;
    const row = byKey.get(k) ?? {};
    row[m.key] = m.value;
    byKey.set(k, row);
  }
  // Per-class validation Dice (val_dice_class_N) as columns when any site reported more than one class.
  const classes = [...new Set(metrics.map((m) => /^val_dice_class_(\d+)$/.exec(m.key)?.[1]).filter((c): c is string => c !== undefined))].map(Number).sort((a, b) => a - b);
  const perClass = classes.length > 1 ? classes : [];
  const teacher = metrics.some((m) => m.key === 'teacher_generation' || m.key === 'pseudo_used');
  // Classification sites (their own head, site-agent/task-config.ts) report accuracy instead of Dice.
  const accuracy = metrics.some((m) => m.key === 'val_accuracy');
  const t = new Table({
    head: ['round', 'site', 'samples', 'loss (first → last)', 'val Dice', ...(accuracy ? ['val acc'] : []), ...perClass.map((c) => `Dice c${c}`), ...(teacher ? ['teacher'] : []), 'train s'],
    ...style(),
  });
  const keys = [...byKey.keys()].sort((a, b) => {
    const [ra, sa] = a.split('\u0000');
    const [rb, sb] = b.split('\u0000');
    return Number(ra) - Number(rb) || sa.localeCompare(sb);
  });
  for (const k of keys) {
    const [round, site] = k.split('\u0000');
    const v = byKey.get(k)!;
    const gen = teacherCell(v);
    t.push([round, site, fmt(v.num_train, 0), `${fmt(v.train_loss_first)} → ${fmt(v.train_loss)}`, (v.num_val === 0 ? 'no val data' : fmt(v.val_dice_mean)), ...(accuracy ? [fmt(v.val_accuracy)] : []), ...perClass.map((c) => fmt(v[`val_dice_class_${c}`])), ...(teacher ? [gen] : []), fmt(v.train_seconds, 1)]);
  }
  return t.toString();
}

/** The client-level DP spent so far (plan aggregation.dp), from the round-close records, against the plan's budget. */
export function privacyLines(raw: string | undefined, budget: BudgetStatus | null = null): string[] {
  const lines: string[] = [];
  if (raw) {
    const p = JSON.parse(raw) as PrivacySpent;
    if (p.epsilon === null) lines.push(`privacy: noise multiplier 0 — updates are clipped to ${p.clipNorm} but no ε can be claimed`);
    else lines.push(`privacy spent (client-level DP): ε = ${p.epsilon.toFixed(2)}${budget ? ` of budget ${budget.budget}` : ''} at δ = ${p.delta} after ${p.rounds} round${p.rounds === 1 ? '' : 's'} (z = ${p.noiseMultiplier}, S = ${p.clipNorm}, RDP order ${p.order})`);
  } else if (budget) {
    lines.push(`privacy budget: ε ${budget.budget} at δ = ${budget.delta}, none spent yet`);
  }
  if (budget?.exhausted) lines.push(`${describeRefusal({ spent: budget.spent, projected: budget.refusedAt ?? Number.NaN, budget: budget.budget, delta: budget.delta })}; the federation finished ${budget.exhaustedAt ?? ''}`.trimEnd());
  return lines;
}

/** What the teacher did for one site-round: the generation it learnt from, or why it learnt from none. */
function teacherCell(v: Record<string, number>): string {
  if (v.teacher_generation !== undefined && v.pseudo_used !== 0) return `g${v.teacher_generation} (${fmt(v.pseudo_cases, 0)} pseudo)`;
  if (v.teacher_behind_model === 1) {
    return v.model_val_dice === undefined || v.teacher_val_dice === undefined ? 'off: unmeasured' : `off: model ${fmt(v.model_val_dice)} > teacher ${fmt(v.teacher_val_dice)}`;
  }
  if (v.teacher_retired === 1) return v.teacher_generation === undefined ? 'off: generation retired (its students did not beat it)' : 'off: retired';
  if (v.teacher_gated === 1) return 'off: teacher gated';
  return v.pseudo_used === 0 ? 'off' : '—';
}

/** Noisy student: the current teacher (plan teacherStudent). */
function teacherLines(raw: string | undefined): string[] {
  const t = parseTeacher(raw);
  return t ? [`teacher: generation ${t.generation}, model ${short(t.modelHash)} (the aggregate of round ${t.round})`] : [];
}

const gib = (b: number) => `${(b / 1024 ** 3).toFixed(b < 10 * 1024 ** 3 ? 2 : 1)} GiB`;

export function storageLines(c: StorageCondition | undefined): string[] {
  if (!c) return [];
  const pct = c.totalBytes > 0 ? ` (${((100 * c.freeBytes) / c.totalBytes).toFixed(0)}%)` : '';
  const line = `storage: ${gib(c.freeBytes)} free of ${gib(c.totalBytes)}${pct} on the coordinator folder's disk`;
  if (!c.low) return [line];
  return [`${line} — LOW: when it runs out, uploads are refused as retryable and rounds wait to close; the coordinator carries on once space is freed`];
}

export function statusReport(store: CoordinatorStore, federationId: string, storage?: StorageCondition): string {
  const rounds = store.listRounds();
  const facts = eventFacts(store);
  const validation = validationCases(store);
  const without = [...validation].filter(([, n]) => n === 0).map(([site]) => site);
  const lines = [
    `federation ${federationId}`,
    `current global model: ${store.getMeta('current_model') ?? '— (coordinator never started)'}`,
    `rounds closed: ${store.closedRoundCount()}${facts.finish ? ` — federation finished ${new Date(facts.finish.at).toISOString()}` : ''}`,
    ...privacyLines(store.getMeta(PRIVACY_KEY), budgetStatus(store, facts.budgetRefusal)),
    ...teacherLines(store.getMeta(TEACHER_KEY)),
    ...storageLines(storage),
    '',
    'Sites',
    sitesTable(store.listSites(), Date.now(), { finish: facts.finish, validation }),
    ...(without.length > 0 ? [`no validation data at ${without.join(', ')}: no validation Dice from ${without.length === 1 ? 'this site' : 'these sites'} (add imagesTs/ + labelsTs/, or 5+ labelled training cases to carve some from)`] : []),
  ];
  if (rounds.length > 0) lines.push('', 'Rounds', roundsTable(rounds));
  const metrics = store.listMetrics();
  if (metrics.length > 0) lines.push('', 'Local training and validation, per round and site', metricsTable(metrics));
  return lines.join('\n');
}
