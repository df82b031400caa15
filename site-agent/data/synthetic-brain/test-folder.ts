/**
 * Reading the benchmark's shared test folder (imagesTs/ + labelsTs/, no dataset.json) case by case through the
 * project's own case reader and preprocessing (case-reader.ts, preprocess.ts: canonical RAS+, MRI z-score,
 * resampling to the plan spacing), i.e. the same path SiteData takes for a site's cases.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { readCase } from '../case-reader.ts';
import { preprocessCase } from '../preprocess.ts';
import type { PreparedCase, Shape3 } from '../types.ts';

export interface TestCase extends PreparedCase {
  /** File-derived case name (local use: the benchmark's names are synthetic, e.g. "testa_000"). */
  readonly name: string;
}

/** Every labelled case of a test folder, normalised (MRI) and resampled to `spacing` when given. */
export async function loadTestFolder(dir: string, spacing?: Shape3): Promise<TestCase[]> {
  const images = readdirSync(join(dir, 'imagesTs')).filter((f) => /_0000\.nii(\.gz)?$/.test(f)).sort();
  const out: TestCase[] = [];
  for (const f of images) {
    const name = f.replace(/_0000\.nii(\.gz)?$/, '');
    const label = `labelsTs/${name}.nii.gz`;
    const r = await readCase(dir, { name, split: 'Ts', images: [`imagesTs/${f}`], label }, 2);
    if (!r.raw) throw new Error(`test case ${name} is unusable: ${r.problems.map((p) => p.fault).join('; ')}`);
    const c = preprocessCase(`test-${out.length}`, r.raw, { modalities: ['mri'], ...(spacing ? { spacing } : {}) });
    out.push({ ...c, name });
  }
  return out;
}
