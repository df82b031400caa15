/**
 * The safetensors format (8-byte little-endian header length, JSON header, raw little-endian data),
 * written and read here so that numpy/PyTorch users can open every model and update file as is.
 * Reading validates everything: header size, offsets that tile the buffer exactly, shapes, dtypes.
 */
import { writeSync } from 'node:fs';
import { type NamedTensor, type TensorBundle, type TensorSpec, elementCount, makeBundle } from './bundle.ts';

const MAX_HEADER_BYTES = 100 * 1024 * 1024;
const DTYPE_BYTES: Record<string, number> = { F32: 4 };

export class SafetensorsError extends Error {
  override name = 'SafetensorsError';
}

/**
 * The JSON header (padded so data starts 8-byte aligned) for tensors of these specs, in name order,
 * and the size of the data section. Sizes follow from specs alone, so limits need no model-sized buffer.
 */
export function safetensorsLayout(specs: Iterable<TensorSpec>, metadata: Record<string, string> = {}): { header: Buffer; dataBytes: number; names: string[] } {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  const byName = new Map([...specs].map((t) => [t.name, t]));
  const names = [...byName.keys()].sort();
  let offset = 0;
  for (const name of names) {
    const t = byName.get(name)!;
    const bytes = elementCount(t.shape) * DTYPE_BYTES[t.dtype];
    header[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // Pad with spaces so the data section starts 8-byte aligned (allowed by the format, helps zero-copy readers).
  const pad = (8 - ((8 + Buffer.byteLength(json)) % 8)) % 8;
  json += ' '.repeat(pad);
  return { header: Buffer.from(json, 'utf8'), dataBytes: offset, names };
}

export function encodeSafetensors(bundle: TensorBundle, metadata: Record<string, string> = {}): Buffer {
  if (!littleEndian()) throw new SafetensorsError('big-endian hosts are not supported');
  const { header, dataBytes, names } = safetensorsLayout(bundle.values(), metadata);
  const out = Buffer.allocUnsafe(8 + header.length + dataBytes);
  out.writeBigUInt64LE(BigInt(header.length), 0);
  header.copy(out, 8);
  let pos = 8 + header.length;
  for (const name of names) {
    const t = bundle.get(name)!;
    Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).copy(out, pos);
    pos += t.data.byteLength;
  }
  return out;
}

/**
 * Writes the same bytes as encodeSafetensors to an open file descriptor, tensor by tensor, feeding
 * `onBytes` (e.g. a hash) as it goes: no model-sized buffer is allocated. Returns the bytes written.
 */
export function writeSafetensors(fd: number, bundle: TensorBundle, metadata: Record<string, string> = {}, onBytes?: (b: Uint8Array) => void): number {
  if (!littleEndian()) throw new SafetensorsError('big-endian hosts are not supported');
  const { header, dataBytes, names } = safetensorsLayout(bundle.values(), metadata);
  const prefix = Buffer.allocUnsafe(8 + header.length);
  prefix.writeBigUInt64LE(BigInt(header.length), 0);
  header.copy(prefix, 8);
  const put = (b: Uint8Array) => {
    let off = 0;
    while (off < b.length) off += writeSync(fd, b, off, b.length - off);
    onBytes?.(b);
  };
  put(prefix);
  for (const name of names) {
    const t = bundle.get(name)!;
    put(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  }
  return prefix.length + dataBytes;
}

export interface DecodedSafetensors {
  bundle: TensorBundle;
  metadata: Record<string, string>;
}

export interface DecodeOptions {
  /**
   * Return views into `buf` instead of copies where the data is 4-byte aligned (ours always is).
   * Saves a model-sized copy on the coordinator's hot path; the caller must not reuse `buf` meanwhile.
   */
  readonly views?: boolean;
}

/** One tensor's place in a safetensors file's data section (bytes from the section's start). */
export interface SafetensorsEntry {
  readonly name: string;
  readonly dtype: 'F32';
  readonly shape: number[];
  readonly begin: number;
  readonly end: number;
}

/**
 * The 8-byte length and JSON header at the start of a safetensors file of `fileBytes` bytes, validated as
 * decodeSafetensors validates it (dtypes, shapes, offsets that tile the data section exactly): each tensor's
 * entry, sorted by where its data starts, the metadata and where the data section starts.
 * `prefix` holds at least the first 8 bytes; when it holds less than the whole header, `headerBytes` says how
 * many more the caller must read (the header's length) and nothing else is returned.
 */
export function parseSafetensorsHeader(
  prefix: Uint8Array,
  fileBytes: number,
): { entries: SafetensorsEntry[]; metadata: Record<string, string>; dataStart: number } | { headerBytes: number } {
  if (fileBytes < 8 || prefix.length < 8) throw new SafetensorsError(`file too short (${fileBytes} bytes) to be safetensors`);
  const view = new DataView(prefix.buffer, prefix.byteOffset, prefix.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > fileBytes) {
    throw new SafetensorsError(`header length ${headerLen} does not fit in ${fileBytes} bytes: truncated or not safetensors`);
  }
  if (prefix.length < 8 + headerLen) return { headerBytes: headerLen };
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(Buffer.from(prefix.buffer, prefix.byteOffset + 8, headerLen).toString('utf8'));
  } catch (e) {
    throw new SafetensorsError(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) throw new SafetensorsError('header is not a JSON object');
  const dataStart = 8 + headerLen;
  const dataLen = fileBytes - dataStart;
  const metadata: Record<string, string> = {};
  const entries: SafetensorsEntry[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (raw && typeof raw === 'object') for (const [k, v] of Object.entries(raw)) metadata[k] = String(v);
      continue;
    }
    const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e?.dtype !== 'string' || !Array.isArray(e.shape) || !Array.isArray(e.data_offsets) || e.data_offsets.length !== 2) {
      throw new SafetensorsError(`tensor "${name}": header entry needs dtype, shape and data_offsets`);
    }
    if (!Object.hasOwn(DTYPE_BYTES, e.dtype)) throw new SafetensorsError(`tensor "${name}": dtype ${e.dtype} is not supported (only F32)`);
    const shape = e.shape as unknown[];
    if (!shape.every((d) => Number.isInteger(d) && (d as number) >= 0)) throw new SafetensorsError(`tensor "${name}": bad shape ${JSON.stringify(shape)}`);
    const [begin, end] = e.data_offsets as unknown[];
    if (!Number.isInteger(begin) || !Number.isInteger(end) || (begin as number) < 0 || (end as number) < (begin as number) || (end as number) > dataLen) {
      throw new SafetensorsError(`tensor "${name}": data_offsets ${JSON.stringify(e.data_offsets)} outside the ${dataLen}-byte data section`);
    }
    const need = elementCount(shape as number[]) * DTYPE_BYTES[e.dtype];
    if ((end as number) - (begin as number) !== need) {
      throw new SafetensorsError(`tensor "${name}": shape [${shape.join(',')}] needs ${need} bytes, offsets give ${(end as number) - (begin as number)}`);
    }
    entries.push({ name, dtype: 'F32', shape: shape as number[], begin: begin as number, end: end as number });
  }
  // Offsets must tile the data section exactly: no gaps, no overlaps, nothing trailing.
  entries.sort((a, b) => a.begin - b.begin);
  let expect = 0;
  for (const e of entries) {
    if (e.begin !== expect) throw new SafetensorsError(`tensor "${e.name}" starts at ${e.begin}, expected ${expect}: gap or overlap in data`);
    expect = e.end;
  }
  if (expect !== dataLen) throw new SafetensorsError(`data section is ${dataLen} bytes but tensors cover ${expect}: truncated or trailing bytes`);
  return { entries, metadata, dataStart };
}

export function decodeSafetensors(buf: Uint8Array, opts: DecodeOptions = {}): DecodedSafetensors {
  if (buf.length < 8) throw new SafetensorsError(`file too short (${buf.length} bytes) to be safetensors`);
  const parsed = parseSafetensorsHeader(buf, buf.length);
  // The whole file is here, so the header is too.
  if (!('entries' in parsed)) throw new SafetensorsError('header does not fit in the buffer');
  const { entries, metadata, dataStart } = parsed;
  const tensors: NamedTensor[] = entries.map((e) => {
    const at = buf.byteOffset + dataStart + e.begin;
    if (opts.views && at % 4 === 0) {
      return { name: e.name, dtype: 'F32', shape: e.shape, data: new Float32Array(buf.buffer, at, (e.end - e.begin) / 4) };
    }
    // Copy so the result is aligned and does not pin the (possibly large, pooled) input buffer.
    const bytes = new Uint8Array(e.end - e.begin);
    bytes.set(buf.subarray(dataStart + e.begin, dataStart + e.end));
    return { name: e.name, dtype: 'F32', shape: e.shape, data: new Float32Array(bytes.buffer) };
  });
  return { bundle: makeBundle(tensors), metadata };
}

let le: boolean | undefined;
function littleEndian(): boolean {
  if (le === undefined) le = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  return le;
}
