/**
 * Protocol versions side by side (docs/compatibility.md): what the coordinator sends a site of each version, and
 * what a site does with settings from a newer coordinator: unknown tuning ignored, anything else refused by name.
 */
import { describe, expect, it } from 'vitest';
import { parsePlan } from '../../shared/plan/load.ts';
import { taskSettingsForPlan, TaskSettingsSchema, type TaskSettings } from '../../shared/protocol/task.ts';
import { decodeTaskSettings, featuresNeeded, settingsForSite, UnsupportedTaskError } from '../../shared/protocol/compatibility.ts';
import { FEATURES, LEGACY_SITE, PROTOCOL_VERSION, SITE_FEATURES } from '../../shared/protocol/features.ts';
import { siteCapabilities } from '../../coordinator/server/federation-service.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

function settings(keepMoments: 'own' | 'all' = 'own'): TaskSettings {
  const plan = parsePlan(TEST_PLAN({ rounds: 2, minSites: 1 }).replace('learningRate: 0.005', `learningRate: 0.005, keepMoments: ${keepMoments}`));
  return taskSettingsForPlan(plan, 'fed-1', ['enc.w']);
}

const current = { protocolVersion: PROTOCOL_VERSION, features: new Set<string>(SITE_FEATURES) };

describe('coordinator: settings shaped per site', () => {
  it('needs local-keep-moments only when local.keepMoments is all', () => {
    expect(featuresNeeded(settings('own'))).toEqual([]);
    expect(featuresNeeded(settings('all'))).toEqual([FEATURES.localKeepMoments]);
  });

  it('withholds a task from a site that lacks a needed feature, and names the feature', () => {
    expect(settingsForSite(settings('all'), LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.localKeepMoments] });
    expect(settingsForSite(settings('all'), { protocolVersion: 2, features: new Set() })).toEqual({ ok: false, missing: [FEATURES.localKeepMoments] });
  });

  it('lists the needed features in `requires` for sites that read it, and never sends it to a protocol-1 site', () => {
    const r = settingsForSite(settings('all'), current);
    expect(r.ok && r.settings.requires).toEqual([FEATURES.localKeepMoments]);
    const legacy = settingsForSite(settings('own'), LEGACY_SITE);
    expect(legacy.ok && 'requires' in legacy.settings).toBe(false);
    const plain = settingsForSite(settings('own'), current);
    expect(plain.ok && 'requires' in plain.settings).toBe(false);
  });

  it('scanner augmentation: needed above probability 0, else its fields are dropped for a site without the feature', () => {
    const base = settings('own');
    expect(Object.keys(base.data?.augment || {})).toContain('biasProbability');
    const legacy = settingsForSite(base, LEGACY_SITE);
    const augment = legacy.ok && legacy.settings.data?.augment;
    expect(augment && Object.keys(augment).filter((k) => /^(bias|blur|lowRes|contrast)/.test(k))).toEqual([]);
    expect(augment && augment.gammaProbability).toBe(base.data?.augment && base.data.augment.gammaProbability);
    const kept = settingsForSite(base, current);
    expect(kept.ok && kept.settings.data?.augment && kept.settings.data.augment.biasProbability).toBe(0);
    const on: TaskSettings = { ...base, data: { ...base.data!, augment: { ...(base.data!.augment as object), blurProbability: 0.3 } as never } };
    expect(featuresNeeded(on)).toEqual([FEATURES.scannerAugmentation]);
    expect(settingsForSite(on, LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.scannerAugmentation] });
  });

  it('bias-field correction: needed when on, else the field is dropped for a site without the feature', () => {
    const base = settings('own');
    expect(base.data?.biasCorrection).toBe('none');
    const legacy = settingsForSite(base, LEGACY_SITE);
    expect(legacy.ok && legacy.settings.data && 'biasCorrection' in legacy.settings.data).toBe(false);
    const kept = settingsForSite(base, current);
    expect(kept.ok && kept.settings.data?.biasCorrection).toBe('none');
    const on: TaskSettings = { ...base, data: { ...base.data!, biasCorrection: 'polynomial' } };
    expect(featuresNeeded(on)).toEqual([FEATURES.biasFieldCorrection]);
    expect(settingsForSite(on, LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.biasFieldCorrection] });
    const sent = settingsForSite(on, current);
    expect(sent.ok && sent.settings.requires).toEqual([FEATURES.biasFieldCorrection]);
  });

  it('reads a site of the previous release (no version in its SubscribeRequest) as protocol 1 without features', () => {
    expect(siteCapabilities({ cachedModels: [], protocolVersion: 0, features: [] })).toEqual(LEGACY_SITE);
    expect(siteCapabilities({ cachedModels: [] })).toEqual(LEGACY_SITE);
    expect(siteCapabilities({ protocolVersion: 2, features: ['x'.repeat(65)] })).toEqual(LEGACY_SITE);
    const caps = siteCapabilities({ cachedModels: [], protocolVersion: 3, features: ['local-keep-moments', 'newer'] });
    expect(caps.protocolVersion).toBe(3);
    expect([...caps.features]).toEqual(['local-keep-moments', 'newer']);
  });
});

describe('site: decoding settings from a newer coordinator', () => {
  const json = (extra: (s: Record<string, any>) => void, base = settings()) => {
    const s = JSON.parse(JSON.stringify(base)) as Record<string, any>;
    extra(s);
    return JSON.stringify(s);
  };

  it('decodes this release’s own settings unchanged', () => {
    const s = settings('all');
    expect(decodeTaskSettings(JSON.stringify(s))).toEqual({ settings: TaskSettingsSchema.parse(s), ignored: [] });
  });

  it('ignores unknown tuning fields in local and data.augment, and says which', () => {
    const r = decodeTaskSettings(json((s) => {
      s.local.warmupSteps = 5;
      s.data.augment.mixupProbability = 0.1;
    }));
    expect(r.ignored.sort()).toEqual(['data.augment.mixupProbability', 'local.warmupSteps']);
    expect(r.settings.local).not.toHaveProperty('warmupSteps');
    expect(r.settings.local.learningRate).toBe(0.005);
  });

  it.each([
    ['a new top-level field', (s: Record<string, any>) => { s.uploadEverything = true; }, 'uploadEverything'],
    ['a new model field', (s: Record<string, any>) => { s.model.attention = 'global'; }, 'model.attention'],
    ['a new share field', (s: Record<string, any>) => { s.share.alsoHead = true; }, 'share.alsoHead'],
    ['a new dp field', (s: Record<string, any>) => { s.dp = { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5, localNoise: 0 }; }, 'dp.localNoise'],
    ['a new compression field', (s: Record<string, any>) => { s.compression = { update: 'float16', delta: false, sparsity: 0.9 }; }, 'compression.sparsity'],
    ['a new data field', (s: Record<string, any>) => { s.data.resampleTo = 'atlas'; }, 'data.resampleTo'],
  ])('refuses %s, naming it and its own version', (_what, edit, field) => {
    const run = () => decodeTaskSettings(json(edit));
    expect(run).toThrow(UnsupportedTaskError);
    expect(run).toThrow(new RegExp(`${field.replace('.', '\\.')}.*protocol version ${PROTOCOL_VERSION}`));
  });

  it('refuses a task that requires a feature it lacks, naming the feature and its version', () => {
    const s = settingsForSite(settings('all'), current);
    if (!s.ok) throw new Error('expected settings for the current site');
    const older = { protocolVersion: 2, features: [] };
    expect(() => decodeTaskSettings(JSON.stringify(s.settings), older)).toThrow(/requires feature\(s\) local-keep-moments.*protocol version 2 with features \[\]/);
    expect(decodeTaskSettings(JSON.stringify(s.settings)).settings.local.keepMoments).toBe('all');
    expect(() => decodeTaskSettings(json((x) => { x.requires = ['teleport']; }))).toThrow(/requires feature\(s\) teleport/);
  });

  it('still refuses malformed values as malformed, not as a version problem', () => {
    const run = () => decodeTaskSettings(json((s) => { s.local.learningRate = -1; }));
    expect(run).toThrow(/malformed task settings: local\.learningRate/);
    expect(run).not.toThrow(UnsupportedTaskError);
  });
});
