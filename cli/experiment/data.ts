/**
 * The data of `medfl experiment`: a generated phantom federation when no folders are given, the pooled folder
 * (every site's labelled training cases in one place, each site's validation split left out), and the common
 * test set held in memory.
 */
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { VolumeCase } from '../../shared/model/types.ts';
import { parseDatasetJson, type DatasetJson } from '../../site-agent/data/dataset-json.ts';
import { preparedToVolumeCase, SiteData, validationCarve } from '../../site-agent/data/site-data.ts';
import { scanDataset } from '../../site-agent/data/layout.ts';
import { readCase } from '../../site-agent/data/case-reader.ts';
import { SITE_PROFILES } from '../../site-agent/data/phantom.ts';
import { generatedSiteName } from '../../shared/protocol/site-names.ts';


export interface PhantomFederation {
  sites: number;
  cases: number;
  valCases: number;
  poolCases: number;
  testCases: number;
}

/** Sites with different scanner profiles, unlabelled pools, and a test set drawn from every profile. */
export async function generatePhantomFederation(dir: string, p: PhantomFederation, size: readonly [number, number, number], seed: number): Promise<{ sites: string[]; test: string }> {
  const { writePhantomSite } = await import('../../site-agent/data/phantom.ts');
  const { writePhantomPool } = await import('../../site-agent/training/phantom-pool.ts');
  const sites: string[] = [];
  for (let i = 0; i < p.sites; i++) {
    const name = generatedSiteName(i);
    const prof = SITE_PROFILES[i % SITE_PROFILES.length];
    const d = join(dir, name);
    sites.push(d);
    if (existsSync(join(d, 'dataset.json'))) continue;
    await writePhantomSite(d, { siteName: name, cases: p.cases, valCases: p.valCases, size, seed: 1000 * (i + 1) + seed, intensityShift: prof.shift, intensityScale: prof.scale });
    await writePhantomPool(d, { siteName: name, cases: p.poolCases, size, seed: 1000 * (i + 1) + seed, intensityShift: prof.shift, intensityScale: prof.scale });
  }
  const test = join(dir, 'test');
  if (!existsSync(join(test, 'dataset.json'))) {
    const parts: string[] = [];
    for (let i = 0; i < p.sites; i++) {
      const prof = SITE_PROFILES[i % SITE_PROFILES.length];
      const part = join(dir, '.test-parts', `t${i}`);
      const per = Math.max(1, Math.round(p.testCases / p.sites));
      await writePhantomSite(part, { siteName: `test${i}`, cases: per, valCases: 0, size, seed: 90_000 + 1000 * i + seed, intensityShift: prof.shift, intensityScale: prof.scale });
      parts.push(part);
    }
    poolFolders(test, parts);
  }
  return { sites, test };
}

const NII = /\.nii(\.gz)?$/;

/**
 * One MSD folder holding every labelled case of `dirs`: training cases in imagesTr/labelsTr, validation cases in
 * imagesTs/labelsTs — a site's own labelled imagesTs, or for a site without them the cases it holds back as
 * validation (validationCarve) — so pooled training sees exactly the cases the sites train on, and validates on
 * all of theirs. File names get the folder's index as a prefix so they cannot collide. Unlabelled cases stay out.
 */
export function poolFolders(dest: string, dirs: readonly string[]): string {
  if (existsSync(join(dest, 'dataset.json'))) return dest;
  for (const sub of ['imagesTr', 'labelsTr', 'imagesTs', 'labelsTs']) mkdirSync(join(dest, sub), { recursive: true });
  const first = JSON.parse(readFileSync(join(dirs[0], 'dataset.json'), 'utf8')) as Record<string, unknown>;
  const training: { image: string; label: string }[] = [];
  const labelled = (d: string, split: 'Tr' | 'Ts') => (existsSync(join(d, `labels${split}`)) ? readdirSync(join(d, `labels${split}`)).filter((f) => NII.test(f) && !f.startsWith('.')) : []);
  const copyCase = (d: string, i: number, from: 'Tr' | 'Ts', to: 'Tr' | 'Ts', lf: string): boolean => {
    const caseName = lf.replace(NII, '');
    const ext = lf.slice(caseName.length);
    const images = readdirSync(join(d, `images${from}`)).filter((f) => f === lf || (f.startsWith(`${caseName}_`) && /^_\d{4}\.nii(\.gz)?$/.test(f.slice(caseName.length))));
    if (images.length === 0) return false;
    for (const img of images) cpSync(join(d, `images${from}`, img), join(dest, `images${to}`, `p${i}x${img}`));
    cpSync(join(d, `labels${from}`, lf), join(dest, `labels${to}`, `p${i}x${caseName}${ext}`));
    if (to === 'Tr') training.push({ image: `./imagesTr/p${i}x${caseName}${ext}`, label: `./labelsTr/p${i}x${caseName}${ext}` });
    return true;
  };
  for (const [i, d] of dirs.entries()) {
    const tr = labelled(d, 'Tr');
    const ts = existsSync(join(d, 'imagesTs')) ? labelled(d, 'Ts') : [];
    const held = ts.length > 0 ? new Set<string>() : validationCarve(tr.map((f) => f.replace(NII, '')));
    for (const lf of tr) copyCase(d, i, 'Tr', held.has(lf.replace(NII, '')) ? 'Ts' : 'Tr', lf);
    for (const lf of ts) copyCase(d, i, 'Ts', 'Ts', lf);
  }
  const json = { ...first, name: 'pooled', numTraining: training.length, numTest: 0, training, test: [] };
  writeFileSync(join(dest, 'dataset.json'), JSON.stringify(json, null, 2) + '\n');
  return dest;
}

/** The first site's dataset.json: labels and channels of a test folder that has none of its own. */
export function siteMeta(siteDir: string): DatasetJson {
  const path = join(siteDir, 'dataset.json');
  if (!existsSync(path)) throw new Error(`${siteDir} has no dataset.json; give MSD-layout site folders (see docs/data.md)`);
  return parseDatasetJson(readFileSync(path, 'utf8'), path);
}

/**
 * Every labelled case of the test folder, prepared like training data and held in memory (a test folder is meant
 * to be small). The folder may be a full MSD folder or only imagesTs/ + labelsTs/.
 */
export async function loadTestCases(testDir: string, meta: DatasetJson, patch: readonly [number, number, number], data: { spacing?: readonly [number, number, number]; normalization?: 'auto' | 'ct' | 'mri' | 'quantile' | 'none'; biasCorrection?: 'none' | 'polynomial' } = {}): Promise<{ cases: VolumeCase[]; numClasses: number }> {
  const probe = await SiteData.open(testDir, {
    patch: [...patch] as [number, number, number],
    fallbackMeta: meta,
    ...(data.spacing ? { spacing: [...data.spacing] as [number, number, number] } : {}),
    ...(data.normalization ? { normalization: data.normalization } : {}),
    ...(data.biasCorrection ? { biasCorrection: data.biasCorrection } : {}),
  });
  const cases: VolumeCase[] = [];
  for (const ref of [...probe.train, ...probe.val]) {
    const c = await probe.load(ref);
    if (!c?.label) continue;
    // Every input channel, interleaved channels last as the encoder reads them (one channel: the volume itself).
    cases.push(preparedToVolumeCase(c, ref.id));
  }
  if (cases.length === 0) throw new Error(`no usable labelled case in the test folder ${testDir} (it needs imagesTs/ + labelsTs/, or imagesTr/ + labelsTr/ with a dataset.json)`);
  return { cases, numClasses: Math.max(2, probe.labels.length) };
}

/**
 * The per-axis median voxel spacing (mm, canonical [D, H, W]) of a few labelled training cases of every site, and
 * whether the sites differ — nnU-Net's rule for a common target spacing. A consortium agrees on `data.spacing` in its
 * plan; this is what `medfl experiment` proposes when the plan leaves it out and the sites' grids differ.
 */
export async function medianSpacing(siteDirs: readonly string[], perSite = 3): Promise<{ spacing: [number, number, number]; differ: boolean }> {
  const all: (readonly number[])[] = [];
  const perSiteSpacing: string[] = [];
  for (const d of siteDirs) {
    const layout = await scanDataset(d);
    for (const e of layout.cases.filter((c) => c.split === 'Tr').slice(0, perSite)) {
      const r = await readCase(d, e, layout.labels.length);
      if (!r.raw) continue;
      all.push(r.raw.spacing);
      perSiteSpacing.push(r.raw.spacing.map((v) => v.toFixed(3)).join(','));
    }
  }
  if (all.length === 0) throw new Error('no readable training case to take a spacing from');
  const median = (xs: number[]) => {
    const v = [...xs].sort((a, b) => a - b);
    return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
  };
  const spacing = [0, 1, 2].map((k) => median(all.map((s) => s[k]))) as [number, number, number];
  return { spacing, differ: new Set(perSiteSpacing).size > 1 };
}
