import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeNifti } from '../../site-agent/data/nifti.ts';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import { patchToVolumeCase, SiteData, type DataLogger } from '../../site-agent/data/site-data.ts';
import { preparedBytes } from '../../site-agent/data/types.ts';
import { foregroundMask, normalizeMri } from '../../site-agent/data/normalize.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-sitedata-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

type V3 = [number, number, number];

/** A case on a [X, Y, Z] grid: image = 100 + 10·label + x, label = a box. */
function caseVolumes(dims: V3, box: [V3, V3]): { image: Float32Array; label: Uint8Array } {
  const [X, Y, Z] = dims;
  const image = new Float32Array(X * Y * Z);
  const label = new Uint8Array(X * Y * Z);
  for (let z = 0; z < Z; z++) for (let y = 0; y < Y; y++) for (let x = 0; x < X; x++) {
    const i = x + X * (y + Y * z);
    const inBox = x >= box[0][0] && x < box[1][0] && y >= box[0][1] && y < box[1][1] && z >= box[0][2] && z < box[1][2];
    label[i] = inBox ? 1 : 0;
    image[i] = 100 + 10 * label[i] + x;
  }
  return { image, label };
}

function datasetJson(dir: string, n: number, extra: Record<string, unknown> = {}): void {
  writeFileSync(join(dir, 'dataset.json'), JSON.stringify({
    name: 'gen', modality: { '0': 'MRI' }, labels: { '0': 'background', '1': 'lesion' }, numTraining: n, ...extra,
  }));
}

function captureLog(): DataLogger & { lines: { level: string; obj: object; msg?: string }[] } {
  const lines: { level: string; obj: object; msg?: string }[] = [];
  return {
    lines,
    debug: (obj, msg) => void lines.push({ level: 'debug', obj, msg }),
    info: (obj, msg) => void lines.push({ level: 'info', obj, msg }),
    warn: (obj, msg) => void lines.push({ level: 'warn', obj, msg }),
  };
}

describe('SiteData: 200 cases in bounded memory', () => {
  const dir = join(tmp, 'big');
  const dims: V3 = [12, 10, 8];
  beforeAll(async () => {
    mkdirSync(dir, { recursive: true });
    for (let i = 0; i < 200; i++) {
      const v = caseVolumes(dims, [[2 + (i % 5), 2, 1], [7 + (i % 5), 6, 5]]);
      const name = `pt${String(i).padStart(3, '0')}`;
      await writeNifti(join(dir, 'imagesTr', `${name}_0000.nii.gz`), { data: v.image, dims, spacing: [1, 1, 1] });
      await writeNifti(join(dir, 'labelsTr', `${name}.nii.gz`), { data: v.label, dims, spacing: [1, 1, 1] });
    }
    datasetJson(dir, 200);
  }, 60_000);

  it('never holds more than the cache budget while every case is used', async () => {
    const caseBytes = 12 * 10 * 8 * (4 + 1) + 5 * 4 * 4 * 4; // image + label + foreground indices
    const budget = 6 * caseBytes + 10;
    const data = await SiteData.open(dir, { patch: [4, 4, 4], cacheBytes: budget });
    expect(data.train.length).toBe(200);
    expect(data.cacheStats().bytes).toBe(0); // opening reads no voxels
    const first = await data.load(data.train[0]);
    expect(preparedBytes(first!)).toBe(caseBytes);
    for (const ref of data.train) expect(await data.load(ref)).toBeDefined();
    const rng = mulberry32(1);
    for (let k = 0; k < 30; k++) {
      const batch = await data.sampleBatch(undefined, 4, rng);
      expect(batch).toHaveLength(4);
    }
    const s = data.cacheStats();
    expect(s.peakBytes).toBeLessThanOrEqual(budget);
    expect(s.entries).toBeLessThanOrEqual(6);
    expect(s.misses).toBeGreaterThanOrEqual(200);
    expect(s.evictions).toBeGreaterThanOrEqual(s.misses - 6);
    expect(data.skipped()).toEqual([]);
  }, 60_000);

  it('batches are deterministic in the seed', async () => {
    const data = await SiteData.open(dir, { patch: [4, 4, 4], cacheBytes: 50_000 });
    const a = await data.sampleBatch(undefined, 3, mulberry32(42));
    const b = await data.sampleBatch(undefined, 3, mulberry32(42));
    expect(a.map((p) => [...p.image])).toEqual(b.map((p) => [...p.image]));
    const vc = patchToVolumeCase(a[0], 'b-0');
    expect(vc.shape).toEqual([4, 4, 4]);
    expect(vc.label).toBe(a[0].label);
  });
});

describe('SiteData preprocessing', () => {
  it('brings a flipped (LPS) copy of a case to the same canonical voxels as the RAS original', async () => {
    const dir = join(tmp, 'orient');
    const dims: V3 = [6, 5, 4];
    const v = caseVolumes(dims, [[1, 1, 1], [3, 4, 3]]);
    // Same anatomy stored with x and y reversed: voxel (x, y, z) of the LPS file is (5-x, 4-y, z) of the RAS one.
    const flipXY = <T extends Float32Array | Uint8Array>(a: T): T => {
      const out = a.slice() as T;
      for (let z = 0; z < 4; z++) for (let y = 0; y < 5; y++) for (let x = 0; x < 6; x++) out[x + 6 * (y + 5 * z)] = a[5 - x + 6 * (4 - y + 5 * z)];
      return out;
    };
    const ras = [[2, 0, 0, -10], [0, 3, 0, -20], [0, 0, 4, 5], [0, 0, 0, 1]];
    const lps = [[-2, 0, 0, -10 + 5 * 2], [0, -3, 0, -20 + 4 * 3], [0, 0, 4, 5], [0, 0, 0, 1]];
    await writeNifti(join(dir, 'imagesTr', 'a_0000.nii.gz'), { data: v.image, dims, spacing: [2, 3, 4], affine: ras });
    await writeNifti(join(dir, 'labelsTr', 'a.nii.gz'), { data: v.label, dims, spacing: [2, 3, 4], affine: ras });
    await writeNifti(join(dir, 'imagesTr', 'b_0000.nii.gz'), { data: flipXY(v.image), dims, spacing: [2, 3, 4], affine: lps });
    await writeNifti(join(dir, 'labelsTr', 'b.nii.gz'), { data: flipXY(v.label), dims, spacing: [2, 3, 4], affine: lps });
    datasetJson(dir, 2, { modality: { '0': 'CT' } });
    const data = await SiteData.open(dir, { patch: [4, 5, 6], normalization: 'none' });
    const [a, b] = [await data.load(data.train[0]), await data.load(data.train[1])];
    expect(a!.shape).toEqual([4, 5, 6]);
    expect(a!.spacing).toEqual([4, 3, 2]);
    expect(b!.channels[0]).toEqual(a!.channels[0]);
    expect(b!.label).toEqual(a!.label);
    // W runs left -> right: image = 100 + 10·label + x increases along W in the RAS case.
    expect(a!.channels[0][1] - a!.channels[0][0]).toBe(1);
  });

  it('resamples to the plan spacing and normalises per channel modality (CT window, MRI z-score)', async () => {
    const dir = join(tmp, 'multi');
    const dims: V3 = [10, 10, 5];
    const v = caseVolumes(dims, [[2, 2, 1], [8, 8, 4]]);
    const hu = v.image.map((x, i) => (v.label[i] ? 40 : -1000) + x);
    await writeNifti(join(dir, 'imagesTr', 'c_0000.nii.gz'), { data: hu, dims, spacing: [1, 1, 3] });
    await writeNifti(join(dir, 'imagesTr', 'c_0001.nii.gz'), { data: v.image, dims, spacing: [1, 1, 3] });
    await writeNifti(join(dir, 'labelsTr', 'c.nii.gz'), { data: v.label, dims, spacing: [1, 1, 3] });
    datasetJson(dir, 1, { modality: { '0': 'CT', '1': 'T2' } });
    const data = await SiteData.open(dir, { patch: [8, 8, 8], spacing: [1.5, 2, 2], ctWindow: [-100, 100] });
    expect(data.modalities).toEqual(['ct', 'mri']);
    const c = (await data.load(data.train[0]))!;
    expect(c.shape).toEqual([10, 5, 5]); // D: 5·3/1.5, H and W: 10·1/2
    expect(c.spacing).toEqual([1.5, 2, 2]);
    expect(c.channels).toHaveLength(2);
    expect(Math.min(...c.channels[0])).toBeGreaterThanOrEqual(0);
    expect(Math.max(...c.channels[0])).toBeLessThanOrEqual(1);
    // All voxels nonzero here: the statistics come from the threshold body mask, applied to every voxel.
    const mri = c.channels[1];
    expect(mri.some((x) => x === 0)).toBe(false);
    const { data: z, stats } = normalizeMri(v.image);
    const body = foregroundMask(v.image, 'auto');
    expect(stats.foregroundVoxels).toBe(body.reduce((a, b) => a + b, 0));
    expect(stats.foregroundVoxels).toBeLessThan(v.image.length);
    const bodyZ = z.filter((_, i) => body[i] === 1);
    expect(Math.abs(bodyZ.reduce((a, b) => a + b, 0) / bodyZ.length)).toBeLessThan(1e-4);
    expect(new Set(c.label)).toEqual(new Set([0, 1]));
    const batch = await data.sampleBatch(undefined, 2, mulberry32(3));
    expect(batch[0].channels).toBe(2);
    expect(batch[0].image.length).toBe(8 * 8 * 8 * 2);
  });

  it('sorts cases into train, validation and the unlabelled pool; reads classification labels from a CSV', async () => {
    const dir = join(tmp, 'splits');
    const dims: V3 = [4, 4, 4];
    const v = caseVolumes(dims, [[1, 1, 1], [3, 3, 3]]);
    for (const [sub, name, withLabel] of [['Tr', 'a', true], ['Tr', 'b', false], ['Tr', 'c', false], ['Ts', 'd', true], ['Ts', 'e', false]] as const) {
      await writeNifti(join(dir, `images${sub}`, `${name}_0000.nii.gz`), { data: v.image, dims, spacing: [1, 1, 1] });
      if (withLabel) await writeNifti(join(dir, `labels${sub}`, `${name}.nii.gz`), { data: v.label, dims, spacing: [1, 1, 1] });
    }
    datasetJson(dir, 3);
    writeFileSync(join(dir, 'classification.csv'), 'case,label\nc,1\n');
    const data = await SiteData.open(dir, { patch: [4, 4, 4] });
    expect(data.train.map((r) => [r.id, r.segmentation, r.classLabel])).toEqual([['train-0', true, undefined], ['train-1', false, 1]]);
    expect(data.val.map((r) => r.id)).toEqual(['val-0']);
    expect(data.unlabelled.map((r) => r.id)).toEqual(['pool-0', 'pool-1']);
    const pooled = await data.load(data.unlabelled[0]);
    expect(pooled!.label).toBeUndefined();
    const cls = await data.load(data.train[1]);
    expect(cls!.classLabel).toBe(1);
    expect(JSON.stringify([data.train, data.val, data.unlabelled])).not.toMatch(/"[a-e]"|nii/);
  });

  it('skips bad cases with a warning (id and fault only; paths at debug) and trains on the rest', async () => {
    const dir = join(tmp, 'bad');
    const dims: V3 = [6, 6, 6];
    const v = caseVolumes(dims, [[1, 1, 1], [4, 4, 4]]);
    for (const name of ['good1', 'good2', 'trunc', 'grid']) {
      await writeNifti(join(dir, 'imagesTr', `${name}_0000.nii.gz`), { data: v.image, dims, spacing: [1, 1, 1] });
      await writeNifti(join(dir, 'labelsTr', `${name}.nii.gz`), { data: v.label, dims, spacing: name === 'grid' ? [1, 1, 2] : [1, 1, 1] });
    }
    const { readFileSync } = await import('node:fs');
    const p = join(dir, 'imagesTr', 'trunc_0000.nii.gz');
    const whole = readFileSync(p);
    writeFileSync(p, whole.subarray(0, Math.floor(whole.length / 2)));
    datasetJson(dir, 4);
    const log = captureLog();
    const data = await SiteData.open(dir, { patch: [4, 4, 4], log });
    const batch = await data.sampleBatch(undefined, 12, mulberry32(9));
    expect(batch).toHaveLength(12);
    const skipped = data.skipped();
    expect(skipped.map((s) => s.id).sort()).toEqual(['train-2', 'train-3']); // sorted: good1, good2, grid, trunc
    expect(skipped.find((s) => s.id === 'train-3')!.reason).toMatch(/imagesTr\/trunc_0000\.nii\.gz: .*(truncated|gzip)/);
    expect(skipped.find((s) => s.id === 'train-2')!.reason).toMatch(/labelsTr\/grid\.nii\.gz: label spacing/);
    const warns = log.lines.filter((l) => l.level === 'warn');
    expect(warns).toHaveLength(2);
    for (const w of [...warns, ...log.lines.filter((l) => l.level === 'info')]) expect(JSON.stringify(w.obj)).not.toMatch(/trunc_|grid\.|good\d|\.nii|\//);
    expect(log.lines.some((l) => l.level === 'debug' && JSON.stringify(l.obj).includes('trunc_0000.nii.gz'))).toBe(true);
    // A second pass does not re-read or re-warn.
    await data.sampleBatch(undefined, 4, mulberry32(10));
    expect(log.lines.filter((l) => l.level === 'warn')).toHaveLength(2);
  });

  it('says clearly when no case is usable', async () => {
    const dir = join(tmp, 'allbad');
    mkdirSync(join(dir, 'imagesTr'), { recursive: true });
    mkdirSync(join(dir, 'labelsTr'), { recursive: true });
    writeFileSync(join(dir, 'imagesTr', 'x_0000.nii.gz'), 'not a nifti');
    writeFileSync(join(dir, 'labelsTr', 'x.nii.gz'), 'not a nifti');
    datasetJson(dir, 1);
    const data = await SiteData.open(dir, { patch: [4, 4, 4] });
    await expect(data.sampleBatch(undefined, 1, mulberry32(1))).rejects.toThrow(/no usable case.*check-data/);
  });
});
