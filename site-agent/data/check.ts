/**
 * Validate a site's data folder end to end: the layout (layout.ts) and then every case read in full, one at
 * a time (case-reader.ts), so memory stays at one case. Returns rows for a table and every problem found;
 * `medfl site check-data` (cli/check-data.ts) prints them. Nothing here leaves the site.
 */
import { readCase, type CaseInfo } from './case-reader.ts';
import { scanDataset, type DataProblem } from './layout.ts';

export interface CaseRow extends CaseInfo {
  readonly case: string;
  /** train / val (labelled imagesTr / imagesTs), pool (unlabelled). */
  readonly split: 'train' | 'val' | 'pool';
  /** Channel files found for the case (those beyond dataset.json's channels included). */
  readonly channels: number;
  readonly classLabel?: number;
  readonly usable: boolean;
}

export interface CheckReport {
  readonly name: string;
  readonly labels: readonly string[];
  readonly channelNames: readonly string[];
  readonly rows: readonly CaseRow[];
  readonly problems: readonly DataProblem[];
  readonly counts: { readonly train: number; readonly val: number; readonly unlabelled: number; readonly unusable: number };
}

export interface CheckOptions {
  /** The input channels a plan's model takes (model.inputChannels): a dataset with another count is an error. */
  readonly expectChannels?: number;
}

export async function checkDataFolder(dir: string, onCase?: (done: number, total: number) => void, opts: CheckOptions = {}): Promise<CheckReport> {
  const layout = await scanDataset(dir);
  const problems: DataProblem[] = [...layout.problems];
  if (opts.expectChannels !== undefined && opts.expectChannels !== layout.channelNames.length) {
    problems.push({
      severity: 'error',
      file: 'dataset.json',
      fault: `names ${layout.channelNames.length} channel(s) (${layout.channelNames.join(', ')}) but the model takes ${opts.expectChannels} (plan model.inputChannels)`,
    });
  }
  const rows: CaseRow[] = [];
  const nc = layout.labels.length;
  for (let i = 0; i < layout.cases.length; i++) {
    const e = layout.cases[i];
    const r = await readCase(dir, e, nc);
    problems.push(...r.problems);
    const labelled = e.label !== undefined || e.classLabel !== undefined;
    const layoutError = layout.problems.some((p) => p.severity === 'error' && p.case === e.name);
    rows.push({
      ...r.info,
      case: e.name,
      split: !labelled ? 'pool' : e.split === 'Tr' ? 'train' : 'val',
      channels: e.images.filter((f) => f !== undefined).length + (e.extraChannels?.length ?? 0),
      ...(e.classLabel !== undefined ? { classLabel: e.classLabel } : {}),
      usable: r.raw !== undefined && !layoutError,
    });
    onCase?.(i + 1, layout.cases.length);
  }
  const usable = rows.filter((r) => r.usable);
  return {
    name: layout.name,
    labels: layout.labels,
    channelNames: layout.channelNames,
    rows,
    problems,
    counts: {
      train: usable.filter((r) => r.split === 'train').length,
      val: usable.filter((r) => r.split === 'val').length,
      unlabelled: usable.filter((r) => r.split === 'pool').length,
      unusable: rows.length - usable.length,
    },
  };
}

