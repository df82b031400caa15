/**
 * Update encodings negotiated by the plan (plan.compression): float32 (exact), float16 (IEEE half, round to
 * nearest even), int8 (per-tensor affine: q = round((x − lo)/scale) − 128, scale = (hi − lo)/255), each of
 * the weights or of the delta against the model the site started from. The result is still a safetensors
 * file (dtypes F32 / F16 / I8, which numpy and PyTorch read as is); the affine parameters and the delta flag
 * live in the header's __metadata__ under "medfl.encoding", so a decoder needs nothing else.
 */
import { makeBundle, elementCount, type NamedTensor, type TensorBundle } from './bundle.ts';
import { decodeSafetensors, encodeSafetensors, SafetensorsError } from './safetensors.ts';

export type UpdateDType = 'float32' | 'float16' | 'int8';

export interface UpdateEncoding {
  readonly update: UpdateDType;
  readonly delta: boolean;
}

export const ENCODING_KEY = 'medfl.encoding';

interface EncodingMeta {
  v: 1;
  dtype: UpdateDType;
  delta: boolean;
  /** int8 only: tensor name → [scale, lo]. */
  affine?: Record<string, [number, number]>;
}

const ST_DTYPE: Record<UpdateDType, string> = { float32: 'F32', float16: 'F16', int8: 'I8' };
const BYTES: Record<string, number> = { F32: 4, F16: 2, I8: 1 };

/**
 * Encodes float32 weights (`weights`: safetensors bytes or a bundle) for the wire. `base` (the model the
 * site started from) is needed for delta encodings. float32 weights come back unchanged (same bytes).
 */
export function encodeUpdate(weights: Uint8Array | TensorBundle, enc: UpdateEncoding, base?: () => TensorBundle): Buffer {
  if (enc.update === 'float32' && !enc.delta) {
    return weights instanceof Uint8Array ? Buffer.from(weights.buffer, weights.byteOffset, weights.byteLength) : encodeSafetensors(weights);
  }
  const w = weights instanceof Uint8Array ? decodeSafetensors(weights).bundle : weights;
  let src: TensorBundle = w;
  if (enc.delta) {
    if (!base) throw new Error('a delta encoding needs the model the update was trained from');
    const b = base();
    const out: NamedTensor[] = [];
    for (const t of w.values()) {
      const bt = b.get(t.name);
      if (!bt || bt.data.length !== t.data.length) throw new Error(`base model lacks tensor ${t.name} (or its size differs): cannot delta-encode the update`);
      const d = new Float32Array(t.data.length);
      for (let i = 0; i < d.length; i++) d[i] = t.data[i] - bt.data[i];
      out.push({ ...t, data: d });
    }
    src = makeBundle(out);
  }
  const meta: EncodingMeta = { v: 1, dtype: enc.update, delta: enc.delta };
  if (enc.update === 'float32') return encodeSafetensors(src, { [ENCODING_KEY]: JSON.stringify(meta) });
  const names = [...src.keys()].sort();
  const payloads: { name: string; shape: readonly number[]; bytes: Uint8Array }[] = [];
  if (enc.update === 'int8') meta.affine = {};
  for (const name of names) {
    const t = src.get(name)!;
    if (enc.update === 'float16') {
      const h = new Uint16Array(t.data.length);
      for (let i = 0; i < h.length; i++) h[i] = toHalf(t.data[i]);
      payloads.push({ name, shape: t.shape, bytes: new Uint8Array(h.buffer) });
    } else {
      const { q, scale, lo } = quantiseInt8(t.data);
      meta.affine![name] = [scale, lo];
      payloads.push({ name, shape: t.shape, bytes: new Uint8Array(q.buffer) });
    }
  }
  return writeRaw(payloads, ST_DTYPE[enc.update], { [ENCODING_KEY]: JSON.stringify(meta) });
}

export interface DecodedUpdate {
  /** Float32 tensors: the weights, or the delta when `isDelta`. */
  bundle: TensorBundle;
  isDelta: boolean;
  encoding: UpdateEncoding;
}

/**
 * Decodes an update file of any encoding into float32. Plain float32 files decode through
 * decodeSafetensors (views into `buf` when `views`); float16/int8 decode into `into` (flat, reused by the
 * caller, tensors in name order) when given and large enough, else into fresh arrays.
 */
export function decodeUpdate(buf: Uint8Array, opts: { views?: boolean; into?: (floats: number) => Float32Array } = {}): DecodedUpdate {
  const head = decodeUpdateHeader(buf, buf.length);
  // The whole file is here, so the header is too.
  if (!('entries' in head)) throw new SafetensorsError('header does not fit in the buffer');
  const { encoding, meta, entries, dataStart } = head;
  if (meta.dtype === 'float32') return { bundle: decodeSafetensors(buf, { views: opts.views }).bundle, isDelta: meta.delta, encoding };
  const total = entries.reduce((s, e) => s + elementCount(e.shape), 0);
  const flat = opts.into?.(total) ?? new Float32Array(total);
  const byName = [...entries].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const out: NamedTensor[] = [];
  let off = 0;
  for (const e of byName) {
    const n = elementCount(e.shape);
    const data = flat.subarray(off, off + n);
    off += n;
    const at = buf.byteOffset + dataStart + e.begin;
    if (meta.dtype === 'float16') {
      const bytes = buf.subarray(dataStart + e.begin, dataStart + e.end);
      const h = at % 2 === 0 ? new Uint16Array(buf.buffer, at, n) : new Uint16Array(bytes.slice().buffer);
      for (let i = 0; i < n; i++) data[i] = fromHalf(h[i]);
    } else {
      const a = meta.affine?.[e.name];
      if (!a || !Number.isFinite(a[0]) || !Number.isFinite(a[1])) throw new SafetensorsError(`int8 tensor "${e.name}" has no affine parameters in ${ENCODING_KEY}`);
      const [scale, lo] = a;
      const q = new Int8Array(buf.buffer, at, n);
      for (let i = 0; i < n; i++) data[i] = (q[i] + 128) * scale + lo;
    }
    out.push({ name: e.name, dtype: 'F32', shape: e.shape, data });
  }
  return { bundle: makeBundle(out), isDelta: meta.delta, encoding };
}

/** An update file's header, checked as decodeUpdate checks it: the encoding and each tensor's place in the file. */
export interface UpdateFileHeader {
  encoding: UpdateEncoding;
  isDelta: boolean;
  /** Every tensor of the file (dtype as stored: F32, F16 or I8), offsets relative to `dataStart`. */
  entries: readonly { name: string; dtype: string; shape: number[]; begin: number; end: number }[];
  dataStart: number;
  /** @internal the parsed encoding metadata (int8's affine parameters). */
  meta: EncodingMeta;
}

/**
 * The header of an update file of `fileBytes` bytes from its first bytes (`head`), validated with the same checks
 * and words as decodeUpdate (dtypes, shapes, offsets that tile the data section, the encoding metadata), so a
 * caller can read the tensors from the file itself instead of decoding the whole of it. When `head` holds less than
 * the header, `headerBytes` says how many bytes the caller must read (the 8-byte length included) and nothing else.
 */
export function decodeUpdateHeader(head: Uint8Array, fileBytes: number): UpdateFileHeader | { headerBytes: number } {
  const raw = parseHeader(head, fileBytes);
  if (!('entries' in raw)) return raw;
  const metaText = raw.metadata[ENCODING_KEY];
  let meta: EncodingMeta = { v: 1, dtype: 'float32', delta: false };
  if (metaText !== undefined) {
    try {
      meta = JSON.parse(metaText) as EncodingMeta;
    } catch (e) {
      throw new SafetensorsError(`${ENCODING_KEY} metadata is not JSON: ${(e as Error).message}`);
    }
    // Own keys only: "toString" is `in` every object. The metadata is the sender's: it may be any JSON value.
    if (meta === null || typeof meta !== 'object' || meta.v !== 1 || !Object.hasOwn(ST_DTYPE, meta.dtype) || typeof meta.delta !== 'boolean') throw new SafetensorsError(`unknown ${ENCODING_KEY} ${metaText.slice(0, 200)}; the site runs a newer MedFL than the coordinator`);
  }
  const encoding: UpdateEncoding = { update: meta.dtype, delta: meta.delta };
  const want = ST_DTYPE[meta.dtype];
  for (const e of raw.entries) if (e.dtype !== want) throw new SafetensorsError(`tensor "${e.name}" is ${e.dtype}, but the encoding says ${want}`);
  return { encoding, isDelta: meta.delta, entries: raw.entries, dataStart: raw.dataStart, meta };
}

/** Weights from a decoded update: the bundle itself, or base + delta (fresh arrays). */
export function weightsOf(d: DecodedUpdate, base: TensorBundle): TensorBundle {
  if (!d.isDelta) return d.bundle;
  return makeBundle([...d.bundle.values()].map((t) => {
    const b = base.get(t.name);
    if (!b || b.data.length !== t.data.length) throw new Error(`base model lacks tensor ${t.name}`);
    const x = new Float32Array(t.data.length);
    for (let i = 0; i < x.length; i++) x[i] = b.data[i] + t.data[i];
    return { ...t, data: x };
  }));
}

export function quantiseInt8(x: Float32Array): { q: Int8Array; scale: number; lo: number } {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < x.length; i++) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
  }
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    if (x.length === 0) return { q: new Int8Array(0), scale: 1, lo: 0 };
    throw new Error('cannot int8-encode a tensor holding NaN or Inf');
  }
  const scale = hi > lo ? (hi - lo) / 255 : 1;
  const q = new Int8Array(x.length);
  const inv = 1 / scale;
  for (let i = 0; i < x.length; i++) q[i] = Math.min(127, Math.max(-128, Math.round((x[i] - lo) * inv) - 128));
  return { q, scale, lo };
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 → IEEE 754 half, round to nearest even; overflow → ±Inf, NaN stays NaN. */
export function toHalf(v: number): number {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++; // may carry into the exponent: still correct
  return sign | h;
}

export function fromHalf(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 0x1f) return m ? Number.NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

interface RawEntry { name: string; dtype: string; shape: number[]; begin: number; end: number }

/** Header of a safetensors file with F32/F16/I8 tensors, checked: offsets tile the data exactly. */
function parseHeader(buf: Uint8Array, fileBytes: number): { entries: RawEntry[]; metadata: Record<string, string>; dataStart: number } | { headerBytes: number } {
  if (fileBytes < 8 || buf.length < 8) throw new SafetensorsError(`update too short (${fileBytes} bytes) to be safetensors`);
  const headerLen = Number(new DataView(buf.buffer, buf.byteOffset, 8).getBigUint64(0, true));
  if (headerLen > 100 * 1024 * 1024 || 8 + headerLen > fileBytes) throw new SafetensorsError(`header length ${headerLen} does not fit in ${fileBytes} bytes`);
  if (buf.length < 8 + headerLen) return { headerBytes: 8 + headerLen };
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(Buffer.from(buf.buffer, buf.byteOffset + 8, headerLen).toString('utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new SafetensorsError(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (!header || typeof header !== 'object' || Array.isArray(header)) throw new SafetensorsError('header is not a JSON object');
  const dataStart = 8 + headerLen;
  const dataLen = fileBytes - dataStart;
  const metadata: Record<string, string> = {};
  const entries: RawEntry[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (raw && typeof raw === 'object') for (const [k, v] of Object.entries(raw)) metadata[k] = String(v);
      continue;
    }
    const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e?.dtype !== 'string' || !Object.hasOwn(BYTES, e.dtype)) throw new SafetensorsError(`tensor "${name}": dtype ${String(e?.dtype)} is not one of F32, F16, I8`);
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isInteger(d) && d >= 0)) throw new SafetensorsError(`tensor "${name}": bad shape`);
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !Number.isInteger(off[0]) || !Number.isInteger(off[1]) || off[0] < 0 || off[1] > dataLen) {
      throw new SafetensorsError(`tensor "${name}": data_offsets outside the ${dataLen}-byte data section`);
    }
    if (off[1] - off[0] !== elementCount(e.shape as number[]) * BYTES[e.dtype]) throw new SafetensorsError(`tensor "${name}": shape and data_offsets disagree`);
    entries.push({ name, dtype: e.dtype, shape: e.shape as number[], begin: off[0] as number, end: off[1] as number });
  }
  const sorted = [...entries].sort((a, b) => a.begin - b.begin);
  let expect = 0;
  for (const e of sorted) {
    if (e.begin !== expect) throw new SafetensorsError(`tensor "${e.name}" starts at ${e.begin}, expected ${expect}: gap or overlap in data`);
    expect = e.end;
  }
  if (expect !== dataLen) throw new SafetensorsError(`data section is ${dataLen} bytes but tensors cover ${expect}`);
  return { entries, metadata, dataStart };
}

/** safetensors bytes from raw per-tensor payloads of one dtype (name order, data 8-byte aligned). */
function writeRaw(payloads: { name: string; shape: readonly number[]; bytes: Uint8Array }[], dtype: string, metadata: Record<string, string>): Buffer {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let off = 0;
  for (const p of payloads) {
    header[p.name] = { dtype, shape: [...p.shape], data_offsets: [off, off + p.bytes.length] };
    off += p.bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const h = Buffer.from(json, 'utf8');
  const out = Buffer.allocUnsafe(8 + h.length + off);
  out.writeBigUInt64LE(BigInt(h.length), 0);
  h.copy(out, 8);
  let pos = 8 + h.length;
  for (const p of payloads) {
    out.set(p.bytes, pos);
    pos += p.bytes.length;
  }
  return out;
}

/**
 * A global model as a site downloads it (plan compression.model): the float32 weights encoded as float16 or
 * int8, self-describing like an update. Sites turn it back into float32 safetensors with float32Safetensors().
 */
export function encodeModel(weights: TensorBundle, dtype: Exclude<UpdateDType, 'float32'>): Buffer {
  return encodeUpdate(weights, { update: dtype, delta: false });
}

/** Float32 safetensors bytes of a model or update file of any (non-delta) encoding; plain float32 comes back as is. */
export function float32Safetensors(bytes: Buffer): Buffer {
  const d = decodeUpdate(bytes);
  if (d.isDelta) throw new SafetensorsError('a delta-encoded file is not a model; it needs the base it was taken against');
  if (d.encoding.update === 'float32') return bytes;
  return encodeSafetensors(d.bundle);
}
