import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import * as nifti from 'nifti-reader-js';
import {
  decodeNifti,
  dimsFromShape,
  encodeNifti,
  NiftiError,
  readNifti,
  shapeFromDims,
  writeNifti,
} from '../../site-agent/data/nifti.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-nifti-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const fixture = (f: string): string => join(import.meta.dirname, '..', 'fixtures', 'nifti', f);

function ramp(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.sin(i * 0.37) * 1000 + i * 0.001 - 3.25;
  return a;
}

/** Parse a file with nifti-reader-js only, as an independent reader. */
function libRead(path: string): { header: nifti.NIFTI1 | nifti.NIFTI2; image: ArrayBuffer; all: ArrayBuffer } {
  let buf = readFileSync(path);
  if (nifti.isCompressed(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length) as ArrayBuffer)) buf = gunzipSync(buf);
  const all = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length) as ArrayBuffer;
  const header = nifti.readHeader(all);
  return { header, image: nifti.readImage(header, all), all };
}

/** Sum and position-weighted sum in float64: catches both value and ordering errors. */
function sums(a: Float32Array): { sum: number; wsum: number } {
  let sum = 0;
  let wsum = 0;
  for (let i = 0; i < a.length; i++) {
    sum += a[i];
    wsum += a[i] * ((i % 7) + 1);
  }
  return { sum, wsum };
}

describe('NIfTI writer -> nifti-reader-js', () => {
  const dims = [7, 5, 3] as const;
  const n = 7 * 5 * 3;

  for (const ext of ['.nii', '.nii.gz']) {
    it(`float32 ${ext} is read back exactly by nifti-reader-js`, async () => {
      const data = ramp(n);
      const path = join(tmp, `f32${ext}`);
      await writeNifti(path, { data, dims, spacing: [1.5, 0.75, 3] });
      const raw = readFileSync(path);
      expect(raw[0] === 0x1f && raw[1] === 0x8b).toBe(ext === '.nii.gz');
      const { header, image, all } = libRead(path);
      expect(all.byteLength).toBe(352 + 4 * n);
      expect(nifti.isNIFTI1(all)).toBe(true);
      expect(header.littleEndian).toBe(true);
      expect(header.dims.slice(0, 4)).toEqual([3, 7, 5, 3]);
      expect(header.datatypeCode).toBe(nifti.NIFTI1.TYPE_FLOAT32);
      expect(header.numBitsPerVoxel).toBe(32);
      expect(header.vox_offset).toBe(352);
      expect(header.pixDims.slice(1, 4)).toEqual([1.5, 0.75, 3]);
      expect(header.qform_code).toBe(1);
      expect(header.sform_code).toBe(1);
      expect(header.scl_slope).toBe(1);
      expect(header.affine).toEqual([
        [1.5, 0, 0, 0],
        [0, 0.75, 0, 0],
        [0, 0, 3, 0],
        [0, 0, 0, 1],
      ]);
      expect(new Float32Array(image)).toEqual(data);
    });

    it(`uint8 ${ext} round-trips through readNifti`, async () => {
      const data = new Uint8Array(n).map((_, i) => (i * 37) % 256);
      const path = join(tmp, `u8${ext}`);
      await writeNifti(path, { data, dims, spacing: [1, 1, 1] });
      const { header, image } = libRead(path);
      expect(header.datatypeCode).toBe(nifti.NIFTI1.TYPE_UINT8);
      expect(new Uint8Array(image)).toEqual(data);
      const vol = await readNifti(path);
      expect(vol.datatype).toBe('uint8');
      expect(vol.dims).toEqual([7, 5, 3]);
      expect(vol.data).toEqual(Float32Array.from(data));
    });
  }

  it('int16 and float32 round-trip through readNifti with spacing and affine', async () => {
    const i16 = new Int16Array(n).map((_, i) => (i % 2 ? -1 : 1) * i * 311);
    await writeNifti(join(tmp, 'i16.nii.gz'), { data: i16, dims, spacing: [2, 2, 5] });
    const v16 = await readNifti(join(tmp, 'i16.nii.gz'));
    expect(v16.datatype).toBe('int16');
    expect(v16.data).toEqual(Float32Array.from(i16));
    expect(v16.spacing).toEqual([2, 2, 5]);

    const f32 = ramp(n);
    await writeNifti(join(tmp, 'rt.nii'), { data: f32, dims, spacing: [1.5, 0.75, 3] });
    const v = await readNifti(join(tmp, 'rt.nii'));
    expect(v).toMatchObject({ version: 1, dims: [7, 5, 3], spacing: [1.5, 0.75, 3], datatype: 'float32', frames: 1 });
    expect(v.affineSource).toBe('sform');
    expect(v.data).toEqual(f32);
  });

  it('writes atomically: no temp files are left behind', async () => {
    const dir = join(tmp, 'atomic');
    await writeNifti(join(dir, 'a.nii.gz'), { data: new Uint8Array(8), dims: [2, 2, 2], spacing: [1, 1, 1] });
    expect(readdirSync(dir)).toEqual(['a.nii.gz']);
  });

  it('stores a rotated, left-handed affine as sform and an equivalent qform', () => {
    const c = Math.cos(0.3);
    const s = Math.sin(0.3);
    // Rotation about z, then x axis flipped (det < 0, like radiological storage), spacing 2 x 1 x 3.
    const affine = [
      [-2 * c, -1 * s, 0, 10],
      [-2 * s, 1 * c, 0, -20],
      [0, 0, 3, 5],
      [0, 0, 0, 1],
    ];
    const buf = encodeNifti({ data: new Float32Array(8), dims: [2, 2, 2], spacing: [2, 1, 3], affine });
    const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length) as ArrayBuffer;
    const header = nifti.readHeader(ab) as nifti.NIFTI1;
    const q = header.getQformMat();
    for (let r = 0; r < 3; r++) for (let k = 0; k < 4; k++) expect(q[r][k]).toBeCloseTo(affine[r][k], 5);
    // Our reader: the sform wins when sform_code > 0, even where it disagrees with the qform...
    expect(decodeNifti(buf, 'x.nii').affine[0][0]).toBeCloseTo(-2 * c, 6);
    const moved = Buffer.from(buf);
    moved.writeFloatLE(99, 280 + 3 * 4); // srow_x[3]
    expect(decodeNifti(moved, 'x.nii')).toMatchObject({ affineSource: 'sform' });
    expect(decodeNifti(moved, 'x.nii').affine[0][3]).toBe(99);
    // ...and with sform_code zeroed it falls back to the (equivalent) qform.
    const noSform = Buffer.from(buf);
    noSform.writeInt16LE(0, 254);
    const v = decodeNifti(noSform, 'x.nii');
    expect(v.affineSource).toBe('qform');
    for (let r = 0; r < 3; r++) for (let k = 0; k < 4; k++) expect(v.affine[r][k]).toBeCloseTo(affine[r][k], 5);
  });

  it('refuses inconsistent input', () => {
    expect(() => encodeNifti({ data: new Float32Array(7), dims: [2, 2, 2], spacing: [1, 1, 1] })).toThrow(/need 8/);
    expect(() => encodeNifti({ data: new Float32Array(8), dims: [2, 2, 2], spacing: [1, 0, 1] })).toThrow(/spacing/);
    expect(() =>
      encodeNifti({ data: new Float32Array(8), dims: [2, 2, 2], spacing: [1, 1, 1], affine: [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]] }),
    ).toThrow(/column 0/);
  });
});

describe('NIfTI reader', () => {
  it('maps NIfTI (x fastest) to VolumeCase [Z, Y, X] without moving data', async () => {
    const dims = [4, 3, 2] as const; // X, Y, Z
    const shape = shapeFromDims(dims);
    expect(shape).toEqual([2, 3, 4]);
    expect(dimsFromShape(shape)).toEqual([4, 3, 2]);
    const data = new Float32Array(24);
    const [x, y, z] = [3, 1, 1];
    data[x + dims[0] * (y + dims[1] * z)] = 42;
    await writeNifti(join(tmp, 'order.nii'), { data, dims, spacing: [1, 1, 1] });
    const v = await readNifti(join(tmp, 'order.nii'));
    const [, H, W] = shapeFromDims(v.dims);
    expect(v.data[(z * H + y) * W + x]).toBe(42);
  });

  it('applies scl_slope / scl_inter, and treats slope 0 as no scaling', () => {
    const data = new Int16Array([0, 1, 2, -3, 100, 7, 8, 9]);
    const buf = encodeNifti({ data, dims: [2, 2, 2], spacing: [1, 1, 1] });
    buf.writeFloatLE(0.5, 112);
    buf.writeFloatLE(-10, 116);
    expect(Array.from(decodeNifti(buf, 's.nii').data)).toEqual(Array.from(data, (v) => v * 0.5 - 10));
    buf.writeFloatLE(0, 112);
    expect(Array.from(decodeNifti(buf, 's.nii').data)).toEqual(Array.from(data));
    buf.writeFloatLE(Number.NaN, 112); // nibabel writes NaN for "unset"
    expect(Array.from(decodeNifti(buf, 's.nii').data)).toEqual(Array.from(data));
  });

  it('falls back to pixdim scaling when neither sform nor qform is set', () => {
    const buf = encodeNifti({ data: new Uint8Array(8), dims: [2, 2, 2], spacing: [0.5, 2, 4] });
    buf.writeInt16LE(0, 252);
    buf.writeInt16LE(0, 254);
    const v = decodeNifti(buf, 'm.nii');
    expect(v.affineSource).toBe('pixdim');
    expect(v.affine).toEqual([[0.5, 0, 0, 0], [0, 2, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]]);
  });

  it('reads a big-endian int16 file from nibabel (anatomical.nii)', async () => {
    const v = await readNifti(fixture('anatomical.nii'));
    expect(v).toMatchObject({ version: 1, littleEndian: false, datatype: 'int16', dims: [33, 41, 25], spacing: [2, 2, 2] });
    expect(v.affineSource).toBe('sform');
    expect(v.affine).toEqual([
      [-2, 0, 0, 32],
      [0, 2, 0, -40],
      [0, 0, 2, -16],
      [0, 0, 0, 1],
    ]);
    expect(sums(v.data)).toEqual({ sum: 284166082, wsum: 1137170975 });
    const at = (x: number, y: number, z: number): number => v.data[x + 33 * (y + 41 * z)];
    expect([at(0, 0, 0), at(1, 2, 3), at(32, 40, 24)]).toEqual([10712, 9798, 2971]);
  });

  it('reads a big-endian float32 file from nibabel (reoriented_anat_moved.nii)', async () => {
    const v = await readNifti(fixture('reoriented_anat_moved.nii'));
    expect(v).toMatchObject({ littleEndian: false, datatype: 'float32', dims: [21, 26, 22], spacing: [4, 4, 4] });
    const s = sums(v.data);
    expect(s.sum).toBeCloseTo(32739769.449157715, 3);
    expect(s.wsum).toBeCloseTo(132155933.7835083, 3);
    expect(Math.max(...v.data)).toBeCloseTo(21199.935546875, 6);
    expect(v.data.indexOf(Math.max(...v.data))).toBe(2511);
  });

  it('reads a gzipped uint8 file with only an sform (standard.nii.gz)', async () => {
    const v = await readNifti(fixture('standard.nii.gz'));
    expect(v).toMatchObject({ littleEndian: true, datatype: 'uint8', dims: [4, 5, 7], spacing: [1, 3, 2], affineSource: 'sform' });
    expect(sums(v.data)).toEqual({ sum: 7650, wsum: 33915 });
  });

  it('reads NIfTI-2 with an extension, one frame at a time (example_nifti2.nii.gz)', async () => {
    await expect(readNifti(fixture('example_nifti2.nii.gz'))).rejects.toThrow(
      /example_nifti2\.nii\.gz: is 4D \(dim = \[32, 20, 12, 2\]\) with 2 volumes/,
    );
    const v = await readNifti(fixture('example_nifti2.nii.gz'), { frame: 1 });
    expect(v).toMatchObject({ version: 2, datatype: 'int16', dims: [32, 20, 12], frames: 2 });
    expect(v.spacing[0]).toBeCloseTo(2, 6);
    expect(v.spacing[2]).toBeCloseTo(2.2, 5);
    expect(v.affineSource).toBe('sform');
    expect(v.affine[1][2]).toBeCloseTo(-0.35552823543548584, 12);
    expect(v.affine[0][3]).toBeCloseTo(117.8551025390625, 12);
    expect(sums(v.data)).toEqual({ sum: 3465054, wsum: 13858530 });
    const v0 = await readNifti(fixture('example_nifti2.nii.gz'), { frame: 0 });
    expect([v0.data[0], v.data[0]]).toEqual([424, 439]);
    await expect(readNifti(fixture('example_nifti2.nii.gz'), { frame: 2 })).rejects.toThrow(/frame 2 out of range/);
  });
});

describe('NIfTI errors name the file and the fault', () => {
  const dims = [32, 32, 32] as const;
  const good = encodeNifti({ data: ramp(32 * 32 * 32), dims, spacing: [1, 1, 1] });

  async function errorOf(name: string, bytes: Uint8Array): Promise<NiftiError> {
    const path = join(tmp, name);
    writeFileSync(path, bytes);
    try {
      await readNifti(path);
    } catch (e) {
      expect(e).toBeInstanceOf(NiftiError);
      return e as NiftiError;
    }
    throw new Error(`${name} was read without error`);
  }

  it('truncated .nii', async () => {
    const e = await errorOf('case_003_0000.nii', good.subarray(0, 352 + 1200));
    expect(e.message).toBe(
      'case_003_0000.nii: truncated: header says 32768 voxels of float32 but only 1200 bytes of data (need 131072)',
    );
    expect(e.file).toBe('case_003_0000.nii');
    expect(e.fault).not.toContain('case_003');
  });

  it('truncated .nii.gz (compressed stream cut short)', async () => {
    const gz = gzipSync(good);
    const e = await errorOf('case_003_0000.nii.gz', gz.subarray(0, Math.floor(gz.length / 2)));
    expect(e.message).toMatch(
      /^case_003_0000\.nii\.gz: truncated: gzip stream ends early \(.+\); header says 32768 voxels of float32 but only \d+ bytes of data/,
    );
  });

  it('gzip trailer missing or corrupt, data complete', async () => {
    const gz = gzipSync(good);
    const e = await errorOf('trailer.nii.gz', gz.subarray(0, gz.length - 4));
    expect(e.message).toMatch(/^trailer\.nii\.gz: corrupt gzip stream/);
    const bad = Buffer.from(gz);
    bad[bad.length - 6] ^= 0xff; // CRC32
    expect((await errorOf('crc.nii.gz', bad)).message).toMatch(/^crc\.nii\.gz: corrupt gzip stream \(incorrect data check\)/);
  });

  it('header cut short', async () => {
    const e = await errorOf('short.nii', good.subarray(0, 200));
    expect(e.message).toBe('short.nii: truncated: 200 bytes, shorter than the 348-byte NIfTI-1 header');
  });

  it('garbage, text and empty files', async () => {
    const garbage = Buffer.alloc(4096);
    for (let i = 0; i < garbage.length; i++) garbage[i] = (i * 7919 + 13) % 251;
    expect((await errorOf('garbage.nii', garbage)).message).toMatch(/^garbage\.nii: not a NIfTI file: sizeof_hdr is -?\d+ \(expected 348/);
    expect((await errorOf('notes.nii.gz', gzipSync('patient notes, not an image'))).message).toMatch(
      /^notes\.nii\.gz: not a NIfTI file: sizeof_hdr/,
    );
    expect((await errorOf('empty.nii', new Uint8Array(0))).message).toBe('empty.nii: not a NIfTI file: only 0 bytes');
    expect((await errorOf('fakegz.nii.gz', Buffer.from([0x1f, 0x8b, 1, 2, 3]))).message).toMatch(/^fakegz\.nii\.gz: corrupt gzip stream/);
  });

  it('bad magic, hdr/img pairs, bad datatype and dims', async () => {
    const noMagic = Buffer.from(good);
    noMagic.write('xyz', 344, 'latin1');
    expect((await errorOf('magic.nii', noMagic)).message).toMatch(/^magic\.nii: bad magic "xyz" at byte 344/);
    const pair = Buffer.from(good);
    pair.write('ni1', 344, 'latin1');
    expect((await errorOf('pair.nii', pair)).message).toMatch(/^pair\.nii: is the header of a \.hdr\/\.img pair/);
    const rgb = Buffer.from(good);
    rgb.writeInt16LE(128, 70);
    expect((await errorOf('rgb.nii', rgb)).message).toBe('rgb.nii: unsupported datatype rgb24 (code 128)');
    const zeroDim = Buffer.from(good);
    zeroDim.writeInt16LE(0, 44);
    expect((await errorOf('dim.nii', zeroDim)).message).toBe('dim.nii: invalid dim[2]=0 (sizes must be >= 1)');
  });

  it('missing file', async () => {
    await expect(readNifti(join(tmp, 'nope.nii.gz'))).rejects.toThrow('nope.nii.gz: cannot read file (ENOENT)');
  });
});
