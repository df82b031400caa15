import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  centerCropPad,
  DatasetError,
  foregroundMask,
  loadMsdDataset,
  parseDatasetJson,
  type DatasetLogger,
} from '../../site-agent/data/msd-dataset.ts';
import { readNifti, shapeFromDims, writeNifti } from '../../site-agent/data/nifti.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-msd-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const size = [16, 24, 24] as const; // D, H, W
const site = join(tmp, 'siteA');
const siteShifted = join(tmp, 'siteB');

beforeAll(async () => {
  await writePhantomSite(site, { siteName: 'siteA', cases: 4, valCases: 2, size, seed: 21, intensityShift: 0 });
  // Same anatomy (same seed), different "scanner".
  await writePhantomSite(siteShifted, {
    siteName: 'siteA', cases: 4, valCases: 2, size, seed: 21, intensityShift: 300, intensityScale: 2.5,
  });
});

function captureLog(): DatasetLogger & { warns: object[]; debugs: object[] } {
  const warns: object[] = [];
  const debugs: object[] = [];
  return { warns, debugs, warn: (o) => void warns.push(o), debug: (o) => void debugs.push(o) };
}

function copySite(name: string): string {
  const dir = join(tmp, name);
  cpSync(site, dir, { recursive: true });
  return dir;
}

describe('loadMsdDataset', () => {
  it('loads a phantom site: counts, shapes, opaque ids, labels preserved', async () => {
    const ds = await loadMsdDataset(site, { patch: size });
    expect(ds.name).toBe('siteA');
    expect(ds.labels).toEqual(['background', 'lesion']);
    expect(ds.train.map((c) => c.id)).toEqual(['train-0', 'train-1', 'train-2', 'train-3']);
    expect(ds.val.map((c) => c.id)).toEqual(['val-0', 'val-1']);
    expect(ds.unlabelled).toBe(0);
    expect(ds.skipped).toEqual([]);
    for (const c of [...ds.train, ...ds.val]) {
      expect(c.shape).toEqual([16, 24, 24]);
      expect(c.image.length).toBe(16 * 24 * 24);
      expect(c.label!.length).toBe(16 * 24 * 24);
    }
    // Nothing path-like anywhere in a case.
    expect(JSON.stringify(ds.train.map((c) => ({ id: c.id, shape: c.shape })))).not.toMatch(/siteA_|nii|\//);

    const lbl = await readNifti(join(site, 'labelsTr', 'siteA_002.nii.gz'));
    expect(Array.from(ds.train[2].label!)).toEqual(Array.from(lbl.data));
    const vlbl = await readNifti(join(site, 'labelsTs', 'siteA_005.nii.gz'));
    expect(Array.from(ds.val[1].label!)).toEqual(Array.from(vlbl.data));
  });

  it('z-scores over the foreground (mean 0, std 1 there) and removes site intensity differences', async () => {
    const a = await loadMsdDataset(site, { patch: size });
    const b = await loadMsdDataset(siteShifted, { patch: size });
    for (let k = 0; k < a.train.length; k++) {
      const raw = await readNifti(join(site, 'imagesTr', `siteA_00${k}_0000.nii.gz`));
      const mask = foregroundMask(raw.data);
      let n = 0;
      let sum = 0;
      let ss = 0;
      for (let i = 0; i < mask.length; i++) {
        if (!mask[i]) continue;
        n++;
        sum += a.train[k].image[i];
        ss += a.train[k].image[i] ** 2;
      }
      expect(n).toBeGreaterThan(0.2 * mask.length);
      expect(n).toBeLessThan(0.8 * mask.length);
      const mean = sum / n;
      expect(Math.abs(mean)).toBeLessThan(1e-4);
      expect(Math.sqrt(ss / n - mean * mean)).toBeCloseTo(1, 4);
      // Lesions stay brighter than the rest after normalisation.
      let les = 0;
      let nl = 0;
      for (let i = 0; i < mask.length; i++) if (a.train[k].label![i]) (les += a.train[k].image[i]), nl++;
      expect(les / nl).toBeGreaterThan(0.5);
      // The shifted/scaled site normalises to the same values.
      let maxDiff = 0;
      for (let i = 0; i < mask.length; i++) maxDiff = Math.max(maxDiff, Math.abs(a.train[k].image[i] - b.train[k].image[i]));
      expect(maxDiff).toBeLessThan(1e-3);
    }
  });

  it('centre-crops and pads to the patch', async () => {
    const patch = [10, 30, 20] as const; // crop D and W, pad H
    const ds = await loadMsdDataset(site, { patch });
    const c = ds.train[0];
    expect(c.shape).toEqual([10, 30, 20]);
    const full = (await loadMsdDataset(site, { patch: size })).train[0];
    expect(c.label).toEqual(centerCropPad(full.label!, size, patch, 0));
    // (z, y, x) in the patch <-> (z + 3, y - 3, x + 2) in the source.
    const at = (img: Float32Array, s: readonly number[], z: number, y: number, x: number): number => img[(z * s[1] + y) * s[2] + x];
    expect(at(c.image, patch, 5, 10, 7)).toBe(at(full.image, size, 8, 7, 9));
    // Padded rows are background-like: far below the foreground mean.
    expect(at(c.image, patch, 5, 0, 7)).toBeLessThan(-1);
    expect(at(c.image, patch, 5, 29, 7)).toBe(at(c.image, patch, 5, 0, 7));
    expect(c.label![(5 * 30 + 0) * 20 + 7]).toBe(0);
  });

  it('skips a corrupt case with its reason and loads the rest; paths only at debug', async () => {
    const dir = copySite('corrupt');
    const img2 = join(dir, 'imagesTr', 'siteA_002_0000.nii.gz');
    truncateSync(img2, Math.floor(readFileSync(img2).length / 2));
    writeFileSync(join(dir, 'labelsTs', 'siteA_004.nii.gz'), 'not a label');
    const log = captureLog();
    const ds = await loadMsdDataset(dir, { patch: size, log });
    expect(ds.train.map((c) => c.id)).toEqual(['train-0', 'train-1', 'train-3']);
    expect(ds.val.map((c) => c.id)).toEqual(['val-1']);
    expect(ds.skipped).toHaveLength(2);
    expect(ds.skipped[0]).toMatchObject({ id: 'train-2', file: join('imagesTr', 'siteA_002_0000.nii.gz') });
    expect(ds.skipped[0].reason).toMatch(/^image: truncated: gzip stream ends early .* header says 9216 voxels of float32 but only \d+ bytes/);
    expect(ds.skipped[1]).toMatchObject({ id: 'val-0', file: join('labelsTs', 'siteA_004.nii.gz') });
    expect(ds.skipped[1].reason).toMatch(/^label: not a NIfTI file/);

    expect(log.warns).toEqual([
      { case: 'train-2', fault: ds.skipped[0].reason },
      { case: 'val-0', fault: ds.skipped[1].reason },
    ]);
    expect(JSON.stringify(log.warns)).not.toMatch(/siteA_|\.nii|corrupt\//);
    expect(JSON.stringify(log.debugs)).toContain('siteA_002_0000.nii.gz');
  });

  it('counts unlabelled images, ignores macOS resource forks, and refuses mismatched or non-integer labels', async () => {
    const dir = copySite('mixed');
    unlinkSync(join(dir, 'labelsTr', 'siteA_001.nii.gz'));
    writeFileSync(join(dir, 'imagesTr', '._siteA_000_0000.nii.gz'), 'AppleDouble');
    await writeNifti(join(dir, 'labelsTr', 'siteA_002.nii.gz'), {
      data: new Uint8Array(8 * 24 * 24), dims: [24, 24, 8], spacing: [1.5, 1.5, 1.5],
    });
    const half = new Float32Array(16 * 24 * 24).fill(0.5);
    await writeNifti(join(dir, 'labelsTr', 'siteA_003.nii.gz'), { data: half, dims: [24, 24, 16], spacing: [1.5, 1.5, 1.5] });
    const ds = await loadMsdDataset(dir, { patch: size });
    expect(ds.unlabelled).toBe(1);
    expect(ds.train.map((c) => c.id)).toEqual(['train-0']);
    expect(ds.skipped.map((s) => [s.id, s.reason])).toEqual([
      ['train-2', 'label grid 24x24x8 differs from image grid 24x24x16'],
      ['train-3', 'label: value 0.5 is not a class index 0..1'],
    ]);
  });

  it('refuses a dataset.json with a bad field, naming the field', async () => {
    const dir = copySite('badjson');
    const json = JSON.parse(readFileSync(join(dir, 'dataset.json'), 'utf8'));
    writeFileSync(join(dir, 'dataset.json'), JSON.stringify({ ...json, numTraining: 'four' }));
    await expect(loadMsdDataset(dir, { patch: size })).rejects.toThrow(/dataset\.json: field "numTraining": /);
    await expect(loadMsdDataset(join(tmp, 'nowhere'), { patch: size })).rejects.toThrow('dataset.json: cannot read (ENOENT)');
  });

  it('brings a case stored left-right mirrored (LAS) to the same canonical voxels', async () => {
    const dir = copySite('las');
    const [X, Y, Z] = [size[2], size[1], size[0]];
    for (const f of ['imagesTr/siteA_001_0000.nii.gz', 'labelsTr/siteA_001.nii.gz']) {
      const v = await readNifti(join(dir, f));
      const flipped = new Float32Array(v.data.length);
      for (let z = 0; z < Z; z++) for (let y = 0; y < Y; y++) for (let x = 0; x < X; x++) flipped[x + X * (y + Y * z)] = v.data[X - 1 - x + X * (y + Y * z)];
      const affine = v.affine.map((r) => [...r]);
      for (let r = 0; r < 3; r++) {
        affine[r][3] += (X - 1) * affine[r][0];
        affine[r][0] = -affine[r][0];
      }
      const data = f.startsWith('labels') ? Uint8Array.from(flipped) : flipped;
      await writeNifti(join(dir, f), { data, dims: v.dims, spacing: v.spacing, affine });
    }
    const [a, b] = await Promise.all([loadMsdDataset(site, { patch: size }), loadMsdDataset(dir, { patch: size })]);
    expect(b.train[1].label).toEqual(a.train[1].label);
    expect(b.train[1].image).toEqual(a.train[1].image);
  });
});

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
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, training: [{ image: './imagesTr/a.nii.gz' }] }))).toThrow(
      /field "training\.0\.label"/,
    );
    expect(() => parseDatasetJson(JSON.stringify({ ...ok, tensorImageSize: '5D' }))).toThrow(DatasetError);
  });

  it('maps NIfTI dims to the VolumeCase shape', () => {
    expect(shapeFromDims([24, 24, 16])).toEqual([16, 24, 24]);
  });
});
