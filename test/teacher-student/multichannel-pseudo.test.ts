/**
 * Teacher–student with 4-channel scans: the teacher sees every channel of an unlabelled case (interleaved channels
 * last, also through the flip test-time augmentation), and the student's pseudo-labelled patches carry all four
 * channels, voxel for voxel, next to their targets.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { labelPool, PseudoPatches } from '../../site-agent/training/pseudo-label.ts';
import { SiteData } from '../../site-agent/data/site-data.ts';
import { TeacherStudentSchema } from '../../shared/plan/schema.ts';
import type { Trainer, VolumeCase } from '../../shared/model/types.ts';
import { mulberry32 } from '../../shared/util/random.ts';
import { writeMultiChannelSite } from '../helpers/multichannel-site.ts';

describe('teacher–student pseudo-labels from 4-channel scans', () => {
  it('labels with every channel and samples 4-channel patches that match the scan', async () => {
    const site = mkdtempSync(join(tmpdir(), 'medfl-mc-pseudo-'));
    await writeMultiChannelSite(site, { cases: 3, size: [16, 16, 16], seed: 4 });
    rmSync(join(site, 'labelsTr', 'mm_002.nii.gz')); // the unlabelled pool
    const data = await SiteData.open(site, { patch: [16, 16, 16] });
    expect(data.unlabelled).toHaveLength(1);
    const seen: { channels: number; values: number }[] = [];
    // A stand-in teacher: foreground where the T1gd channel (2) is brighter than FLAIR (0), confidently.
    const teacher = {
      architecture: { numClasses: 2 },
      async predictProbs(_w: unknown, vc: VolumeCase) {
        const C = vc.channels ?? 1;
        seen.push({ channels: C, values: vc.image.length });
        const n = vc.shape[0] * vc.shape[1] * vc.shape[2];
        const p = new Float32Array(n * 2);
        for (let v = 0; v < n; v++) {
          const fg = C === 4 && vc.image[v * C + 2] > vc.image[v * C];
          p[v * 2] = fg ? 0.02 : 0.98;
          p[v * 2 + 1] = fg ? 0.98 : 0.02;
        }
        return p;
      },
    } as unknown as Trainer;
    const ts = TeacherStudentSchema.parse({ enabled: true, confidence: 0.5, flipTTA: true });
    const dir = join(site, 'pseudo');
    const pool = await labelPool(teacher, new Map(), data, data.unlabelled, dir, { generation: 1, teacherHash: 'd'.repeat(64) }, ts, pino({ level: 'silent' }));
    expect(pool.cases).toHaveLength(1);
    expect(seen.length).toBeGreaterThan(0);
    for (const s of seen) expect(s).toEqual({ channels: 4, values: 16 ** 3 * 4 });
    expect(pool.stats.foregroundFraction).toBeGreaterThan(0);

    const ref = data.unlabelled[0];
    const patches = new PseudoPatches(pool, dir, data, new Map([[ref.id, ref]]), [16, 16, 16], { foregroundFraction: 0.5, augment: false });
    const [p] = await patches.sample(1, mulberry32(3));
    expect(p.channels).toBe(4);
    expect(p.image.length).toBe(16 ** 3 * 4);
    const c = (await data.load(ref))!;
    // Patch = whole volume, no mirroring: channel k of voxel v is the scan's channel k at v, and the target agrees.
    for (const v of [0, 1000, 2047, 4095]) {
      for (let k = 0; k < 4; k++) expect(p.image[v * 4 + k]).toBe(c.channels[k][v]);
      const fg = c.channels[2][v] > c.channels[0][v];
      expect(p.target![v * 2 + 1]).toBeCloseTo(fg ? 0.98 : 0.02, 5);
    }
  });
});
