/**
 * How much a NIfTI file may make the reader hold (issue 14, item 5c): inflating stops at what the header declares
 * (vox_offset + voxels × bytes per voxel), and a header, a file or a float32 volume larger than the cap
 * (ReadNiftiOptions.maxBytes / MEDFL_MAX_NIFTI_MB) is refused with a NiftiError that says so.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { DEFAULT_MAX_NIFTI_BYTES, encodeNifti, NiftiError, readNifti, type ReadNiftiOptions } from '../../site-agent/data/nifti.ts';
import { checkDataFolder } from '../../site-agent/data/check.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-nifti-limits-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const envBefore = process.env.MEDFL_MAX_NIFTI_MB;
afterEach(() => {
  if (envBefore === undefined) delete process.env.MEDFL_MAX_NIFTI_MB;
  else process.env.MEDFL_MAX_NIFTI_MB = envBefore;
});

const small = encodeNifti({ data: new Uint8Array(16 * 16 * 16).map((_, i) => i % 7), dims: [16, 16, 16], spacing: [1, 1, 1] });

/**
 * A well-formed 16³ uint8 scan followed by `mib` MiB of zeros, as concatenated gzip members (gunzip reads them
 * as one stream): ~1 KB of gzip per MiB inflated, the ratio of the 255 KB file that inflated to 256 MiB.
 */
function bomb(mib: number): Buffer {
  const zeros = gzipSync(Buffer.alloc(1024 * 1024), { level: 9 });
  return Buffer.concat([gzipSync(small), ...Array.from({ length: mib }, () => zeros)]);
}

async function errorOf(name: string, bytes: Uint8Array, options?: ReadNiftiOptions): Promise<NiftiError> {
  const path = join(tmp, name);
  writeFileSync(path, bytes);
  const e = await readNifti(path, options).then(() => undefined, (err: unknown) => err);
  expect(e, `${name} was read without error`).toBeInstanceOf(NiftiError);
  return e as NiftiError;
}

describe('NIfTI size limits', () => {
  it('stops inflating a .nii.gz at the size its header declares (255 KB of gzip that inflates to 256 MiB)', async () => {
    const gz = bomb(256);
    expect(gz.length).toBeLessThan(300 * 1024);
    const before = process.memoryUsage().arrayBuffers;
    const e = await errorOf('bomb.nii.gz', gz);
    expect(e.fault).toBe(
      `decompresses to more than the ${352 + 4096} bytes its header declares (4096 voxels of uint8 after a 352-byte header); inflating stopped there — the file is corrupt or was made to exhaust memory`,
    );
    // Nothing near the inflated size was held (the old reader allocated all 256 MiB, then decoded the scan).
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * 1024 * 1024);
  });

  it('still reads a scan with a few padding bytes after its data, and the same scan gzipped', async () => {
    const padded = Buffer.concat([small, Buffer.alloc(100)]);
    writeFileSync(join(tmp, 'padded.nii.gz'), gzipSync(padded));
    writeFileSync(join(tmp, 'padded.nii'), padded);
    for (const f of ['padded.nii.gz', 'padded.nii']) expect((await readNifti(join(tmp, f))).dims).toEqual([16, 16, 16]);
  });

  it('refuses a header that declares more than the cap, before inflating the data', async () => {
    const big = encodeNifti({ data: new Int16Array(64 * 64 * 64), dims: [64, 64, 64], spacing: [1, 1, 1] });
    const e = await errorOf('big.nii.gz', gzipSync(big), { maxBytes: 256 * 1024 });
    expect(e.fault).toBe(
      `header declares ${352 + 2 * 64 ** 3} bytes (dim [64, 64, 64] of int16, ${4 * 64 ** 3} bytes as float32), more than the 262144-byte limit on one scan (raise MEDFL_MAX_NIFTI_MB if the scan is genuine)`,
    );
    // Just above what it needs as float32, the same file reads.
    expect((await readNifti(join(tmp, 'big.nii.gz'), { maxBytes: 4 * 64 ** 3 })).dims).toEqual([64, 64, 64]);
  });

  it('refuses an uncompressed file larger than the cap without reading it, and a volume too large as float32', async () => {
    const u8 = encodeNifti({ data: new Uint8Array(64 * 64 * 64), dims: [64, 64, 64], spacing: [1, 1, 1] });
    expect((await errorOf('large.nii', u8, { maxBytes: 64 * 1024 })).fault).toBe(
      `file is ${u8.length} bytes, more than the 65536-byte limit on one scan (raise MEDFL_MAX_NIFTI_MB if the scan is genuine)`,
    );
    // On disk it fits; as float32 (4 bytes a voxel) it does not.
    expect((await errorOf('large.nii', u8, { maxBytes: 2 * u8.length })).fault).toMatch(/^header declares \d+ bytes \(dim \[64, 64, 64\] of uint8, 1048576 bytes as float32\), more than the/);
  });

  it('takes the cap from MEDFL_MAX_NIFTI_MB, and check-data reports the refusal as a problem of the case', async () => {
    expect(DEFAULT_MAX_NIFTI_BYTES).toBe(1024 ** 3);
    const big = encodeNifti({ data: new Float32Array(128 * 128 * 32), dims: [128, 128, 32], spacing: [1, 1, 1] });
    process.env.MEDFL_MAX_NIFTI_MB = '1';
    expect((await errorOf('env.nii.gz', gzipSync(big))).fault).toMatch(/more than the 1048576-byte limit on one scan/);

    const dir = join(tmp, 'site');
    await writePhantomSite(dir, { siteName: 'lim', cases: 2, valCases: 0, size: [16, 16, 16], seed: 1, intensityShift: 0 });
    // One case's image replaced by the bomb: that case is refused, the other stays usable.
    writeFileSync(join(dir, 'imagesTr', 'lim_000_0000.nii.gz'), bomb(64));
    delete process.env.MEDFL_MAX_NIFTI_MB;
    const report = await checkDataFolder(dir);
    expect(report.counts).toMatchObject({ train: 1, unusable: 1 });
    expect(report.problems.map((p) => p.fault)).toContainEqual(expect.stringMatching(/^decompresses to more than the 4448 bytes its header declares/));
  });

  it('refuses a nonsensical cap', async () => {
    process.env.MEDFL_MAX_NIFTI_MB = 'lots';
    await expect(readNifti(join(tmp, 'any.nii'))).rejects.toThrow(/MEDFL_MAX_NIFTI_MB must be a positive number of MiB, got "lots"/);
  });
});
