import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DatasetError, parseDatasetJson } from '../../site-agent/data/dataset-json.ts';
import { shapeFromDims } from '../../site-agent/data/nifti.ts';
import { foregroundMask } from '../../site-agent/data/normalize.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { SiteData } from '../../site-agent/data/site-data.ts';

describe('parseDatasetJson', () => {
  const ok = { name: 'x', modality: { '0': 'MRI' }, labels: { '0': 'background', '1': 'lesion' }, numTraining: 0, training: [] };

  it('accepts MSD and nnU-Net v2 forms', () => {
    expect(parseDatasetJson(JSON.stringify(ok)).numTraining).toBe(0);
    const v2 = { channel_names: { '0': 'T2' }, labels: { background: 0, lesion: 1 }, numTraining: 5, file_ending: '.nii.gz' };
    expect(parseDatasetJson(JSON.stringify(v2)).labels).toEqual({ background: 0, lesion: 1 });
  });

  it('names the offending field', () => {
    expect(() => parseDatasetJson('{')).toThrow(/dataset\.json: not valid JSON/);
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, labels: undefined }))).toThrow(/field "labels"/);
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, modality: undefined }))).toThrow(/field "modality": one of "modality"/);
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, training: [{ image: './imagesTr/a.nii.gz' }] }))).toThrow(/field "training\.0\.label"/);
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, tensorImageSize: '5D' }))).toThrow(DatasetError);
  });

  it('maps NIfTI dims to the VolumeCase shape', () => {
    expect(shapeFromDims([24, 24, 16])).toEqual([16, 24, 24]);
  });
});

describe('normalisation across scanners (the pipeline sites train from)', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'medfl-norm-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('z-scores over the body (mean 0, std 1 there), keeps lesions brighter, and removes site intensity differences', async () => {
    const size: [number, number, number] = [16, 16, 16];
    const a = join(tmp, 'a');
    const b = join(tmp, 'b');
    await writePhantomSite(a, { siteName: 'siteA', cases: 3, valCases: 1, size, seed: 21, intensityShift: 0 });
    // Same anatomy (same seed), different "scanner".
    await writePhantomSite(b, { siteName: 'siteA', cases: 3, valCases: 1, size, seed: 21, intensityShift: 300, intensityScale: 2.5 });
    const da = await SiteData.open(a, { patch: size });
    const db = await SiteData.open(b, { patch: size });
    for (let k = 0; k < da.train.length; k++) {
      const ca = (await da.load(da.train[k]))!;
      const cb = (await db.load(db.train[k]))!;
      const x = ca.channels[0];
      const mask = foregroundMask(x, 'auto');
      let n = 0;
      let sum = 0;
      let ss = 0;
      for (let i = 0; i < mask.length; i++) {
        if (!mask[i]) continue;
        n++;
        sum += x[i];
        ss += x[i] ** 2;
      }
      expect(n).toBeGreaterThan(0.2 * mask.length);
      expect(n).toBeLessThan(0.8 * mask.length);
      const mean = sum / n;
      expect(Math.abs(mean)).toBeLessThan(1e-3);
      expect(Math.sqrt(ss / n - mean * mean)).toBeCloseTo(1, 2);
      let les = 0;
      let nl = 0;
      for (let i = 0; i < x.length; i++) if (ca.label![i]) (les += x[i]), nl++;
      expect(les / nl).toBeGreaterThan(0.5);
      let maxDiff = 0;
      for (let i = 0; i < x.length; i++) maxDiff = Math.max(maxDiff, Math.abs(x[i] - cb.channels[0][i]));
      expect(maxDiff).toBeLessThan(1e-3);
    }
  });
});
