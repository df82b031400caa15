/**
 * Every NIfTI fixture read by MedFL against what nibabel reads from the same bytes
 * (test/fixtures/nifti/expected.json, made by scripts/make_nifti_fixtures.py), as stored and after
 * bringing it to canonical RAS+.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readNifti } from '../../site-agent/data/nifti.ts';
import { axcodes, toCanonical } from '../../site-agent/data/orientation.ts';

const dir = join(import.meta.dirname, '..', 'fixtures', 'nifti');

interface Side {
  dims: number[];
  spacing: number[];
  affine: number[][];
  sum: number;
  wsum: number;
  samples: [number, number, number, number][];
}
interface Expected extends Side {
  version: 1 | 2;
  littleEndian: boolean;
  datatype: string;
  frame: number;
  affineSource: string;
  axcodes: string;
  canonical: Side;
}
const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as { files: Record<string, Expected> };

function sums(a: Float32Array): { sum: number; wsum: number } {
  let sum = 0;
  let wsum = 0;
  for (let i = 0; i < a.length; i++) {
    sum += a[i];
    wsum += a[i] * ((i % 7) + 1);
  }
  return { sum, wsum };
}

function close(actual: number, want: number, rel = 1e-6): void {
  expect(Math.abs(actual - want)).toBeLessThanOrEqual(rel * Math.max(1, Math.abs(want)));
}

function checkSide(v: { dims: readonly number[]; spacing: readonly number[]; affine: number[][]; data: Float32Array }, e: Side): void {
  expect([...v.dims]).toEqual(e.dims);
  e.spacing.forEach((s, i) => close(v.spacing[i], s, 1e-5));
  for (let r = 0; r < 4; r++) for (let c = 0; c < 4; c++) close(v.affine[r][c], e.affine[r][c], 1e-5);
  const s = sums(v.data);
  close(s.sum, e.sum);
  close(s.wsum, e.wsum);
  for (const [x, y, z, val] of e.samples) close(v.data[x + v.dims[0] * (y + v.dims[1] * z)], val);
}

describe('NIfTI fixtures agree with nibabel', () => {
  it('covers the formats the brief asks for', () => {
    const all = Object.values(expected.files);
    expect(new Set(all.map((e) => e.datatype))).toEqual(new Set(['int16', 'float32', 'uint8', 'int32', 'float64']));
    expect(all.some((e) => !e.littleEndian)).toBe(true);
    expect(all.some((e) => e.version === 2)).toBe(true);
    expect(all.some((e) => e.affineSource === 'qform')).toBe(true);
    expect(all.filter((e) => e.axcodes !== 'RAS').length).toBeGreaterThanOrEqual(4);
  });

  for (const [file, e] of Object.entries(expected.files)) {
    it(`${file} (${e.datatype}, ${e.littleEndian ? 'LE' : 'BE'}, NIfTI-${e.version}, ${e.axcodes}) as stored`, async () => {
      const v = await readNifti(join(dir, file), e.frame > 0 ? { frame: e.frame } : {});
      expect({ version: v.version, littleEndian: v.littleEndian, datatype: v.datatype, affineSource: v.affineSource }).toEqual({
        version: e.version, littleEndian: e.littleEndian, datatype: e.datatype, affineSource: e.affineSource,
      });
      expect(axcodes(v.affine)).toBe(e.axcodes);
      checkSide(v, e);
    });

    it(`${file} brought to RAS+ matches nibabel.as_closest_canonical`, async () => {
      const v = await readNifti(join(dir, file), e.frame > 0 ? { frame: e.frame } : {});
      const c = toCanonical(v);
      expect(c.sourceAxcodes).toBe(e.axcodes);
      expect(axcodes(c.affine)).toBe('RAS');
      checkSide(c, e.canonical);
    });
  }
});
