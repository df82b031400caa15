/**
 * teacherStudent.modelMargin in task settings (docs/compatibility.md): sites that announce teacher-model-check get
 * it; an older site, which would refuse the unknown field, gets the task without it (it trains with its teacher as
 * before) rather than no task at all.
 */
import { describe, expect, it } from 'vitest';
import { parsePlan } from '../../shared/plan/load.ts';
import { taskSettingsForPlan, type TaskSettings } from '../../shared/protocol/task.ts';
import { decodeTaskSettings, featuresNeeded, settingsForSite } from '../../shared/protocol/compatibility.ts';
import { FEATURES, LEGACY_SITE, PROTOCOL_VERSION, SITE_FEATURES } from '../../shared/protocol/features.ts';
import { TeacherStudentSchema } from '../../shared/plan/schema.ts';

const settings = (ts: string): TaskSettings => {
  const plan = parsePlan(['name: t', 'model: { architecture: med3d, patch: [16, 16, 16] }', 'local: { steps: 1 }', `teacherStudent: { enabled: true${ts} }`, ''].join('\n'));
  return taskSettingsForPlan(plan, 'fed-1', ['encoder.conv1.weight'], { teacherStudent: plan.teacherStudent });
};
const current = { protocolVersion: PROTOCOL_VERSION, features: new Set<string>(SITE_FEATURES) };
/** A protocol-2 site of the release before the check. */
const olderFeatures = SITE_FEATURES.filter((f) => f !== FEATURES.teacherModelCheck);
const older = { protocolVersion: 2, features: new Set<string>(olderFeatures) };
const olderDecode = { protocolVersion: 2, features: olderFeatures };

describe('compatibility: teacherStudent.modelMargin', () => {
  it('is refused outside [-1, 1] and defaults to -0.005 (the teacher must lead: no self-training right after a promotion)', () => {
    expect(() => settings(', modelMargin: -1.5')).toThrow(/modelMargin/);
    expect(settings(', modelMargin: -0.01').teacherStudent?.modelMargin).toBe(-0.01);
    expect(() => settings(', modelMargin: 2')).toThrow(/modelMargin/);
    expect(settings('').teacherStudent?.modelMargin).toBe(-0.005);
  });

  it('reaches a current site as given, and needs no feature (a site without the check is not refused the task)', () => {
    const s = settings(', modelMargin: 0.02');
    expect(featuresNeeded(s)).toEqual([]);
    const r = settingsForSite(s, current);
    if (!r.ok) throw new Error('expected the task');
    expect(r.settings.teacherStudent?.modelMargin).toBe(0.02);
    expect(decodeTaskSettings(JSON.stringify(r.settings)).settings.teacherStudent?.modelMargin).toBe(0.02);
  });

  it('is dropped for older sites, which would otherwise refuse the task for the unknown field', () => {
    const s = settings(', modelMargin: 0.02');
    // The previous release's teacherStudent schema (strict, without the field) refuses it as sent to a current site.
    const previousSchema = TeacherStudentSchema.omit({ modelMargin: true }).strict();
    expect(previousSchema.safeParse(s.teacherStudent).success).toBe(false);
    for (const site of [older, LEGACY_SITE]) {
      const r = settingsForSite(s, site);
      if (!r.ok) throw new Error('expected the task');
      expect(r.settings.teacherStudent).not.toHaveProperty('modelMargin');
      expect(r.settings.teacherStudent?.enabled).toBe(true);
      expect(previousSchema.safeParse(r.settings.teacherStudent).success).toBe(true);
    }
    const r = settingsForSite(s, older);
    if (!r.ok) throw new Error('expected the task');
    expect(decodeTaskSettings(JSON.stringify(r.settings), olderDecode).settings.teacherStudent?.minTeacherDice).toBe(0.5);
  });

  it('is announced by current sites', () => {
    expect(SITE_FEATURES).toContain(FEATURES.teacherModelCheck);
  });
});
