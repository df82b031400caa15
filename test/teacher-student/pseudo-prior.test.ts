/**
 * Pseudo-label sanity against the site's labelled prior: a teacher that paints far more (or far less) foreground
 * than the site's labelled cases hold does not get to teach on that case.
 */
import { describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { labelPool, plausibleForeground } from '../../site-agent/training/pseudo-label.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import { SiteData } from '../../site-agent/data/site-data.ts';
import { TeacherStudentSchema } from '../../shared/plan/schema.ts';
import type { Trainer } from '../../shared/model/types.ts';

/** A stand-in teacher that calls a fixed share of every volume foreground (the first voxels), confidently. */
function fixedTeacher(foregroundShare: number): Trainer {
  return {
    architecture: { numClasses: 2 },
    async predictProbs(_w: unknown, vc: { shape: readonly number[] }) {
      const n = vc.shape[0] * vc.shape[1] * vc.shape[2];
      const p = new Float32Array(n * 2);
      for (let v = 0; v < n; v++) {
        const fg = v < foregroundShare * n;
        p[v * 2] = fg ? 0.02 : 0.98;
        p[v * 2 + 1] = fg ? 0.98 : 0.02;
      }
      return p;
    },
  } as unknown as Trainer;
}

describe('pseudo-label sanity against the labelled prior', () => {
  it('judges a foreground share by the factor, both ways, and not at all without a prior or with factor 0', () => {
    const prior = { foregroundFraction: 0.005, maxFactor: 4 };
    expect(plausibleForeground(0.005, prior)).toBe(true);
    expect(plausibleForeground(0.019, prior)).toBe(true);
    expect(plausibleForeground(0.03, prior)).toBe(false); // the 3-13 % teachers of the field report
    expect(plausibleForeground(0.001, prior)).toBe(false);
    expect(plausibleForeground(0.5, undefined)).toBe(true);
    expect(plausibleForeground(0.5, { ...prior, maxFactor: 0 })).toBe(true);
  });

  it('skips the cases of a teacher that over-segments, keeps those of one that agrees with the prior, and counts them', async () => {
    const site = mkdtempSync(join(tmpdir(), 'medfl-prior-'));
    await writePhantomSite(site, { siteName: 'prior', cases: 2, valCases: 0, size: [16, 16, 16], seed: 11, intensityShift: 0, intensityScale: 1 });
    await writePhantomPool(site, { siteName: 'prior', cases: 3, size: [16, 16, 16], seed: 11, intensityShift: 0, intensityScale: 1 });
    const data = await SiteData.open(site, { patch: [16, 16, 16] });
    const ts = TeacherStudentSchema.parse({ enabled: true, confidence: 0.5 });
    const log = pino({ level: 'silent' });
    const prior = { foregroundFraction: 0.01, maxFactor: 4 };
    const over = await labelPool(fixedTeacher(0.2), new Map(), data, data.unlabelled, join(site, 'pseudo-over'), { generation: 1, teacherHash: 'a'.repeat(64) }, ts, log, prior);
    expect(over.cases).toHaveLength(0);
    expect(over.stats.skippedByPrior).toBe(3);
    expect(existsSync(join(site, 'pseudo-over', `${data.unlabelled[0].id}.safetensors`))).toBe(false);
    const fine = await labelPool(fixedTeacher(0.012), new Map(), data, data.unlabelled, join(site, 'pseudo-fine'), { generation: 1, teacherHash: 'b'.repeat(64) }, ts, log, prior);
    expect(fine.cases).toHaveLength(3);
    expect(fine.stats.skippedByPrior).toBe(0);
    // Without a prior the over-segmenting teacher labels everything, as before.
    const unchecked = await labelPool(fixedTeacher(0.2), new Map(), data, data.unlabelled, join(site, 'pseudo-unchecked'), { generation: 1, teacherHash: 'c'.repeat(64) }, ts, log);
    expect(unchecked.cases).toHaveLength(3);
  }, 60_000);
});
