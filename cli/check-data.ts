/**
 * `medfl site check-data DIR`: validate a site's data folder and print, for the people at the site, a table of
 * the cases and every problem found. Exit code 1 when a case is unusable or the folder cannot be used at all,
 * 0 otherwise (warnings alone do not fail). File names are printed here because this output stays at the site
 * and is how an operator finds the bad file; nothing is logged or sent.
 */
import Table from 'cli-table3';
import { checkDataFolder, type CheckOptions, type CheckReport } from '../site-agent/data/check.ts';
import { DatasetError } from '../site-agent/data/dataset-json.ts';

const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });
const fmt = (v: readonly number[] | undefined, digits = 3): string => (v ? v.map((x) => +x.toFixed(digits)).join(' × ') : '—');

export function formatCheckReport(r: CheckReport): string {
  const lines: string[] = [];
  lines.push(
    `dataset '${r.name}': classes ${r.labels.map((l, i) => `${i}=${l}`).join(', ')}; ${r.channelNames.length} channel(s) ${r.channelNames.map((c, i) => `${i}=${c}`).join(', ')}`,
  );
  const t = new Table({ head: ['case', 'split', 'channels', 'shape (x×y×z)', 'spacing mm', 'orient.', 'dtype', 'label values', 'ok'], ...style() });
  for (const row of r.rows) {
    t.push([
      row.case,
      row.split,
      `${row.channels}/${r.channelNames.length}`,
      fmt(row.dims, 0),
      fmt(row.spacing),
      row.axcodes ?? '—',
      row.datatype ?? '—',
      row.classLabel !== undefined ? `class ${row.classLabel}` : row.labelValues ? row.labelValues.join(',') : '—',
      row.usable ? 'yes' : 'NO',
    ]);
  }
  lines.push(t.toString());
  const c = r.counts;
  lines.push(`usable: ${c.train} training, ${c.val} validation, ${c.unlabelled} unlabelled (pool); unusable: ${c.unusable} of ${r.rows.length}`);
  const errors = r.problems.filter((p) => p.severity === 'error');
  const warnings = r.problems.filter((p) => p.severity === 'warning');
  if (r.problems.length === 0) lines.push('no problems found');
  for (const [title, list] of [['errors', errors], ['warnings', warnings]] as const) {
    if (list.length === 0) continue;
    lines.push(`${title} (${list.length}):`);
    for (const p of list) lines.push(`  ${p.file ?? p.case ?? '(dataset)'}: ${p.fault}`);
  }
  return lines.join('\n');
}

/** Run the check, print to `out`, return the exit code. */
export async function runCheckData(dir: string, out: (s: string) => void = (s) => void process.stdout.write(s), opts: CheckOptions = {}): Promise<number> {
  let report: CheckReport;
  try {
    report = await checkDataFolder(dir, undefined, opts);
  } catch (e) {
    if (e instanceof DatasetError) {
      out(`error: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
  out(formatCheckReport(report) + '\n');
  const fatal = report.counts.unusable > 0 || report.problems.some((p) => p.severity === 'error') || report.rows.length === 0;
  return fatal ? 1 : 0;
}
