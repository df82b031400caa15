/**
 * NIfTI-1 / NIfTI-2 reading (via nifti-reader-js for the header fields) and a small NIfTI-1 writer.
 *
 * Axis mapping (read this before indexing):
 *   NIfTI stores voxels with x fastest, then y, then z: offset = x + X*(y + Y*z), dims = [X, Y, Z].
 *   MedFL's VolumeCase is D*H*W with index (z*H + y)*W + x, shape [D, H, W] = [Z, Y, X].
 *   Both are the same memory order, so `data` is used as-is; only the shape tuple is reversed
 *   (see shapeFromDims / dimsFromShape). No transposition, no reorientation to RAS is done here.
 *
 * Errors are NiftiError: the message is "<file name>: <fault>", and `fault` alone is available so that
 * callers can log the fault without the file name (paths are patient-identifying at some sites).
 */
import { kMaxLength } from 'node:buffer';
import { readFile, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { promisify } from 'node:util';
import { constants as zc, createGunzip, gunzip, gunzipSync, gzip } from 'node:zlib';
import { readHeader, NIFTI1, NIFTI2 } from 'nifti-reader-js';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';

const gunzipAsync = promisify(gunzip);
const gzipAsync = promisify(gzip);

export type NiftiDatatype =
  | 'uint8' | 'int8' | 'int16' | 'uint16' | 'int32' | 'uint32' | 'int64' | 'uint64' | 'float32' | 'float64';

export interface NiftiVolume {
  readonly version: 1 | 2;
  /** [X, Y, Z] in NIfTI order (x fastest in `data`). */
  readonly dims: readonly [number, number, number];
  /** Voxel size in header units (usually mm), |pixdim[1..3]|; a missing/invalid pixdim reads as 1. */
  readonly spacing: readonly [number, number, number];
  /** Datatype stored on disk; `data` is always float32. */
  readonly datatype: NiftiDatatype;
  readonly littleEndian: boolean;
  /** Voxel values with scl_slope/scl_inter applied, x fastest. */
  readonly data: Float32Array;
  /** 4x4 voxel (i,j,k) -> world (x,y,z) matrix, rows. */
  readonly affine: number[][];
  readonly affineSource: 'sform' | 'qform' | 'pixdim';
  /** Number of 3D volumes in the file (product of dim[4..]); `data` holds one of them. */
  readonly frames: number;
}

export interface ReadNiftiOptions {
  /** Which 3D volume of a 4D+ file to read. Without it a file with more than one volume is an error. */
  readonly frame?: number;
  /**
   * Most bytes one file may take: on disk, inflated (header + data), and as the float32 volume it decodes to.
   * Default: MEDFL_MAX_NIFTI_MB (MiB) when set, else DEFAULT_MAX_NIFTI_BYTES.
   */
  readonly maxBytes?: number;
}

/** 1 GiB: a 512×512×1000 int16 CT fits, inflated and as float32. */
export const DEFAULT_MAX_NIFTI_BYTES = 1024 ** 3;
/** Bytes past the declared data still inflated, for writers that pad the end of the file. */
const TRAILING_SLACK_BYTES = 64 * 1024;
/** Inflated before anything else: enough for a NIfTI-2 header and its extension flag. */
const HEAD_BYTES = 544;

/** The cap on one file: the option, else MEDFL_MAX_NIFTI_MB, else the default. */
export function maxNiftiBytes(options: ReadNiftiOptions = {}): number {
  const env = process.env.MEDFL_MAX_NIFTI_MB;
  const v = options.maxBytes ?? (env !== undefined && env.trim() !== '' ? Number(env) * 1024 * 1024 : DEFAULT_MAX_NIFTI_BYTES);
  if (!(Number.isSafeInteger(v) && v > 0)) {
    throw new RangeError(options.maxBytes !== undefined ? `maxBytes must be a positive integer, got ${v}` : `MEDFL_MAX_NIFTI_MB must be a positive number of MiB, got ${JSON.stringify(env)}`);
  }
  return v;
}

export class NiftiError extends Error {
  /** File name (basename) the fault was found in. */
  readonly file: string;
  /** What is wrong, without the file name. */
  readonly fault: string;
  constructor(file: string, fault: string, options?: { cause?: unknown }) {
    super(`${file}: ${fault}`, options);
    this.name = 'NiftiError';
    this.file = file;
    this.fault = fault;
  }
}

/** NIfTI dims [X, Y, Z] -> VolumeCase shape [D, H, W] = [Z, Y, X] (same memory order). */
export function shapeFromDims(dims: readonly [number, number, number]): [number, number, number] {
  return [dims[2], dims[1], dims[0]];
}

/** VolumeCase shape [D, H, W] -> NIfTI dims [X, Y, Z] = [W, H, D]. */
export function dimsFromShape(shape: readonly [number, number, number]): [number, number, number] {
  return [shape[2], shape[1], shape[0]];
}

interface DtypeInfo {
  readonly name: NiftiDatatype;
  readonly bytes: number;
  readonly get: (dv: DataView, off: number, le: boolean) => number;
}

const DTYPES: ReadonlyMap<number, DtypeInfo> = new Map<number, DtypeInfo>([
  [2, { name: 'uint8', bytes: 1, get: (dv, o) => dv.getUint8(o) }],
  [256, { name: 'int8', bytes: 1, get: (dv, o) => dv.getInt8(o) }],
  [4, { name: 'int16', bytes: 2, get: (dv, o, le) => dv.getInt16(o, le) }],
  [512, { name: 'uint16', bytes: 2, get: (dv, o, le) => dv.getUint16(o, le) }],
  [8, { name: 'int32', bytes: 4, get: (dv, o, le) => dv.getInt32(o, le) }],
  [768, { name: 'uint32', bytes: 4, get: (dv, o, le) => dv.getUint32(o, le) }],
  [1024, { name: 'int64', bytes: 8, get: (dv, o, le) => Number(dv.getBigInt64(o, le)) }],
  [1280, { name: 'uint64', bytes: 8, get: (dv, o, le) => Number(dv.getBigUint64(o, le)) }],
  [16, { name: 'float32', bytes: 4, get: (dv, o, le) => dv.getFloat32(o, le) }],
  [64, { name: 'float64', bytes: 8, get: (dv, o, le) => dv.getFloat64(o, le) }],
]);

const UNSUPPORTED_DTYPES: Readonly<Record<number, string>> = {
  1: 'binary (1 bit)', 32: 'complex64', 128: 'rgb24', 1536: 'float128', 1792: 'complex128', 2048: 'complex256', 2304: 'rgba32',
};

/** Read a .nii or .nii.gz file (gzip detected by content, not by name). */
export async function readNifti(path: string, options: ReadNiftiOptions = {}): Promise<NiftiVolume> {
  const name = basename(path);
  const maxBytes = maxNiftiBytes(options);
  let raw: Buffer;
  try {
    const size = (await stat(path)).size;
    if (size > maxBytes) throw new NiftiError(name, `file is ${size} bytes, more than the ${maxBytes}-byte limit on one scan (${LIMIT_HINT})`);
    raw = await readFile(path);
  } catch (e) {
    if (e instanceof NiftiError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    throw new NiftiError(name, `cannot read file (${code ?? (e as Error).message})`, { cause: e });
  }
  let bytes: Uint8Array = raw;
  let gzipFault: string | undefined;
  if (isGzip(raw)) ({ bytes, gzipFault } = await gunzipBounded(raw, name, options, maxBytes));
  return decodeNifti(bytes, name, { ...options, maxBytes }, gzipFault);
}

const LIMIT_HINT = 'raise MEDFL_MAX_NIFTI_MB if the scan is genuine';

/**
 * Inflates a .nii.gz no further than its header allows: the first bytes are inflated on their own, the header's
 * size (vox_offset + voxels × bytes per voxel × volumes) is checked against `maxBytes`, and the rest is inflated
 * with zlib's maxOutputLength set to that size (+ a little slack), so a stream that inflates beyond what its
 * header declares (a "zip bomb": 255 KB of gzip made 256 MiB) stops at that size with an error.
 */
async function gunzipBounded(raw: Buffer, name: string, options: ReadNiftiOptions, maxBytes: number): Promise<{ bytes: Uint8Array; gzipFault?: string }> {
  const head = await inflateHead(raw, HEAD_BYTES);
  // The stream broke within its first bytes: nothing large can come of it; the lenient path names the fault.
  if (head.fault !== undefined) return gunzipLenient(raw, name, 4 * HEAD_BYTES);
  // The whole file was smaller than that, and its gzip trailer checked out.
  if (head.complete) return { bytes: head.bytes };
  let layout: NiftiLayout;
  try {
    layout = niftiLayout(head.bytes, name, options);
  } catch {
    // Not a header we can read: decoding these first bytes fails exactly as decoding the whole file would.
    return { bytes: head.bytes };
  }
  const declared = layout.voxOffset + layout.frameBytes * layout.frames;
  checkDeclaredSize(layout, name, maxBytes);
  const what = `${layout.nvox * layout.frames} voxels of ${layout.dt.name} after a ${layout.voxOffset}-byte header`;
  return gunzipLenient(raw, name, declared + TRAILING_SLACK_BYTES, `decompresses to more than the ${declared} bytes its header declares (${what}); inflating stopped there — the file is corrupt or was made to exhaust memory`);
}

/** Refuses a header whose data (inflated) or decoded float32 volume would exceed `maxBytes`. */
function checkDeclaredSize(l: NiftiLayout, name: string, maxBytes: number): void {
  const declared = l.voxOffset + l.frameBytes * l.frames;
  const decoded = l.nvox * 4;
  if (declared <= maxBytes && decoded <= maxBytes) return;
  const shape = `dim [${l.all.join(', ')}] of ${l.dt.name}`;
  throw new NiftiError(name, `header declares ${declared} bytes (${shape}, ${decoded} bytes as float32), more than the ${maxBytes}-byte limit on one scan (${LIMIT_HINT})`);
}

/**
 * The first `n` inflated bytes of a gzip stream, without inflating the rest. `complete`: the stream ended (with a
 * valid trailer) within them; `fault`: it failed before `n` bytes came out.
 */
function inflateHead(raw: Buffer, n: number): Promise<{ bytes: Buffer; complete: boolean; fault?: string }> {
  return new Promise((resolve) => {
    const z = createGunzip();
    const parts: Buffer[] = [];
    let got = 0;
    let settled = false;
    const settle = (complete: boolean, fault?: string) => {
      if (settled) return;
      settled = true;
      z.destroy();
      resolve({ bytes: Buffer.concat(parts, got), complete, ...(fault !== undefined ? { fault } : {}) });
    };
    z.on('data', (c: Buffer) => {
      parts.push(c);
      got += c.length;
      if (got >= n) settle(false);
    });
    z.on('end', () => settle(true));
    z.on('error', (e: Error) => settle(false, e.message));
    z.end(raw);
  });
}

function isGzip(b: Uint8Array): boolean {
  return b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b;
}

/**
 * Decompress; if the stream is cut short, recover what there is so the error can say how much data the
 * header promised versus how much arrived (more useful than zlib's bare "unexpected end of file").
 */
async function gunzipLenient(raw: Buffer, name: string, maxOutputLength: number, tooLarge = `decompresses to more than ${maxOutputLength} bytes`): Promise<{ bytes: Uint8Array; gzipFault?: string }> {
  const over = (e: unknown): boolean => (e as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE';
  maxOutputLength = Math.min(maxOutputLength, kMaxLength); // zlib refuses a larger option outright
  try {
    return { bytes: await gunzipAsync(raw, { maxOutputLength }) };
  } catch (e) {
    if (over(e)) throw new NiftiError(name, tooLarge, { cause: e });
    const msg = (e as Error).message;
    let partial: Buffer;
    try {
      partial = gunzipSync(raw, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength });
    } catch (e2) {
      if (over(e2)) throw new NiftiError(name, tooLarge, { cause: e2 });
      throw new NiftiError(name, `corrupt gzip stream (${msg})`, { cause: e });
    }
    return { bytes: partial, gzipFault: msg };
  }
}

/** What the header says about the data: where it starts, its type and size. Checks only the header. */
interface NiftiLayout {
  readonly version: 1 | 2;
  readonly le: boolean;
  readonly hdrSize: number;
  /** Every dim[1..dim[0]]. */
  readonly all: readonly number[];
  readonly dims: [number, number, number];
  readonly frames: number;
  readonly frame: number;
  readonly dt: DtypeInfo;
  readonly voxOffset: number;
  /** Voxels in one 3D volume, and its bytes on disk. */
  readonly nvox: number;
  readonly frameBytes: number;
}

/** Reads and checks the header fields that place the data; throws NiftiError naming the first bad one. */
function niftiLayout(bytes: Uint8Array, name: string, options: ReadNiftiOptions, gzipFault?: string): NiftiLayout {
  const fail = (fault: string): never => {
    throw new NiftiError(name, fault);
  };
  if (bytes.length < 4) fail(`not a NIfTI file: only ${bytes.length} bytes`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

  // Version and byte order from sizeof_hdr, before trusting anything else.
  let version: 1 | 2;
  let le: boolean;
  const sLe = dv.getInt32(0, true);
  const sBe = dv.getInt32(0, false);
  if (sLe === 348 || sBe === 348) [version, le] = [1, sLe === 348];
  else if (sLe === 540 || sBe === 540) [version, le] = [2, sLe === 540];
  else return fail(`not a NIfTI file: sizeof_hdr is ${sLe} (expected 348 for NIfTI-1 or 540 for NIfTI-2)`);
  const hdrSize = version === 1 ? 348 : 540;
  if (bytes.length < hdrSize) {
    fail(`truncated: ${bytes.length} bytes, shorter than the ${hdrSize}-byte NIfTI-${version} header` +
      (gzipFault ? ` (gzip: ${gzipFault})` : ''));
  }

  const magicAt = version === 1 ? 344 : 4;
  const magic = Buffer.from(bytes.subarray(magicAt, magicAt + 3)).toString('latin1');
  if (magic === `ni${version}`) fail('is the header of a .hdr/.img pair; only single-file .nii / .nii.gz is supported');
  if (magic !== `n+${version}`) {
    fail(`bad magic ${JSON.stringify(magic)} at byte ${magicAt} (expected "n+${version}"; Analyze 7.5 is not supported)`);
  }

  // Dims and vox_offset read directly: the library's 64-bit reads are wrong for big-endian NIfTI-2.
  const dim = (i: number): number =>
    version === 1 ? dv.getInt16(40 + 2 * i, le) : Number(dv.getBigInt64(16 + 8 * i, le));
  const ndim = dim(0);
  if (!(ndim >= 1 && ndim <= 7)) fail(`invalid dim[0]=${ndim} (number of dimensions must be 1..7)`);
  const all = Array.from({ length: ndim }, (_, i) => dim(i + 1));
  const bad = all.findIndex((d) => !(d >= 1));
  if (bad >= 0) fail(`invalid dim[${bad + 1}]=${all[bad]} (sizes must be >= 1)`);
  const dims: [number, number, number] = [all[0], all[1] ?? 1, all[2] ?? 1];
  const frames = all.slice(3).reduce((a, b) => a * b, 1);
  const frame = options.frame ?? 0;
  if (options.frame === undefined && frames > 1) {
    fail(`is ${ndim}D (dim = [${all.join(', ')}]) with ${frames} volumes; only 3D volumes are supported`);
  }
  if (!Number.isInteger(frame) || frame < 0 || frame >= frames) fail(`frame ${frame} out of range (file has ${frames} volumes)`);

  const datatypeCode = version === 1 ? dv.getInt16(70, le) : dv.getInt16(12, le);
  const dt = DTYPES.get(datatypeCode);
  if (!dt) {
    const what = UNSUPPORTED_DTYPES[datatypeCode];
    return fail(what ? `unsupported datatype ${what} (code ${datatypeCode})` : `invalid datatype code ${datatypeCode}`);
  }

  const rawOffset = version === 1 ? dv.getFloat32(108, le) : Number(dv.getBigInt64(168, le));
  if (!Number.isFinite(rawOffset) || rawOffset < 0 || !Number.isInteger(rawOffset)) fail(`invalid vox_offset ${rawOffset}`);
  // Some writers leave vox_offset 0 in single-file NIfTI; the data then starts right after the extension flag.
  const voxOffset = Math.max(rawOffset, hdrSize + 4);

  const nvox = dims[0] * dims[1] * dims[2];
  const frameBytes = nvox * dt.bytes;
  return { version, le, hdrSize, all, dims, frames, frame, dt, voxOffset, nvox, frameBytes };
}

/**
 * Decode an uncompressed NIfTI byte buffer. `gzipFault` is set when the bytes are what could be recovered
 * from a damaged gzip stream: decoding then always fails, with the most specific fault found.
 */
export function decodeNifti(
  bytes: Uint8Array,
  name: string,
  options: ReadNiftiOptions = {},
  gzipFault?: string,
): NiftiVolume {
  const fail = (fault: string, cause?: unknown): never => {
    throw new NiftiError(name, fault, cause === undefined ? undefined : { cause });
  };
  const layout = niftiLayout(bytes, name, options, gzipFault);
  const { version, le, dims, frames, frame, dt, voxOffset, nvox, frameBytes } = layout;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

  const available = Math.max(0, bytes.length - voxOffset);
  if (available < frameBytes * frames) {
    const gz = gzipFault ? `gzip stream ends early (${gzipFault}); ` : '';
    fail(`truncated: ${gz}header says ${nvox * frames} voxels of ${dt.name} but only ${available} bytes of data` +
      ` (need ${frameBytes * frames})`);
  }
  // All the data is there but the gzip trailer/CRC is not: do not trust the voxels.
  if (gzipFault) fail(`corrupt gzip stream (${gzipFault})`);
  // Present on disk, but its float32 volume may still be too large to hold (1 byte per voxel becomes 4).
  checkDeclaredSize(layout, name, maxNiftiBytes(options));

  // Library header parse for the remaining fields (scaling, transforms). Only the header + extensions are copied.
  let header: NIFTI1 | NIFTI2;
  try {
    const headBuf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + Math.min(bytes.length, voxOffset));
    header = readHeader(headBuf as ArrayBuffer);
  } catch (e) {
    return fail(`unreadable header (${(e as Error).message})`, e);
  }

  const pix = (i: number): number => {
    const v = Math.abs(header.pixDims[i] ?? NaN);
    return Number.isFinite(v) && v > 0 ? v : 1;
  };
  const spacing: [number, number, number] = [pix(1), pix(2), pix(3)];

  const slope = header.scl_slope;
  const inter = Number.isFinite(header.scl_inter) ? header.scl_inter : 0;
  // NIfTI: slope 0 (or NaN, as nibabel writes) means "no scaling".
  const scale = Number.isFinite(slope) && slope !== 0 && (slope !== 1 || inter !== 0);

  const data = new Float32Array(nvox);
  const start = voxOffset + frame * frameBytes;
  const get = dt.get;
  const step = dt.bytes;
  if (scale) for (let i = 0, o = start; i < nvox; i++, o += step) data[i] = get(dv, o, le) * slope + inter;
  else for (let i = 0, o = start; i < nvox; i++, o += step) data[i] = get(dv, o, le);

  const { affine, affineSource } = pickAffine(header, version, dv, le, spacing);
  return { version, dims, spacing, datatype: dt.name, littleEndian: le, data, affine, affineSource, frames };
}

/** sform when sform_code > 0, else the qform, else pixdim scaling (NIfTI "method 1"). */
function pickAffine(
  header: NIFTI1 | NIFTI2,
  version: 1 | 2,
  dv: DataView,
  le: boolean,
  spacing: readonly [number, number, number],
): { affine: number[][]; affineSource: NiftiVolume['affineSource'] } {
  if (header.sform_code > 0) {
    const rows: number[][] = [];
    for (let r = 0; r < 3; r++) {
      const row: number[] = [];
      for (let c = 0; c < 4; c++) {
        // nifti-reader-js prefers the qform for NIfTI-1 when both are set, so the srows are read here.
        row.push(version === 1 ? dv.getFloat32(280 + (r * 4 + c) * 4, le) : dv.getFloat64(400 + (r * 4 + c) * 8, le));
      }
      rows.push(row);
    }
    rows.push([0, 0, 0, 1]);
    return { affine: rows, affineSource: 'sform' };
  }
  if (header.qform_code > 0) {
    const q = header.getQformMat().map((row) => [...row]);
    return { affine: q, affineSource: 'qform' };
  }
  return { affine: diagonalAffine(spacing), affineSource: 'pixdim' };
}

function diagonalAffine(spacing: readonly [number, number, number]): number[][] {
  return [
    [spacing[0], 0, 0, 0],
    [0, spacing[1], 0, 0],
    [0, 0, spacing[2], 0],
    [0, 0, 0, 1],
  ];
}

// ---------------------------------------------------------------------------------------------------------
// Writer

export interface NiftiWriteInput {
  readonly data: Float32Array | Uint8Array | Int16Array;
  /** [X, Y, Z]; data is x fastest (a VolumeCase buffer with dims = dimsFromShape(shape)). */
  readonly dims: readonly [number, number, number];
  /** Voxel size in mm. */
  readonly spacing: readonly [number, number, number];
  /**
   * 4x4 (or 3x4) voxel -> world matrix; default diag(spacing) at the origin. Its column lengths must match
   * `spacing`, and without shear it is also stored as the qform.
   */
  readonly affine?: readonly (readonly number[])[];
  /** descrip field, at most 79 ASCII characters kept. */
  readonly description?: string;
}

const HEADER_BYTES = 348;
const VOX_OFFSET = 352;

/** Encode an uncompressed little-endian single-file NIfTI-1 (348-byte header, 4-byte extension flag, data). */
export function encodeNifti(input: NiftiWriteInput): Buffer {
  const { data, dims, spacing } = input;
  const [code, bitpix] = data instanceof Float32Array ? [16, 32] : data instanceof Uint8Array ? [2, 8] : [4, 16];
  if (dims.length !== 3 || dims.some((d) => !Number.isInteger(d) || d < 1 || d > 32767)) {
    throw new RangeError(`NIfTI-1 dims must be 3 integers in 1..32767, got [${dims.join(', ')}]`);
  }
  const nvox = dims[0] * dims[1] * dims[2];
  if (data.length !== nvox) throw new RangeError(`data has ${data.length} values but dims [${dims.join(', ')}] need ${nvox}`);
  if (spacing.length !== 3 || spacing.some((s) => !(Number.isFinite(s) && s > 0))) {
    throw new RangeError(`spacing must be 3 positive numbers, got [${spacing.join(', ')}]`);
  }
  const affine = input.affine ? checkAffine(input.affine, spacing) : diagonalAffine(spacing);
  const quat = quaternFromAffine(affine, spacing);

  const buf = Buffer.alloc(VOX_OFFSET + data.byteLength);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  dv.setInt32(0, HEADER_BYTES, true);
  buf.write('r', 38, 'latin1'); // "regular", as nibabel writes
  [3, dims[0], dims[1], dims[2], 1, 1, 1, 1].forEach((d, i) => dv.setInt16(40 + 2 * i, d, true));
  dv.setInt16(70, code, true);
  dv.setInt16(72, bitpix, true);
  [quat ? quat.qfac : 1, spacing[0], spacing[1], spacing[2], 1, 1, 1, 1].forEach((p, i) => dv.setFloat32(76 + 4 * i, p, true));
  dv.setFloat32(108, VOX_OFFSET, true);
  dv.setFloat32(112, 1, true); // scl_slope: identity
  dv.setFloat32(116, 0, true); // scl_inter
  buf.writeUInt8(2 | 8, 123); // xyzt_units: mm, s
  const descrip = (input.description ?? 'MedFL').replace(/[^\x20-\x7e]/g, '?').slice(0, 79);
  buf.write(descrip, 148, 'latin1');
  dv.setInt16(252, quat ? 1 : 0, true); // qform_code: scanner anat (0 when the affine has shear)
  dv.setInt16(254, 1, true); // sform_code: scanner anat
  if (quat) {
    dv.setFloat32(256, quat.b, true);
    dv.setFloat32(260, quat.c, true);
    dv.setFloat32(264, quat.d, true);
  }
  for (let r = 0; r < 3; r++) {
    if (quat) dv.setFloat32(268 + 4 * r, affine[r][3], true); // qoffset
    for (let c = 0; c < 4; c++) dv.setFloat32(280 + (r * 4 + c) * 4, affine[r][c], true);
  }
  buf.write('n+1\0', 344, 'latin1');
  // bytes 348..351: extension flag, all zero (no extensions)

  const out = new DataView(buf.buffer, buf.byteOffset + VOX_OFFSET, data.byteLength);
  if (data instanceof Uint8Array) buf.set(data, VOX_OFFSET);
  else if (data instanceof Int16Array) for (let i = 0; i < nvox; i++) out.setInt16(2 * i, data[i], true);
  else for (let i = 0; i < nvox; i++) out.setFloat32(4 * i, data[i], true);
  return buf;
}

/** Write a NIfTI-1 file atomically (temp + rename); gzip when the name ends in .gz. */
export async function writeNifti(path: string, input: NiftiWriteInput): Promise<void> {
  const raw = encodeNifti(input);
  const bytes = path.endsWith('.gz') ? await gzipAsync(raw, { level: 6 }) : raw;
  writeFileAtomic(path, bytes);
}

function checkAffine(a: readonly (readonly number[])[], spacing: readonly [number, number, number]): number[][] {
  if (a.length < 3 || a.slice(0, 3).some((row) => row.length !== 4 || row.some((v) => !Number.isFinite(v)))) {
    throw new RangeError('affine must be 3 or 4 rows of 4 finite numbers');
  }
  for (let c = 0; c < 3; c++) {
    const len = Math.hypot(a[0][c], a[1][c], a[2][c]);
    if (Math.abs(len - spacing[c]) > 1e-4 * Math.max(1, spacing[c])) {
      throw new RangeError(`affine column ${c} has length ${len} but spacing[${c}] is ${spacing[c]}`);
    }
  }
  return [[...a[0]], [...a[1]], [...a[2]], [0, 0, 0, 1]];
}

/**
 * Quaternion (b, c, d) and qfac for the rotation part of `affine` (port of nifti_mat44_to_quatern for the
 * orthogonal case). Returns undefined when the columns are not orthogonal: a qform cannot express shear.
 */
function quaternFromAffine(
  affine: number[][],
  spacing: readonly [number, number, number],
): { b: number; c: number; d: number; qfac: number } | undefined {
  const R = [0, 1, 2].map((r) => [0, 1, 2].map((c) => affine[r][c] / spacing[c]));
  for (let i = 0; i < 3; i++) {
    for (let j = i + 1; j < 3; j++) {
      const dot = R[0][i] * R[0][j] + R[1][i] * R[1][j] + R[2][i] * R[2][j];
      if (Math.abs(dot) > 1e-4) return undefined;
    }
  }
  const det =
    R[0][0] * (R[1][1] * R[2][2] - R[1][2] * R[2][1]) -
    R[0][1] * (R[1][0] * R[2][2] - R[1][2] * R[2][0]) +
    R[0][2] * (R[1][0] * R[2][1] - R[1][1] * R[2][0]);
  const qfac = det < 0 ? -1 : 1;
  if (qfac < 0) for (let r = 0; r < 3; r++) R[r][2] = -R[r][2];
  const [r11, r12, r13] = R[0];
  const [r21, r22, r23] = R[1];
  const [r31, r32, r33] = R[2];
  let a = r11 + r22 + r33 + 1;
  let b: number, c: number, d: number;
  if (a > 0.5) {
    a = 0.5 * Math.sqrt(a);
    b = (0.25 * (r32 - r23)) / a;
    c = (0.25 * (r13 - r31)) / a;
    d = (0.25 * (r21 - r12)) / a;
  } else {
    const xd = 1 + r11 - (r22 + r33);
    const yd = 1 + r22 - (r11 + r33);
    const zd = 1 + r33 - (r11 + r22);
    if (xd > 1) {
      b = 0.5 * Math.sqrt(xd);
      c = (0.25 * (r12 + r21)) / b;
      d = (0.25 * (r13 + r31)) / b;
      a = (0.25 * (r32 - r23)) / b;
    } else if (yd > 1) {
      c = 0.5 * Math.sqrt(yd);
      b = (0.25 * (r12 + r21)) / c;
      d = (0.25 * (r23 + r32)) / c;
      a = (0.25 * (r13 - r31)) / c;
    } else {
      d = 0.5 * Math.sqrt(zd);
      b = (0.25 * (r13 + r31)) / d;
      c = (0.25 * (r23 + r32)) / d;
      a = (0.25 * (r21 - r12)) / d;
    }
    if (a < 0) [b, c, d] = [-b, -c, -d];
  }
  return { b, c, d, qfac };
}
