/**
 * Old and new versions side by side (docs/compatibility.md). The coordinator shapes each task's settings for the
 * site it goes to (settingsForSite) and withholds a task that needs a feature the site lacks; a site decodes the
 * settings of a task whose signature already verified (decodeTaskSettings): unknown fields are ignored only in
 * sections that hold tuning, and a task it cannot honour is refused with the field or feature named.
 */
import type { z } from 'zod';
import { FEATURES, PROTOCOL_VERSION, SITE_FEATURES, type Feature, type SiteCapabilities } from './features.ts';
import { TaskSettingsSchema, type TaskSettings } from './task.ts';
import { AugmentSettingsSchema } from '../plan/data-settings.ts';
import { isDefaultInference } from '../model/sliding-window.ts';

/** The site features a task's settings need: each one a setting whose effect a site without it would silently drop. */
export function featuresNeeded(s: TaskSettings): Feature[] {
  const out: Feature[] = [];
  if (s.local.keepMoments === 'all') out.push(FEATURES.localKeepMoments);
  if (!isDefaultInference(s.model.inference)) out.push(FEATURES.windowInference);
  if ((s.teacherStudent?.confidenceTarget ?? 0) > 0) out.push(FEATURES.calibratedConfidence);
  if (s.data?.normalization === 'quantile') out.push(FEATURES.quantileNormalization);
  if ((s.data?.biasCorrection ?? 'none') !== 'none') out.push(FEATURES.biasFieldCorrection);
  const augment = s.data?.augment;
  if (augment && SCANNER_PROBABILITIES.some((k) => (augment[k] ?? 0) > 0)) out.push(FEATURES.scannerAugmentation);
  return out;
}

/** The scanner-difference augmentation's fields of `data.augment` (site-agent/data/scanner-augment.ts). */
const SCANNER_PROBABILITIES = ['biasProbability', 'blurProbability', 'lowResProbability', 'contrastProbability'] as const;
const SCANNER_FIELDS = [...SCANNER_PROBABILITIES, 'biasStrength', 'blurSigma', 'lowResZoom', 'contrastRange'] as const;

export type SettingsForSite = { ok: true; settings: TaskSettings } | { ok: false; missing: Feature[] };

/** The settings as `site` can read them, or the features it lacks for them (then it must not get the task). */
export function settingsForSite(s: TaskSettings, site: SiteCapabilities): SettingsForSite {
  const { requires: _ignored, ...shaped } = s;
  const needed = featuresNeeded(shaped);
  const missing = needed.filter((f) => !site.features.has(f));
  if (missing.length > 0) return { ok: false, missing };
  let rest = shaped;
  if (shaped.model.inference !== undefined && !site.features.has(FEATURES.windowInference)) {
    // Whole-volume settings score as their absence does; an older site would refuse the unknown model field.
    const { inference: _whole, ...model } = shaped.model;
    rest = { ...shaped, model };
  }
  if (rest.teacherStudent?.confidenceTarget !== undefined && !site.features.has(FEATURES.calibratedConfidence)) {
    // Off (0) means the fixed threshold, which is what an older site does without the field; it would refuse it.
    const { confidenceTarget: _off, ...teacherStudent } = rest.teacherStudent;
    rest = { ...rest, teacherStudent };
  }
  if (rest.teacherStudent?.modelMargin !== undefined && !site.features.has(FEATURES.teacherModelCheck)) {
    // An older site has no teacher-versus-model check to tune: it trains with its teacher as it always did, and
    // would refuse the unknown field. Not withheld: the check guards the loop, the task means the same without it.
    const { modelMargin: _unchecked, ...teacherStudent } = rest.teacherStudent;
    rest = { ...rest, teacherStudent: teacherStudent as typeof rest.teacherStudent };
  }
  if (rest.data?.augment && !site.features.has(FEATURES.scannerAugmentation)) {
    // All four probabilities are 0 here (featuresNeeded): the fields do nothing, and an older site would refuse them.
    const augment = { ...rest.data.augment };
    for (const k of SCANNER_FIELDS) delete (augment as Record<string, unknown>)[k];
    rest = { ...rest, data: { ...rest.data, augment: augment as typeof rest.data.augment } };
  }
  if (rest.data?.biasCorrection !== undefined && !site.features.has(FEATURES.biasFieldCorrection)) {
    // It is 'none' here (featuresNeeded), which is what an older site does without the field; it would refuse it.
    const { biasCorrection: _none, ...data } = rest.data;
    rest = { ...rest, data: data as typeof rest.data };
  }
  // Protocol 1 refuses any top-level key it does not know, so `requires` goes only to sites that read it.
  if (site.protocolVersion < 2 || needed.length === 0) return { ok: true, settings: rest };
  return { ok: true, settings: { ...rest, requires: needed } };
}

/** The site's protocol version and features refused a task: the message names the field or feature and the version. */
export class UnsupportedTaskError extends Error {
  override name = 'UnsupportedTaskError';
}

/**
 * Sections where a field this site does not know is ignored: tuning whose absence gives the earlier behaviour
 * (a field of theirs that must not be ignored is announced in `requires`). Everywhere else an unknown field is refused.
 */
const TOLERANT_SECTIONS: ReadonlyArray<{ path: readonly string[]; known: ReadonlySet<string> }> = [
  { path: ['local'], known: new Set(Object.keys(TaskSettingsSchema.shape.local.shape)) },
  { path: ['data', 'augment'], known: new Set(Object.keys(AugmentSettingsSchema.shape)) },
];

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Paths of the unknown keys behind `issues`, unions included (a strict object inside a union reports there). */
function unknownKeys(issues: readonly z.core.$ZodIssue[]): string[] {
  return issues.flatMap((i) => {
    if (i.code === 'unrecognized_keys') return i.keys.map((k) => [...i.path, k].join('.'));
    if (i.code === 'invalid_union') {
      // The branches that fail on unknown keys alone (the others do not fit the value at all).
      const onlyUnknown = i.errors.filter((branch) => branch.length > 0 && branch.every((b) => b.code === 'unrecognized_keys'));
      return [...new Set(onlyUnknown.flatMap((branch) => unknownKeys(branch.map((b) => ({ ...b, path: [...i.path, ...b.path] })))))];
    }
    return [];
  });
}

/**
 * A verified task's settings JSON as this site understands them: `ignored` lists the unknown tuning fields dropped.
 * Throws UnsupportedTaskError for a feature in `requires` or an unknown field outside the tolerant sections, and a
 * plain Error for malformed settings. `own` is what this site speaks (an argument so an older site can be modelled).
 */
export function decodeTaskSettings(
  json: string,
  own: { protocolVersion: number; features: readonly string[] } = { protocolVersion: PROTOCOL_VERSION, features: SITE_FEATURES },
): { settings: TaskSettings; ignored: string[] } {
  const raw: unknown = JSON.parse(json);
  if (!isRecord(raw)) throw new Error('task settings must be a JSON object');
  const speaks = `this site speaks protocol version ${own.protocolVersion} with features [${own.features.join(', ')}]`;
  if (Array.isArray(raw.requires)) {
    const lacking = raw.requires.filter((f) => typeof f !== 'string' || !own.features.includes(f)).map(String);
    if (lacking.length > 0) throw new UnsupportedTaskError(`the task requires feature(s) ${lacking.join(', ')}, which ${speaks}: not run; upgrade the site agent`);
  }
  const ignored: string[] = [];
  for (const { path, known } of TOLERANT_SECTIONS) {
    const section = path.reduce<unknown>((o, k) => (isRecord(o) ? o[k] : undefined), raw);
    if (!isRecord(section)) continue;
    for (const k of Object.keys(section)) {
      if (known.has(k)) continue;
      delete section[k];
      ignored.push([...path, k].join('.'));
    }
  }
  const r = TaskSettingsSchema.safeParse(raw);
  if (!r.success) {
    const fields = unknownKeys(r.error.issues);
    if (fields.length > 0) {
      throw new UnsupportedTaskError(
        `the task's settings carry field(s) ${fields.join(', ')} unknown to this site (${speaks}); they sit where ignoring them could change what leaves the site or how it trains, so the task is not run; upgrade the site agent`,
      );
    }
    throw new Error(`malformed task settings: ${r.error.issues.map((i) => `${i.path.join('.') || '(top)'}: ${i.message}`).join('; ')}`);
  }
  return { settings: r.data, ignored };
}
