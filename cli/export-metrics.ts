/**
 * `medfl coordinator export-metrics --dir D --format csv|json [--out FILE]`: every metric the sites reported, one row
 * per round × site × metric, from the coordinator's store — for a spreadsheet, pandas or R. Reads only; works with
 * the coordinator running (SQLite allows a reader beside it) or stopped.
 */
import { writeFileSync } from 'node:fs';
import type { MetricRow } from '../coordinator/store/store.ts';

export const EXPORT_FORMATS = ['csv', 'json'] as const;
export type ExportFormat = (typeof EXPORT_FORMATS)[number];

/** RFC 4180: quote a field holding a comma, quote or line break, doubling its quotes. */
function csvField(s: string): string {
  return /[",\r\n]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
}

/** Full precision: the shortest decimal that reads back as the same double (what JavaScript prints). */
function csvNumber(v: number): string {
  return Number.isNaN(v) ? 'NaN' : v === Infinity ? 'Infinity' : v === -Infinity ? '-Infinity' : String(v);
}

export function metricsCsv(rows: readonly MetricRow[]): string {
  const lines = ['round,site,metric,value'];
  for (const r of rows) lines.push([String(r.round), csvField(r.site), csvField(r.key), csvNumber(r.value)].join(','));
  return lines.join('\n') + '\n';
}

/** JSON has no NaN or ±Infinity: those values are written as null. */
export function metricsJson(rows: readonly MetricRow[], federationId: string): string {
  const metrics = rows.map((r) => ({ round: r.round, site: r.site, metric: r.key, value: Number.isFinite(r.value) ? r.value : null }));
  return JSON.stringify({ schema: 1, federationId, metrics }, null, 2) + '\n';
}

/** Rows in a stable order: round, then site, then metric name. */
export function sortedMetrics(rows: readonly MetricRow[]): MetricRow[] {
  return [...rows].sort((a, b) => a.round - b.round || a.site.localeCompare(b.site) || a.key.localeCompare(b.key));
}

/** The export as text; written to `out` when given (then the return value is a one-line summary for people). */
export function exportMetrics(rows: readonly MetricRow[], o: { format: ExportFormat; federationId: string; out?: string }): string {
  const sorted = sortedMetrics(rows);
  const text = o.format === 'csv' ? metricsCsv(sorted) : metricsJson(sorted, o.federationId);
  if (o.out === undefined) return text;
  writeFileSync(o.out, text);
  const rounds = new Set(sorted.map((r) => r.round)).size;
  const sites = new Set(sorted.map((r) => r.site)).size;
  return `wrote ${sorted.length} metric value${sorted.length === 1 ? '' : 's'} (${rounds} round${rounds === 1 ? '' : 's'} × ${sites} site${sites === 1 ? '' : 's'}) to ${o.out}\n`;
}
