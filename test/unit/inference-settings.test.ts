/**
 * model.inference in plans and task settings (docs/compatibility.md): validated at the edge, needs the site feature
 * window-inference when it changes how a site scores, and never reaches a site that would refuse it when it does not.
 */
import { describe, expect, it } from 'vitest';
import { parsePlan } from '../../shared/plan/load.ts';
import { taskSettingsForPlan, type TaskSettings } from '../../shared/protocol/task.ts';
import { decodeTaskSettings, featuresNeeded, settingsForSite, UnsupportedTaskError } from '../../shared/protocol/compatibility.ts';
import { FEATURES, LEGACY_SITE, PROTOCOL_VERSION, SITE_FEATURES } from '../../shared/protocol/features.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import type { Med3dArchitecture } from '../../shared/model/med3d.ts';

const plan = (model: string) => parsePlan(['name: t', `model: { architecture: med3d, patch: [16, 16, 16], ${model} }`, 'local: { steps: 1 }', ''].join('\n'));
const settings = (model: string): TaskSettings => taskSettingsForPlan(plan(model), 'fed-1', ['encoder.conv1.weight']);
const current = { protocolVersion: PROTOCOL_VERSION, features: new Set<string>(SITE_FEATURES) };
/** A protocol-2 site of the release before model.inference. */
const older = { protocolVersion: 2, features: new Set<string>([FEATURES.localKeepMoments]) };

describe('plan: model.inference', () => {
  it('is absent by default, fills its defaults when given, and reaches the architecture', () => {
    expect(plan('').model.inference).toBeUndefined();
    expect(plan('inference: { mode: window, window: [32, 32, 32] }').model.inference).toEqual({ mode: 'window', window: [32, 32, 32], overlap: 0.5, blend: 'gaussian', flipTTA: false, batch: 2 });
    const arch = architectureFor(plan('inference: { mode: window, blend: uniform }').model) as Med3dArchitecture;
    expect(arch.inference?.blend).toBe('uniform');
    expect((architectureFor(plan('').model) as Med3dArchitecture).inference).toBeUndefined();
  });

  it.each([
    ['an unknown field', 'inference: { mode: window, stride: 2 }', /stride/],
    ['an overlap of 1', 'inference: { mode: window, overlap: 1 }', /overlap/],
    ['an unknown blend', 'inference: { blend: median }', /blend/],
    ['windows on a classification head', 'head: classification, inference: { mode: window }', /per-voxel output/],
  ])('refuses %s', (_what, model, message) => {
    expect(() => plan(model)).toThrow(message);
  });

  it('refuses windows on tiny3d, whose trainer scores whole volumes only', () => {
    expect(() => parsePlan('model: { architecture: tiny3d, inference: { flipTTA: true } }\n')).toThrow(/need architecture med3d/);
    expect(parsePlan('model: { architecture: tiny3d, inference: { mode: whole } }\n').model.inference?.mode).toBe('whole');
  });
});

describe('compatibility: model.inference', () => {
  it('needs window-inference for windows or flips, not for whole-volume settings', () => {
    expect(featuresNeeded(settings(''))).toEqual([]);
    expect(featuresNeeded(settings('inference: { mode: whole }'))).toEqual([]);
    expect(featuresNeeded(settings('inference: { mode: window }'))).toEqual([FEATURES.windowInference]);
    expect(featuresNeeded(settings('inference: { flipTTA: true }'))).toEqual([FEATURES.windowInference]);
  });

  it('withholds a window task from older and legacy sites by name; the current site gets it with requires', () => {
    const s = settings('inference: { mode: window }');
    expect(settingsForSite(s, older)).toEqual({ ok: false, missing: [FEATURES.windowInference] });
    expect(settingsForSite(s, LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.windowInference] });
    const r = settingsForSite(s, current);
    if (!r.ok) throw new Error('expected settings for the current site');
    expect(r.settings.requires).toEqual([FEATURES.windowInference]);
    expect(decodeTaskSettings(JSON.stringify(r.settings)).settings.model.inference?.mode).toBe('window');
    // A site that lacks the feature but gets the task anyway (e.g. from a coordinator that did not shape it) refuses it by name.
    expect(() => decodeTaskSettings(JSON.stringify(r.settings), { protocolVersion: 2, features: [FEATURES.localKeepMoments] })).toThrow(/requires feature\(s\) window-inference/);
  });

  it('drops whole-volume settings for sites without the feature (they score the same), keeps them for the current site', () => {
    const s = settings('inference: { mode: whole, overlap: 0.25 }');
    const old = settingsForSite(s, older);
    expect(old.ok && 'inference' in old.settings.model).toBe(false);
    expect(old.ok && 'requires' in old.settings).toBe(false);
    const now = settingsForSite(s, current);
    expect(now.ok && now.settings.model.inference?.overlap).toBe(0.25);
  });

  it('refuses an unknown model field by name, as a site of the release before model.inference does with it', () => {
    const raw = JSON.parse(JSON.stringify(settings(''))) as Record<string, any>;
    raw.model.inferenceV2 = { mode: 'window' };
    expect(() => decodeTaskSettings(JSON.stringify(raw))).toThrow(UnsupportedTaskError);
    expect(() => decodeTaskSettings(JSON.stringify(raw))).toThrow(/model\.inferenceV2/);
  });
});
