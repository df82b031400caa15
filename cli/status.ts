/**
 * `medfl status`: what a coordinator knows, as tables for people — rounds, sites, metrics.
 */
import Table from 'cli-table3';
import { statfsSync } from 'node:fs';
import type { CoordinatorStore, MetricRow, RoundRow, SiteRow } from '../coordinator/store/store.ts';
import { PRIVACY_KEY, type PrivacySpent } from '../coordinator/rounds/round-engine.ts';
import { parseTeacher, TEACHER_KEY } from '../coordinator/rounds/teacher.ts';

const short = (h: string | null | undefined) => (h ? `${h.slice(0, 12)}…` : '—');
const ago = (t: number | null, now: number) => (t === null ? 'never' : `${Math.max(0, Math.round((now - t) / 1000))} s ago`);
/** Colour only for a terminal; logs and CI get plain text. */
const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });
const fmt = (v: number | undefined, digits = 3) => (v === undefined || Number.isNaN(v) ? '—' : v.toFixed(digits));

/** Agents heartbeat every 5 s; three missed beats and we call the site offline. */
export const OFFLINE_AFTER_MS = 15_000;

export function sitesTable(sites: SiteRow[], now = Date.now()): string {
  const t = new Table({ head: ['site', 'state', 'link', 'last seen', 'activity', 'engine'], ...style() });
  for (const s of sites) {
    const online = s.lastSeenAt !== null && now - s.lastSeenAt < OFFLINE_AFTER_MS;
    const link = s.lastSeenAt === null ? '—' : online ? 'online' : 'offline';
    t.push([s.name, s.state, link, ago(s.lastSeenAt, now), online ? (s.activity ?? '—') : `(was ${s.activity ?? '—'})`, s.engine ?? '—']);
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
  const teacher = metrics.some((m) => m.key === 'teacher_generation');
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
    const gen = v.teacher_generation === undefined ? '—' : `g${v.teacher_generation} (${fmt(v.pseudo_cases, 0)} pseudo)`;
    t.push([round, site, fmt(v.num_train, 0), `${fmt(v.train_loss_first)} → ${fmt(v.train_loss)}`, fmt(v.val_dice_mean), ...(accuracy ? [fmt(v.val_accuracy)] : []), ...perClass.map((c) => fmt(v[`val_dice_class_${c}`])), ...(teacher ? [gen] : []), fmt(v.train_seconds, 1)]);
  }
  return t.toString();
}

/** The client-level DP spent so far (plan aggregation.dp), from the round-close records. */
function privacyLines(raw: string | undefined): string[] {
  if (!raw) return [];
  const p = JSON.parse(raw) as PrivacySpent;
  if (p.epsilon === null) return [`privacy: noise multiplier 0 — updates are clipped to ${p.clipNorm} but no ε can be claimed`];
  return [`privacy spent (client-level DP): ε = ${p.epsilon.toFixed(2)} at δ = ${p.delta} after ${p.rounds} round${p.rounds === 1 ? '' : 's'} (z = ${p.noiseMultiplier}, S = ${p.clipNorm}, RDP order ${p.order})`];
}

/** Noisy student: the current teacher (plan teacherStudent). */
function teacherLines(raw: string | undefined): string[] {
  const t = parseTeacher(raw);
  return t ? [`teacher: generation ${t.generation}, model ${short(t.modelHash)} (the aggregate of round ${t.round})`] : [];
}

/** Free space below which `medfl status` calls the coordinator's storage low: about ten 100 MB updates, or 5%. */
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

const gib = (b: number) => `${(b / 1024 ** 3).toFixed(b < 10 * 1024 ** 3 ? 2 : 1)} GiB`;

export function storageLines(c: StorageCondition | undefined): string[] {
  if (!c) return [];
  const pct = c.totalBytes > 0 ? ` (${((100 * c.freeBytes) / c.totalBytes).toFixed(0)}%)` : '';
  const line = `storage: ${gib(c.freeBytes)} free of ${gib(c.totalBytes)}${pct} on the coordinator folder's disk`;
  if (!c.low) return [line];
  return [`${line} — LOW: when it runs out, uploads are refused as retryable and rounds wait to close; the coordinator carries on once space is freed`];
}

const iso = (t: number | null) => (t === null ? null : new Date(t).toISOString());

/**
 * `medfl status --json`: the same facts as statusReport for scripts and monitoring. Times are ISO 8601 (UTC),
 * hashes in full; `schema` changes only when a field changes meaning or goes away.
 */
export function statusJson(store: CoordinatorStore, federationId: string, now = Date.now(), storage?: StorageCondition): Record<string, unknown> {
  const privacy = store.getMeta(PRIVACY_KEY);
  const teacher = parseTeacher(store.getMeta(TEACHER_KEY));
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
    federationId,
    currentModel: store.getMeta('current_model') ?? null,
    roundsClosed: store.closedRoundCount(),
    privacy: privacy ? (JSON.parse(privacy) as PrivacySpent) : null,
    teacher: teacher ?? null,
    storage: storage ?? null,
    sites: store.listSites().map((s) => ({
      name: s.name,
      state: s.state,
      link: s.lastSeenAt === null ? null : now - s.lastSeenAt < OFFLINE_AFTER_MS ? 'online' : 'offline',
      lastSeenAt: iso(s.lastSeenAt),
      activity: s.activity,
      engine: s.engine,
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
    metrics: [...metrics.values()].sort((a, b) => a.round - b.round || a.site.localeCompare(b.site)),
  };
}

export function statusReport(store: CoordinatorStore, federationId: string, storage?: StorageCondition): string {
  const rounds = store.listRounds();
  const lines = [
    `federation ${federationId}`,
    `current global model: ${store.getMeta('current_model') ?? '— (coordinator never started)'}`,
    `rounds closed: ${store.closedRoundCount()}`,
    ...privacyLines(store.getMeta(PRIVACY_KEY)),
    ...teacherLines(store.getMeta(TEACHER_KEY)),
    ...storageLines(storage),
    '',
    'Sites',
    sitesTable(store.listSites()),
  ];
  if (rounds.length > 0) lines.push('', 'Rounds', roundsTable(rounds));
  const metrics = store.listMetrics();
  if (metrics.length > 0) lines.push('', 'Local training and validation, per round and site', metricsTable(metrics));
  return lines.join('\n');
}
