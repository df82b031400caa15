/**
 * teacherStudent.confidenceTarget in task settings (docs/compatibility.md): needs the site feature
 * calibrated-confidence when it is on, and never reaches a site that would refuse the unknown field when it is off.
 */
import { describe, expect, it } from 'vitest';
import { parsePlan } from '../../shared/plan/load.ts';
import { taskSettingsForPlan, type TaskSettings } from '../../shared/protocol/task.ts';
import { decodeTaskSettings, featuresNeeded, settingsForSite } from '../../shared/protocol/compatibility.ts';
import { FEATURES, LEGACY_SITE, PROTOCOL_VERSION, SITE_FEATURES } from '../../shared/protocol/features.ts';

const settings = (ts: string): TaskSettings => {
  const plan = parsePlan(['name: t', 'model: { architecture: med3d, patch: [16, 16, 16] }', 'local: { steps: 1 }', `teacherStudent: { enabled: true${ts} }`, ''].join('\n'));
  return taskSettingsForPlan(plan, 'fed-1', ['encoder.conv1.weight'], { teacherStudent: plan.teacherStudent });
};
const current = { protocolVersion: PROTOCOL_VERSION, features: new Set<string>(SITE_FEATURES) };
/** A protocol-2 site of the release before calibrated confidence. */
const older = { protocolVersion: 2, features: new Set<string>([FEATURES.localKeepMoments, FEATURES.windowInference]) };
const olderDecode = { protocolVersion: 2, features: [FEATURES.localKeepMoments, FEATURES.windowInference] };

describe('compatibility: teacherStudent.confidenceTarget', () => {
  it('is refused outside [0, 1] and absent unless given', () => {
    expect(() => settings(', confidenceTarget: 1.5')).toThrow(/confidenceTarget/);
    expect(settings('').teacherStudent?.confidenceTarget).toBeUndefined();
  });

  it('needs calibrated-confidence when on: withheld from older sites, required from current ones', () => {
    const s = settings(', confidenceTarget: 0.9');
    expect(featuresNeeded(s)).toEqual([FEATURES.calibratedConfidence]);
    expect(settingsForSite(s, older)).toEqual({ ok: false, missing: [FEATURES.calibratedConfidence] });
    expect(settingsForSite(s, LEGACY_SITE)).toEqual({ ok: false, missing: [FEATURES.calibratedConfidence] });
    const r = settingsForSite(s, current);
    if (!r.ok) throw new Error('expected the task');
    expect(r.settings.requires).toEqual([FEATURES.calibratedConfidence]);
    expect(decodeTaskSettings(JSON.stringify(r.settings)).settings.teacherStudent?.confidenceTarget).toBe(0.9);
    expect(() => decodeTaskSettings(JSON.stringify(r.settings), olderDecode)).toThrow(/requires feature\(s\) calibrated-confidence/);
  });

  it('when off (0), reaches an older site without the field, which it would otherwise refuse', () => {
    const s = settings(', confidenceTarget: 0');
    expect(featuresNeeded(s)).toEqual([]);
    const r = settingsForSite(s, older);
    if (!r.ok) throw new Error('expected the task');
    expect(r.settings.teacherStudent).not.toHaveProperty('confidenceTarget');
    expect(decodeTaskSettings(JSON.stringify(r.settings), olderDecode).settings.teacherStudent?.confidence).toBe(0.9);
  });
});
