/**
 * NumPy .npy files (format versions 1.0, 2.0 and 3.0), float32 only.
 *
 *   magic "\x93NUMPY", major, minor, header length (u16 LE for 1.0, u32 LE for 2.0/3.0),
 *   header = Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (a, b, ...), }
 *   padded with spaces and ending in '\n' so that the data starts aligned, then the raw C-order data.
 *
 * Reading accepts only little-endian float32 ('<f4') in C order and says so clearly for anything else
 * (convert with `a.astype('<f4')` / `np.ascontiguousarray`). Writing produces version 1.0 (2.0 only when
 * the header would not fit in 65535 bytes), float32, C order, 64-byte aligned as NumPy writes it.
 */
import { readFile } from 'node:fs/promises';
import { writeFileAtomic } from '../util/fs-atomic.ts';

export class NpyError extends Error {
  override name = 'NpyError';
}

export interface NpyArray {
  /** Dimensions in C order (last fastest); [] for a 0-d array. */
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

/** Parse .npy bytes. `name` only labels errors. */
export function decodeNpy(buf: Uint8Array, name = 'npy'): NpyArray {
  if (buf.length < 10 || MAGIC.some((b, i) => buf[i] !== b)) throw new NpyError(`${name}: not a .npy file (bad magic)`);
  const major = buf[6];
  const minor = buf[7];
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let headerLen: number;
  let headerStart: number;
  if (major === 1) {
    headerLen = view.getUint16(8, true);
    headerStart = 10;
  } else if (major === 2 || major === 3) {
    if (buf.length < 12) throw new NpyError(`${name}: truncated header`);
    headerLen = view.getUint32(8, true);
    headerStart = 12;
  } else {
    throw new NpyError(`${name}: .npy format version ${major}.${minor} is not supported (1.0, 2.0, 3.0 are)`);
  }
  const dataStart = headerStart + headerLen;
  if (dataStart > buf.length) throw new NpyError(`${name}: header length ${headerLen} runs past the end of the file`);
  // 1.0/2.0 headers are latin1, 3.0 utf8; the fields we read are ASCII either way.
  const header = Buffer.from(buf.buffer, buf.byteOffset + headerStart, headerLen).toString(major === 3 ? 'utf8' : 'latin1');

  const descr = /['"]descr['"]\s*:\s*['"]([^'"]*)['"]/.exec(header)?.[1];
  const fortran = /['"]fortran_order['"]\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /['"]shape['"]\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new NpyError(`${name}: header is not a NumPy array header: ${JSON.stringify(header.trim())}`);
  }
  if (descr !== '<f4') {
    throw new NpyError(
      `${name}: dtype '${descr}' is not supported: MedFL reads little-endian float32 ('<f4') only ` +
        `(convert with np.save(path, a.astype('<f4')))`,
    );
  }
  if (fortran === 'True') {
    throw new NpyError(`${name}: fortran_order=True is not supported: save a C-order array (np.save(path, np.ascontiguousarray(a)))`);
  }
  const shape = shapeText
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map((s) => {
      const v = Number(s.replace(/L$/, ''));
      if (!Number.isSafeInteger(v) || v < 0) throw new NpyError(`${name}: bad dimension "${s}" in shape (${shapeText})`);
      return v;
    });
  const count = shape.reduce((a, d) => a * d, 1);
  const bytes = count * 4;
  if (buf.length - dataStart !== bytes) {
    throw new NpyError(
      `${name}: shape (${shape.join(', ')}) needs ${bytes} data bytes, file has ${buf.length - dataStart}: truncated or trailing bytes`,
    );
  }
  // Copy: aligned, and does not pin a larger (possibly pooled) buffer.
  const data = new Float32Array(count);
  new Uint8Array(data.buffer).set(buf.subarray(dataStart, dataStart + bytes));
  if (!hostLittleEndian()) throw new NpyError('big-endian hosts are not supported');
  return { shape, data };
}

/** Encode a float32 C-order array as .npy bytes. */
export function encodeNpy(arr: NpyArray): Buffer {
  const count = arr.shape.reduce((a, d) => a * d, 1);
  if (arr.shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new NpyError(`bad shape [${arr.shape.join(', ')}]`);
  if (count !== arr.data.length) throw new NpyError(`shape [${arr.shape.join(', ')}] needs ${count} values, got ${arr.data.length}`);
  if (!hostLittleEndian()) throw new NpyError('big-endian hosts are not supported');
  const shapeText = arr.shape.length === 1 ? `(${arr.shape[0]},)` : `(${arr.shape.join(', ')})`;
  const dict = `{'descr': '<f4', 'fortran_order': False, 'shape': ${shapeText}, }`;
  let major = 1;
  let prefix = 10;
  // Total header (magic … '\n') padded to a multiple of 64 bytes, as NumPy does.
  let padded = Math.ceil((prefix + dict.length + 1) / 64) * 64 - prefix;
  if (padded > 0xffff) {
    major = 2;
    prefix = 12;
    padded = Math.ceil((prefix + dict.length + 1) / 64) * 64 - prefix;
  }
  const header = dict + ' '.repeat(padded - dict.length - 1) + '\n';
  const out = Buffer.alloc(prefix + padded + arr.data.byteLength);
  MAGIC.forEach((b, i) => (out[i] = b));
  out[6] = major;
  out[7] = 0;
  if (major === 1) out.writeUInt16LE(padded, 8);
  else out.writeUInt32LE(padded, 8);
  out.write(header, prefix, 'latin1');
  Buffer.from(arr.data.buffer, arr.data.byteOffset, arr.data.byteLength).copy(out, prefix + padded);
  return out;
}

export async function readNpy(path: string): Promise<NpyArray> {
  let buf: Buffer;
  try {
    buf = await readFile(path);
  } catch (e) {
    throw new NpyError(`${path}: cannot read file (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  return decodeNpy(buf, path);
}

/** Write atomically (temporary file + rename). */
export function writeNpy(path: string, arr: NpyArray): void {
  writeFileAtomic(path, encodeNpy(arr));
}

let le: boolean | undefined;
function hostLittleEndian(): boolean {
  if (le === undefined) le = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  return le;
}
