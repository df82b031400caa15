import { cpSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatCheckReport, runCheckData } from '../../cli/check-data.ts';
import { checkDataFolder } from '../../site-agent/data/check.ts';
import { writeNifti } from '../../site-agent/data/nifti.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-check-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const good = join(tmp, 'good');
const dims = [10, 9, 8] as const;

beforeAll(async () => {
  const n = dims[0] * dims[1] * dims[2];
  const label = Uint8Array.from({ length: n }, (_, i) => (i % 13 === 0 ? 1 : 0));
  const image = Float32Array.from({ length: n }, (_, i) => 50 + (i % 17));
  for (const name of ['p1', 'p2', 'p3']) {
    await writeNifti(join(good, 'imagesTr', `${name}_0000.nii.gz`), { data: image, dims, spacing: [0.8, 0.8, 2.5] });
    await writeNifti(join(good, 'imagesTr', `${name}_0001.nii.gz`), { data: image, dims, spacing: [0.8, 0.8, 2.5] });
    await writeNifti(join(good, 'labelsTr', `${name}.nii.gz`), { data: label, dims, spacing: [0.8, 0.8, 2.5] });
  }
  await writeNifti(join(good, 'imagesTr', 'u1_0000.nii.gz'), { data: image, dims, spacing: [0.8, 0.8, 2.5] });
  await writeNifti(join(good, 'imagesTr', 'u1_0001.nii.gz'), { data: image, dims, spacing: [0.8, 0.8, 2.5] });
  writeFileSync(join(good, 'dataset.json'), JSON.stringify({
    name: 'checkme', modality: { '0': 'T1', '1': 'FLAIR' }, labels: { '0': 'background', '1': 'tumour' }, numTraining: 4,
  }));
});

function copy(name: string): string {
  const dir = join(tmp, name);
  cpSync(good, dir, { recursive: true });
  return dir;
}

async function run(dir: string): Promise<{ code: number; text: string }> {
  let text = '';
  const code = await runCheckData(dir, (s) => void (text += s));
  return { code, text };
}

describe('medfl site check-data', () => {
  it('a good folder: table with shapes, spacings, channels, label values; unlabelled counted; exit 0', async () => {
    const r = await checkDataFolder(good);
    expect(r.counts).toEqual({ train: 3, val: 0, unlabelled: 1, unusable: 0 });
    expect(r.rows[0]).toMatchObject({ case: 'p1', split: 'train', channels: 2, dims: [10, 9, 8], axcodes: 'RAS', datatype: 'float32', labelValues: [0, 1], usable: true });
    expect(r.rows[0].spacing![2]).toBeCloseTo(2.5, 6);
    expect(r.rows.find((x) => x.case === 'u1')!.split).toBe('pool');
    const { code, text } = await run(good);
    expect(code).toBe(0);
    expect(text).toMatch(/10 × 9 × 8/);
    expect(text).toMatch(/0\.8 × 0\.8 × 2\.5/);
    expect(text).toMatch(/2\/2/);
    expect(text).toMatch(/usable: 3 training, 0 validation, 1 unlabelled/);
    expect(text).toMatch(/no problems found/);
  });

  it('reports every fault with its file: truncated gzip, wrong grid, unknown labels, missing channel; exit 1', async () => {
    const dir = copy('bad');
    const trunc = join(dir, 'imagesTr', 'p1_0000.nii.gz');
    const whole = readFileSync(trunc);
    writeFileSync(trunc, whole.subarray(0, Math.floor(whole.length * 0.6)));
    const n = dims[0] * dims[1] * dims[2];
    await writeNifti(join(dir, 'labelsTr', 'p2.nii.gz'), { data: new Uint8Array(9 * 9 * 8), dims: [9, 9, 8], spacing: [0.8, 0.8, 2.5] });
    await writeNifti(join(dir, 'labelsTr', 'p3.nii.gz'), { data: Uint8Array.from({ length: n }, (_, i) => (i === 5 ? 7 : i === 6 ? 3 : 0)), dims, spacing: [0.8, 0.8, 2.5] });
    unlinkSync(join(dir, 'imagesTr', 'u1_0001.nii.gz'));

    const { code, text } = await run(dir);
    expect(code).toBe(1);
    expect(text).toMatch(/imagesTr\/p1_0000\.nii\.gz: (truncated|corrupt gzip)/);
    expect(text).toMatch(/labelsTr\/p2\.nii\.gz: label grid 9x9x8 differs from the image grid 10x9x8/);
    expect(text).toMatch(/labelsTr\/p3\.nii\.gz: unknown label value\(s\) 3, 7 \(dataset\.json has classes 0\.\.1\)/);
    expect(text).toMatch(/imagesTr\/u1: missing channel file\(s\) _0001 \(dataset has 2 channels\)/);
    expect(text).toMatch(/unusable: 4 of 4/);
    const r = await checkDataFolder(dir);
    expect(r.rows.map((x) => x.usable)).toEqual([false, false, false, false]);
    expect(r.rows.find((x) => x.case === 'p3')!.labelValues).toEqual([0, 3, 7]);
    expect(formatCheckReport(r)).toContain('NO');
  });

  it('a missing or invalid dataset.json is one clear line and exit 1', async () => {
    const dir = copy('nojson');
    unlinkSync(join(dir, 'dataset.json'));
    const a = await run(dir);
    expect(a).toEqual({ code: 1, text: 'error: dataset.json: cannot read (ENOENT)\n' });
    writeFileSync(join(dir, 'dataset.json'), '{"labels": {"0": "bg"}}');
    const b = await run(dir);
    expect(b.code).toBe(1);
    expect(b.text).toMatch(/field "numTraining"/);
  });

  it('warnings (count mismatch, label without image, bad CSV line) are listed but do not fail', async () => {
    const dir = copy('warn');
    const j = JSON.parse(readFileSync(join(dir, 'dataset.json'), 'utf8'));
    writeFileSync(join(dir, 'dataset.json'), JSON.stringify({ ...j, numTraining: 9 }));
    cpSync(join(dir, 'labelsTr', 'p1.nii.gz'), join(dir, 'labelsTr', 'orphan.nii.gz'));
    const { code, text } = await run(dir);
    expect(code).toBe(0);
    expect(text).toMatch(/warnings \(2\)/);
    expect(text).toMatch(/numTraining is 9 but imagesTr holds 4/);
    expect(text).toMatch(/labelsTr\/orphan\.nii\.gz: label without an image/);
  });

  it('is wired into the medfl command (exit code and output)', () => {
    const bin = join(import.meta.dirname, '..', '..', 'bin', 'medfl.js');
    const out = execFileSync(process.execPath, [bin, 'site', 'check-data', good], { encoding: 'utf8' });
    expect(out).toMatch(/dataset 'checkme'/);
    const bad = copy('cli-bad');
    unlinkSync(join(bad, 'imagesTr', 'p2_0001.nii.gz'));
    let status = 0;
    try {
      execFileSync(process.execPath, [bin, 'site', 'check-data', bad], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      status = (e as { status: number }).status;
    }
    expect(status).toBe(1);
  }, 30_000);
});
