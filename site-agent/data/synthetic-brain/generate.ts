/**
 * The synthetic multi-site brain-lesion benchmark: one MSD folder per site (labelled + unlabelled cases in
 * imagesTr/labelsTr, all from that site's scanner profile) and one shared test folder (imagesTs/labelsTs
 * only) with unseen subjects from every site's profile. Deterministic: the same options give byte-identical
 * files. See docs/benchmark.md.
 */
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { writeFileAtomic } from '../../../shared/util/fs-atomic.ts';
import { deriveSeed } from '../prng.ts';
import { makeAnatomy } from './anatomy.ts';
import { acquire, type Acquisition } from './acquire.ts';
import { placeLesions } from './lesions.ts';
import { BenchmarkOptionsSchema, type BenchmarkOptions, type BenchmarkOptionsInput } from './options.ts';
import { profileFor, type ScannerProfile } from './profiles.ts';
import { toStored, writeStored } from './write.ts';
import { siteLetters } from '../../../shared/protocol/site-names.ts';

export interface GeneratedCase {
  readonly name: string;
  readonly split: 'labelled' | 'unlabelled' | 'test';
  readonly profile: string;
  readonly lesions: number;
  /** Labelled voxels / all voxels of the written grid. */
  readonly lesionFraction: number;
}

export interface GeneratedSite {
  readonly name: string;
  readonly dir: string;
  readonly profile: ScannerProfile;
  readonly cases: readonly GeneratedCase[];
}

export interface GeneratedBenchmark {
  readonly root: string;
  readonly sites: readonly GeneratedSite[];
  /** The site folders, in site order (what `medfl experiment --sites` takes). */
  readonly siteDirs: readonly string[];
  /** The shared test folder (imagesTs + labelsTs, no dataset.json). */
  readonly testDir: string;
  readonly test: readonly GeneratedCase[];
  readonly options: BenchmarkOptions;
}

export interface SynthesizedCase {
  readonly acquisition: Acquisition;
  readonly lesions: number;
  /** Subjects drawn before one met the lesion-fraction range. */
  readonly attempts: number;
}

const MAX_ATTEMPTS = 8;

/**
 * One subject scanned with `profile`, canonical RAS+ on the site's grid. A subject whose written lesion volume
 * misses knobs.lesionFraction (rare: lesions clipped by CSF, a tight range) is replaced by the next draw.
 */
export function synthesizeCase(subjectSeed: number, profile: ScannerProfile, o: BenchmarkOptions): SynthesizedCase {
  const k = o.knobs;
  for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
    const s = deriveSeed(subjectSeed, attempt);
    const anatomy = makeAnatomy({ shape: o.shape, spacingMm: o.spacingMm, seed: deriveSeed(s, 1), distractors: k.distractors });
    const lesions = placeLesions(anatomy, {
      seed: deriveSeed(s, 2),
      contrast: k.lesionContrast,
      radiusMm: k.lesionRadiusMm,
      count: k.lesionCount,
      fraction: k.lesionFraction,
      periventricularShare: k.periventricularShare,
    });
    const acquisition = acquire(anatomy, lesions, profile, k, deriveSeed(s, 3));
    const fraction = acquisition.lesionVoxels / acquisition.image.length;
    if (fraction >= k.lesionFraction[0] && fraction <= k.lesionFraction[1]) return { acquisition, lesions: lesions.lesions.length, attempts: attempt + 1 };
  }
  throw new RangeError(
    `no subject met the lesion fraction range [${k.lesionFraction.join(', ')}] in ${MAX_ATTEMPTS} draws; widen lesionFraction or change lesionRadiusMm/lesionCount`,
  );
}

const siteLetter = siteLetters;

/** Seed of case `k` of site `site` (split 'site': its labelled then unlabelled cases) or of its profile's test subjects. */
export function caseSeed(seed: number, site: number, k: number, split: 'site' | 'test'): number {
  return deriveSeed(deriveSeed(seed, (split === 'site' ? 1 : 1000) + site), k);
}

/** Make `dir` ready to receive a fresh copy: refuse a non-empty folder unless overwriting. */
function prepareDir(dir: string, overwrite: boolean): void {
  if (!existsSync(dir) || readdirSync(dir).length === 0) return;
  if (!overwrite) throw new Error(`${dir} is not empty; pass overwrite (--overwrite) to replace it`);
  rmSync(dir, { recursive: true, force: true });
}

/** Write every case; at most one case's files are being compressed while the next one is synthesised. */
export async function generateBenchmark(outDir: string, input: BenchmarkOptionsInput = {}, onCase?: (c: GeneratedCase, site: string) => void): Promise<GeneratedBenchmark> {
  const o = BenchmarkOptionsSchema.parse(input);
  const root = resolve(outDir);
  const siteNames = Array.from({ length: o.sites }, (_, i) => `site-${siteLetter(i)}`);
  const testDir = join(root, 'test');
  for (const d of [...siteNames.map((n) => join(root, n)), testDir]) prepareDir(d, o.overwrite);

  let pending: Promise<unknown> = Promise.resolve();
  const emit = async (dirs: { image: string; label?: string }, acq: Acquisition, profile: ScannerProfile): Promise<void> => {
    const img = toStored(acq.image, acq.shape, acq.spacingMm, profile.axcodes);
    const lbl = dirs.label ? toStored(acq.label, acq.shape, acq.spacingMm, profile.axcodes) : undefined;
    await pending;
    const description = `MedFL synthetic brain, ${profile.name}`;
    pending = Promise.all([
      writeStored(dirs.image, img, { datatype: profile.datatype, slope: profile.slope, description }),
      lbl && dirs.label ? writeStored(dirs.label, lbl, { datatype: 'uint8', description }) : undefined,
    ]);
  };

  const sites: GeneratedSite[] = [];
  for (let i = 0; i < o.sites; i++) {
    const profile = profileFor(i);
    const name = siteNames[i];
    const dir = join(root, name);
    const cases: GeneratedCase[] = [];
    const labelled: string[] = [];
    for (let k = 0; k < o.labelled + o.unlabelled; k++) {
      const isLabelled = k < o.labelled;
      const caseName = isLabelled ? `site${siteLetter(i)}_${String(k).padStart(3, '0')}` : `site${siteLetter(i)}_u${String(k - o.labelled).padStart(3, '0')}`;
      const c = synthesizeCase(caseSeed(o.seed, i, k, 'site'), profile, o);
      await emit({ image: join(dir, 'imagesTr', `${caseName}_0000.nii.gz`), label: isLabelled ? join(dir, 'labelsTr', `${caseName}.nii.gz`) : undefined }, c.acquisition, profile);
      const info: GeneratedCase = { name: caseName, split: isLabelled ? 'labelled' : 'unlabelled', profile: profile.name, lesions: c.lesions, lesionFraction: c.acquisition.lesionVoxels / c.acquisition.image.length };
      cases.push(info);
      if (isLabelled) labelled.push(caseName);
      onCase?.(info, name);
    }
    const datasetJson = {
      name,
      description: `MedFL synthetic brain-lesion benchmark, site ${name}: scanner profile ${profile.name} (${profile.description}); seed ${o.seed}`,
      reference: 'synthetic (generated by medfl benchmark generate)',
      licence: 'CC0',
      tensorImageSize: '3D',
      modality: { '0': 'FLAIR' },
      labels: { '0': 'background', '1': 'lesion' },
      // imagesTr holds the unlabelled pool too; the loader compares numTraining with the image count.
      numTraining: o.labelled + o.unlabelled,
      numTest: 0,
      training: labelled.map((n) => ({ image: `./imagesTr/${n}.nii.gz`, label: `./labelsTr/${n}.nii.gz` })),
      test: [],
    };
    writeFileAtomic(join(dir, 'dataset.json'), JSON.stringify(datasetJson, null, 2) + '\n');
    sites.push({ name, dir, profile, cases });
  }

  const test: GeneratedCase[] = [];
  for (let i = 0; i < o.sites; i++) {
    const profile = profileFor(i);
    for (let k = 0; k < o.testPerSite; k++) {
      const caseName = `test${siteLetter(i)}_${String(k).padStart(3, '0')}`;
      const c = synthesizeCase(caseSeed(o.seed, i, k, 'test'), profile, o);
      await emit({ image: join(testDir, 'imagesTs', `${caseName}_0000.nii.gz`), label: join(testDir, 'labelsTs', `${caseName}.nii.gz`) }, c.acquisition, profile);
      const info: GeneratedCase = { name: caseName, split: 'test', profile: profile.name, lesions: c.lesions, lesionFraction: c.acquisition.lesionVoxels / c.acquisition.image.length };
      test.push(info);
      onCase?.(info, 'test');
    }
  }
  await pending;

  const manifest = {
    generator: 'medfl benchmark generate',
    options: o,
    sites: sites.map((s) => ({ name: s.name, profile: s.profile, cases: s.cases })),
    test: { dir: 'test', cases: test },
  };
  writeFileAtomic(join(root, 'benchmark.json'), JSON.stringify(manifest, null, 2) + '\n');
  return { root, sites, siteDirs: sites.map((s) => s.dir), testDir, test, options: o };
}
