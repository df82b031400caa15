import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readNifti } from '../../site-agent/data/nifti.ts';
import { generatePhantomCase, TISSUE_INTENSITY, writePhantomSite } from '../../site-agent/data/phantom.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-phantom-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const size = [24, 32, 32] as const;

/** Split voxels into lesion / body tissue / air (air by a threshold well below the tissue). */
function regions(image: Float32Array, label: Uint8Array, shift = 0, scale = 1) {
  const lesion: number[] = [];
  const tissue: number[] = [];
  let air = 0;
  for (let i = 0; i < image.length; i++) {
    const v = (image[i] - shift) / scale;
    if (label[i]) lesion.push(v);
    else if (v > TISSUE_INTENSITY * 0.4) tissue.push(v);
    else air++;
  }
  const mean = (a: number[]): number => a.reduce((s, v) => s + v, 0) / a.length;
  return { lesion, tissue, air, lesionMean: mean(lesion), tissueMean: mean(tissue) };
}

describe('generatePhantomCase', () => {
  it('is deterministic in the seed', () => {
    const a = generatePhantomCase({ size, seed: 7, intensityShift: 0 });
    const b = generatePhantomCase({ size, seed: 7, intensityShift: 0 });
    const c = generatePhantomCase({ size, seed: 8, intensityShift: 0 });
    expect(a.image).toEqual(b.image);
    expect(a.label).toEqual(b.label);
    expect(c.image).not.toEqual(a.image);
    expect(c.label).not.toEqual(a.label);
    expect(a.image.length).toBe(24 * 32 * 32);
  });

  it('has 1–3 lesions, brighter than tissue by a clear but not trivial margin', () => {
    const counts = new Set<number>();
    for (let seed = 1; seed <= 12; seed++) {
      const p = generatePhantomCase({ size, seed, intensityShift: 0 });
      counts.add(p.lesions);
      const r = regions(p.image, p.label);
      expect(r.lesion.length).toBeGreaterThan(8);
      expect(r.tissue.length).toBeGreaterThan(r.lesion.length);
      expect(r.air).toBeGreaterThan(0.2 * p.image.length);
      const contrast = r.lesionMean / r.tissueMean - 1;
      expect(contrast).toBeGreaterThan(0.15);
      expect(contrast).toBeLessThan(0.6);
      // Not trivially separable: the brightest tissue voxels exceed the dimmest lesion voxels.
      expect(Math.max(...r.tissue)).toBeGreaterThan(Math.min(...r.lesion));
    }
    expect([...counts].sort()).toEqual([1, 2, 3]);
  });

  it('has a smooth bias field and noise (tissue is not flat)', () => {
    const p = generatePhantomCase({ size, seed: 3, intensityShift: 0, noise: 0 });
    const r = regions(p.image, p.label);
    const sd = Math.sqrt(r.tissue.reduce((s, v) => s + (v - r.tissueMean) ** 2, 0) / r.tissue.length);
    expect(sd / r.tissueMean).toBeGreaterThan(0.005); // bias alone
    const noisy = generatePhantomCase({ size, seed: 3, intensityShift: 0, noise: 0.1 });
    const rn = regions(noisy.image, noisy.label);
    const sdn = Math.sqrt(rn.tissue.reduce((s, v) => s + (v - rn.tissueMean) ** 2, 0) / rn.tissue.length);
    expect(sdn).toBeGreaterThan(sd + 5);
  });

  it('site shift and scale change intensities but not anatomy', () => {
    const base = generatePhantomCase({ size, seed: 11, intensityShift: 0 });
    const site = generatePhantomCase({ size, seed: 11, intensityShift: 40, intensityScale: 1.7 });
    expect(site.label).toEqual(base.label);
    for (const i of [0, 100, 5000, 12345, base.image.length - 1]) {
      expect(site.image[i]).toBeCloseTo(base.image[i] * 1.7 + 40, 3);
    }
    const r = regions(site.image, site.label, 40, 1.7);
    expect(r.lesionMean).toBeGreaterThan(r.tissueMean);
  });

  it('refuses sizes too small to hold a body', () => {
    expect(() => generatePhantomCase({ size: [2, 8, 8], seed: 1, intensityShift: 0 })).toThrow(/size/);
  });
});

describe('writePhantomSite', () => {
  it('writes an MSD / nnU-Net layout with dataset.json and NIfTI files', async () => {
    const dir = join(tmp, 'site-a');
    const res = await writePhantomSite(dir, { siteName: 'site-A', cases: 3, valCases: 2, size: [8, 12, 16], seed: 5, intensityShift: 20 });
    expect(res.trainCases).toEqual(['siteA_000', 'siteA_001', 'siteA_002']);
    expect(res.valCases).toEqual(['siteA_003', 'siteA_004']);
    const json = JSON.parse(readFileSync(join(dir, 'dataset.json'), 'utf8'));
    expect(json).toMatchObject({
      name: 'site-A',
      tensorImageSize: '3D',
      modality: { '0': 'MRI' },
      labels: { '0': 'background', '1': 'lesion' },
      numTraining: 3,
      numTest: 2,
    });
    expect(json.training[1]).toEqual({ image: './imagesTr/siteA_001.nii.gz', label: './labelsTr/siteA_001.nii.gz' });
    expect(json.test).toEqual(['./imagesTs/siteA_003.nii.gz', './imagesTs/siteA_004.nii.gz']);
    expect(readdirSync(join(dir, 'imagesTr')).sort()).toEqual(['siteA_000_0000.nii.gz', 'siteA_001_0000.nii.gz', 'siteA_002_0000.nii.gz']);
    expect(readdirSync(join(dir, 'labelsTs')).sort()).toEqual(['siteA_003.nii.gz', 'siteA_004.nii.gz']);

    const img = await readNifti(join(dir, 'imagesTr', 'siteA_000_0000.nii.gz'));
    const lbl = await readNifti(join(dir, 'labelsTr', 'siteA_000.nii.gz'));
    expect(img).toMatchObject({ dims: [16, 12, 8], spacing: [1.5, 1.5, 1.5], datatype: 'float32' });
    expect(lbl).toMatchObject({ dims: [16, 12, 8], datatype: 'uint8' });
    expect(lbl.data.some((v) => v === 1)).toBe(true);
  });
});
