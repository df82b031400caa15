/**
 * data.normalization: quantile in task settings: needs the site feature quantile-normalization, so an older site,
 * which would refuse the settings as malformed, is never sent such a task.
 */
import { describe, expect, it } from 'vitest';
import { parsePlan } from '../../shared/plan/load.ts';
import { taskSettingsForPlan } from '../../shared/protocol/task.ts';
import { decodeTaskSettings, featuresNeeded, settingsForSite } from '../../shared/protocol/compatibility.ts';
import { FEATURES, LEGACY_SITE, PROTOCOL_VERSION, SITE_FEATURES } from '../../shared/protocol/features.ts';

const settings = (normalization: string) =>
  taskSettingsForPlan(parsePlan(['name: t', 'model: { architecture: med3d, patch: [16, 16, 16] }', 'local: { steps: 1 }', `data: { normalization: ${normalization} }`, ''].join('\n')), 'fed-1', ['encoder.conv1.weight']);

describe('compatibility: data.normalization quantile', () => {
  it('needs quantile-normalization; the other normalisations need nothing', () => {
    expect(featuresNeeded(settings('quantile'))).toEqual([FEATURES.quantileNormalization]);
    expect(featuresNeeded(settings('mri'))).toEqual([]);
    expect(() => settings('histogram')).toThrow(/normalization/);
  });

  it('is withheld from sites without the feature and required from those with it', () => {
    const s = settings('quantile');
    const older = { protocolVersion: 2, features: new Set<string>([FEATURES.localKeepMoments, FEATURES.windowInference]) };
    expect(settingsForSite(s, older)).toEqual({ ok: false, missing: [FEATURES.quantileNormalization] });
    expect(settingsForSite(s, LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.quantileNormalization] });
    const r = settingsForSite(s, { protocolVersion: PROTOCOL_VERSION, features: new Set<string>(SITE_FEATURES) });
    if (!r.ok) throw new Error('expected the task');
    expect(r.settings.requires).toEqual([FEATURES.quantileNormalization]);
    expect(decodeTaskSettings(JSON.stringify(r.settings)).settings.data?.normalization).toBe('quantile');
  });
});
