/**
 * Reads PyTorch checkpoints (`.pth`/`.pt` from torch.save) and `.safetensors` files into plain typed
 * arrays, without Python and without executing anything (see pickle.ts for the allow-list).
 *
 * Formats:
 * - torch ≥ 1.6 zip: `<folder>/data.pkl` + `<folder>/data/<key>` storages (folder name varies).
 * - legacy (torch 0.4 – 1.5, or `_use_new_zipfile_serialization=False`): pickled magic number,
 *   protocol version, sys info, the object pickle, the storage key list, then each storage as an
 *   int64 element count followed by its raw bytes. MedicalNet's 2019 releases are in this format.
 * - safetensors: F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL.
 * Refused with a message saying what the file is: pre-0.4 tar checkpoints, TorchScript archives,
 * zips without data.pkl, raw pickles, numpy, HDF5, gzip, big-endian files and anything unrecognised.
 *
 * Where the weights are looked for, in order (or `opts.container`, a dotted path, when given):
 * the top-level object itself when it is a dict of tensors (a plain state dict); else the first of
 * the keys `state_dict` (MedicalNet), `model_state_dict`, `model`, `net`, `network` whose value is a
 * dict of tensors. Other top-level entries (epoch, optimizer state, …) are parsed but ignored.
 * Every value of the chosen dict must be a tensor. A `module.` prefix (DataParallel) is stripped
 * when ALL keys carry it.
 *
 * Every tensor comes back as a C-order contiguous copy: storage offsets, strides (transposed or
 * sliced views saved as is) and tensors sharing a storage are resolved against the storage bytes,
 * with bounds checked before anything is read.
 */
import { readFile } from 'node:fs/promises';
import { unzipSync } from 'fflate';
import {
  DTYPE_BYTES,
  PyDict,
  PyTuple,
  TorchStorageRef,
  TorchStorageType,
  TorchTensorRef,
  type PyValue,
  type TorchDType,
  unpickle,
} from './pickle.ts';

export type { TorchDType } from './pickle.ts';
export { UnsafePickleError, PickleFormatError } from './pickle.ts';

/** float16/bfloat16 data are the raw 16-bit patterns (use tensorToFloat32 or floatAs: 'float32'). */
export type TorchData = Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array;

export interface TorchTensor {
  readonly dtype: TorchDType;
  readonly shape: readonly number[];
  /** C-order strides (in elements) of `data`, which is always a contiguous copy. */
  readonly strides: readonly number[];
  readonly data: TorchData;
  /** The dtype in the file, when it differs from `dtype` (after floatAs: 'float32'). */
  readonly sourceDtype?: TorchDType;
}

export interface ReadCheckpointOptions {
  /** 'float32' converts float64/float16/bfloat16 tensors to Float32Array; default 'native'. */
  readonly floatAs?: 'native' | 'float32';
  /** Dotted path of the dict holding the weights, e.g. "state_dict" or "model.ema"; default: see above. */
  readonly container?: string;
  /** Strip a `module.` prefix shared by all keys (default true). */
  readonly stripModulePrefix?: boolean;
}

export type CheckpointFormat = 'torch-zip' | 'torch-legacy' | 'safetensors';

export interface CheckpointContents {
  readonly format: CheckpointFormat;
  /** Key path of the weights inside the saved object ('' = the object itself). */
  readonly container: string;
  /** The prefix removed from every key, or '' when none was. */
  readonly strippedPrefix: string;
  /** Top-level keys of the saved object (informational: e.g. epoch, optimizer). */
  readonly topLevelKeys: readonly string[];
  /** safetensors `__metadata__`, else empty. */
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: Map<string, TorchTensor>;
}

/** The file is not something this reader accepts; the message says what it is and what to do. */
export class CheckpointFormatError extends Error {
  override name = 'CheckpointFormatError';
}

const MODULE_PREFIX = 'module.';
const CONTAINER_KEYS = ['state_dict', 'model_state_dict', 'model', 'net', 'network'] as const;
const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;
const LEGACY_PROTOCOL = 1001;
/** A state-dict pickle is a few hundred KB even for ResNet-200; anything huge is not one. */
const MAX_PICKLE_BYTES = 256 * 1024 * 1024;
/** Largest single tensor we allocate (bytes). */
const MAX_TENSOR_BYTES = 2 ** 32;

export async function readTorchCheckpointFile(path: string, opts: ReadCheckpointOptions = {}): Promise<CheckpointContents> {
  const bytes = await readFile(path);
  return readCheckpoint(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), path, opts);
}

/** Tensors by (prefix-stripped) key. See readCheckpoint for the details of what was found. */
export function readTorchCheckpoint(bytes: Uint8Array, name?: string, opts: ReadCheckpointOptions = {}): Map<string, TorchTensor> {
  return readCheckpoint(bytes, name, opts).tensors;
}

export function readCheckpoint(bytes: Uint8Array, name = 'checkpoint', opts: ReadCheckpointOptions = {}): CheckpointContents {
  if (!hostIsLittleEndian()) throw new CheckpointFormatError(`${name}: big-endian hosts are not supported`);
  const kind = sniff(bytes, name);
  let contents: Omit<CheckpointContents, 'strippedPrefix'>;
  if (kind === 'safetensors') contents = readSafetensorsAnyDtype(bytes, name);
  else {
    const loaded = kind === 'zip' ? loadZip(bytes, name) : loadLegacy(bytes, name);
    contents = extractWeights(loaded, name, opts, kind === 'zip' ? 'torch-zip' : 'torch-legacy');
  }
  let tensors = contents.tensors;
  let strippedPrefix = '';
  if ((opts.stripModulePrefix ?? true) && tensors.size > 0 && [...tensors.keys()].every((k) => k.startsWith(MODULE_PREFIX))) {
    strippedPrefix = MODULE_PREFIX;
    tensors = new Map([...tensors].map(([k, v]) => [k.slice(MODULE_PREFIX.length), v]));
  }
  if (opts.floatAs === 'float32') {
    for (const [k, t] of tensors) {
      if (t.dtype === 'float64' || t.dtype === 'float16' || t.dtype === 'bfloat16') {
        tensors.set(k, { dtype: 'float32', shape: t.shape, strides: t.strides, data: tensorToFloat32(t), sourceDtype: t.dtype });
      }
    }
  }
  return { ...contents, tensors, strippedPrefix };
}

// ---------------------------------------------------------------------------------------------
// Format detection

type Kind = 'zip' | 'legacy' | 'safetensors';

function sniff(b: Uint8Array, name: string): Kind {
  const hex = [...b.subarray(0, 8)].map((x) => x.toString(16).padStart(2, '0')).join(' ');
  if (b.length < 8) throw new CheckpointFormatError(`${name}: file is only ${b.length} bytes: empty or truncated, not a checkpoint`);
  if (b[0] === 0x50 && b[1] === 0x4b && b[2] === 0x03 && b[3] === 0x04) return 'zip';
  if (b.length > 262 && ascii(b.subarray(257, 262)) === 'ustar') {
    throw new CheckpointFormatError(
      `${name}: this is the tar-based checkpoint format of PyTorch < 0.4, which is not supported; ` +
        'load it with an old PyTorch and re-save it with torch.save(state_dict, path) (any PyTorch ≥ 1.6)',
    );
  }
  // safetensors first: its header length can start with 0x80 too; its 9th byte is always '{'.
  const headerLen = new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true);
  if (headerLen > 1n && headerLen + 8n <= BigInt(b.length) && b[8] === 0x7b /* { */) return 'safetensors';
  if (b[0] === 0x80 && b[1] >= 2 && b[1] <= 5) {
    let first: PyValue;
    try {
      first = unpickle(b, { globals: new Map(), source: name }).value;
    } catch {
      first = null;
    }
    if (first === LEGACY_MAGIC) return 'legacy';
    throw new CheckpointFormatError(
      `${name}: a bare Python pickle, not a torch.save file (no PyTorch magic number); ` +
        'plain pickles are refused because loading them can run code. Re-save with torch.save(state_dict, path)',
    );
  }
  if (b[0] === 0x1f && b[1] === 0x8b) throw new CheckpointFormatError(`${name}: gzip-compressed data; decompress it first (gunzip)`);
  if (b[0] === 0x93 && ascii(b.subarray(1, 6)) === 'NUMPY') throw new CheckpointFormatError(`${name}: a numpy .npy array, not a PyTorch checkpoint`);
  if (b[0] === 0x89 && ascii(b.subarray(1, 4)) === 'HDF') throw new CheckpointFormatError(`${name}: an HDF5 file (Keras .h5?), not a PyTorch checkpoint`);
  throw new CheckpointFormatError(
    `${name}: unrecognised file format (first bytes ${hex}); expected a PyTorch .pth/.pt checkpoint (zip or legacy) or .safetensors`,
  );
}

function ascii(b: Uint8Array): string {
  return String.fromCharCode(...b);
}

// ---------------------------------------------------------------------------------------------
// Loading the object graph: zip and legacy

interface Loaded {
  readonly root: PyValue;
  /** Bytes of a root storage by key (lazily extracted). */
  readonly storageBytes: (key: string) => Uint8Array;
  readonly storages: Map<string, TorchStorageRef>;
}

function storageRefFromPid(pid: PyValue, name: string, legacy: boolean, storages: Map<string, TorchStorageRef>, roots: Map<string, { dtype: TorchDType; numel: number }>): TorchStorageRef {
  const items = pid instanceof PyTuple ? pid.items : undefined;
  if (!items || items[0] !== 'storage') {
    const tag = items && typeof items[0] === 'string' ? `"${items[0]}"` : 'malformed';
    throw new CheckpointFormatError(`${name}: unsupported persistent id (${tag}); only tensor storages are expected in a weights file`);
  }
  const [, type, key, location, numel, view] = items;
  if (!(type instanceof TorchStorageType) || typeof key !== 'string' || typeof location !== 'string' || typeof numel !== 'number' || !Number.isSafeInteger(numel) || numel < 0) {
    throw new CheckpointFormatError(`${name}: malformed storage reference ${describeShort(pid)}`);
  }
  if (!legacy && items.length !== 5) throw new CheckpointFormatError(`${name}: storage reference has ${items.length} fields, expected 5`);
  const root = roots.get(key);
  if (root && (root.dtype !== type.dtype || root.numel !== numel)) {
    throw new CheckpointFormatError(`${name}: storage ${key} is referenced with two different types or sizes`);
  }
  roots.set(key, { dtype: type.dtype, numel });
  if (legacy && view !== undefined && view !== null) {
    // (view_key, offset, view_size): a view of the root storage, all in elements.
    const v = view instanceof PyTuple ? view.items : [];
    const [viewKey, offset, size] = v;
    if (typeof viewKey !== 'string' || typeof offset !== 'number' || typeof size !== 'number' || offset < 0 || size < 0 || offset + size > numel) {
      throw new CheckpointFormatError(`${name}: malformed storage view ${describeShort(view)}`);
    }
    const id = `${key}@${viewKey}`;
    let ref = storages.get(id);
    if (!ref) storages.set(id, (ref = new TorchStorageRef(key, type.dtype, size, offset)));
    return ref;
  }
  let ref = storages.get(key);
  if (!ref) storages.set(key, (ref = new TorchStorageRef(key, type.dtype, numel)));
  return ref;
}

function describeShort(v: PyValue): string {
  if (v instanceof PyTuple) return `(${v.items.map(describeShort).join(', ')})`;
  if (typeof v === 'string') return JSON.stringify(v);
  if (v instanceof TorchStorageType) return v.qualname;
  return String(v);
}

function loadZip(bytes: Uint8Array, name: string): Loaded {
  const entries: { name: string; size: number; originalSize: number; compression: number }[] = [];
  try {
    unzipSync(bytes, {
      filter: (f) => {
        entries.push({ name: f.name, size: f.size, originalSize: f.originalSize, compression: f.compression });
        return false;
      },
    });
  } catch (e) {
    throw new CheckpointFormatError(`${name}: the zip archive cannot be read (${(e as Error).message}); truncated or corrupt file?`);
  }
  const pkls = entries.filter((e) => /^[^/]+\/data\.pkl$/.test(e.name) || e.name === 'data.pkl');
  if (pkls.length === 0) {
    const shown = entries.slice(0, 5).map((e) => e.name).join(', ');
    throw new CheckpointFormatError(`${name}: a zip archive without a data.pkl (entries: ${shown}${entries.length > 5 ? ', …' : ''}): not a torch.save file (a .npz or other zip?)`);
  }
  if (pkls.length > 1) throw new CheckpointFormatError(`${name}: the zip holds several data.pkl files (${pkls.map((e) => e.name).join(', ')}); expected one`);
  const pklName = pkls[0].name;
  const prefix = pklName.slice(0, pklName.length - 'data.pkl'.length);
  if (entries.some((e) => e.name === `${prefix}constants.pkl` || e.name.startsWith(`${prefix}code/`))) {
    throw new CheckpointFormatError(
      `${name}: a TorchScript archive (torch.jit.save), not a weights checkpoint; ` +
        'export the weights with torch.save(torch.jit.load(path).state_dict(), "weights.pth")',
    );
  }
  const byIndex = new Map(entries.map((e) => [e.name, e]));
  for (const e of entries) {
    if (e.compression !== 0 && e.compression !== 8) throw new CheckpointFormatError(`${name}: zip entry ${e.name} uses compression method ${e.compression}; only stored/deflate are supported`);
  }
  if (pkls[0].originalSize > MAX_PICKLE_BYTES) throw new CheckpointFormatError(`${name}: data.pkl is ${pkls[0].originalSize} bytes, too large for a weights pickle`);
  const extract = (entry: string): Uint8Array => {
    const out = unzipSync(bytes, { filter: (f) => f.name === entry });
    const data = out[entry];
    if (!data) throw new CheckpointFormatError(`${name}: zip entry ${entry} could not be extracted`);
    return data;
  };
  const byteorder = byIndex.has(`${prefix}byteorder`) ? ascii(extract(`${prefix}byteorder`)).trim() : 'little';
  if (byteorder !== 'little') throw new CheckpointFormatError(`${name}: saved on a ${byteorder}-endian machine; only little-endian checkpoints are supported`);

  const storages = new Map<string, TorchStorageRef>();
  const roots = new Map<string, { dtype: TorchDType; numel: number }>();
  const root = unpickle(extract(pklName), {
    source: name,
    persistentLoad: (pid) => storageRefFromPid(pid, name, false, storages, roots),
  }).value;
  return {
    root,
    storages,
    storageBytes: (key) => {
      const entry = `${prefix}data/${key}`;
      const info = byIndex.get(entry);
      if (!info) throw new CheckpointFormatError(`${name}: storage ${key} is referenced but ${entry} is missing from the archive (truncated file?)`);
      const r = roots.get(key)!;
      const needBytes = r.numel * DTYPE_BYTES[r.dtype];
      if (info.originalSize < needBytes) throw new CheckpointFormatError(`${name}: storage ${key} has ${info.originalSize} bytes, the pickle says ${needBytes}`);
      return extract(entry);
    },
  };
}

function loadLegacy(bytes: Uint8Array, name: string): Loaded {
  // Header pickles hold only ints and dicts: no globals at all are allowed there.
  const noGlobals = { globals: new Map(), source: name };
  let pos = unpickle(bytes, noGlobals).end; // magic number, checked by sniff
  const proto = unpickle(bytes, { ...noGlobals, offset: pos });
  if (proto.value !== LEGACY_PROTOCOL) throw new CheckpointFormatError(`${name}: legacy torch file with protocol version ${String(proto.value)}, expected ${LEGACY_PROTOCOL}`);
  const sys = unpickle(bytes, { ...noGlobals, offset: proto.end });
  if (sys.value instanceof PyDict && sys.value.get('little_endian') === false) {
    throw new CheckpointFormatError(`${name}: saved on a big-endian machine; only little-endian checkpoints are supported`);
  }
  pos = sys.end;
  const storages = new Map<string, TorchStorageRef>();
  const roots = new Map<string, { dtype: TorchDType; numel: number }>();
  const main = unpickle(bytes, { source: name, offset: pos, persistentLoad: (pid) => storageRefFromPid(pid, name, true, storages, roots) });
  const keysPickle = unpickle(bytes, { ...noGlobals, offset: main.end });
  const keys = keysPickle.value;
  if (!Array.isArray(keys) || !keys.every((k) => typeof k === 'string')) throw new CheckpointFormatError(`${name}: legacy storage key list is malformed`);
  // Storage data follow in key order, each as int64 element count + raw bytes.
  const located = new Map<string, Uint8Array>();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  pos = keysPickle.end;
  for (const key of keys as string[]) {
    const r = roots.get(key);
    if (!r) throw new CheckpointFormatError(`${name}: storage ${key} is listed but never referenced`);
    if (pos + 8 > bytes.length) throw new CheckpointFormatError(`${name}: file ends before storage ${key} (truncated?)`);
    const count = view.getBigInt64(pos, true);
    if (count !== BigInt(r.numel)) throw new CheckpointFormatError(`${name}: storage ${key} holds ${count} elements, the pickle says ${r.numel}`);
    const n = r.numel * DTYPE_BYTES[r.dtype];
    if (pos + 8 + n > bytes.length) throw new CheckpointFormatError(`${name}: file ends inside storage ${key} (truncated?)`);
    located.set(key, bytes.subarray(pos + 8, pos + 8 + n));
    pos += 8 + n;
  }
  if (pos !== bytes.length) throw new CheckpointFormatError(`${name}: ${bytes.length - pos} unexpected trailing bytes after the last storage`);
  return {
    root: main.value,
    storages,
    storageBytes: (key) => {
      const b = located.get(key);
      if (!b) throw new CheckpointFormatError(`${name}: storage ${key} is referenced but its data is not in the file`);
      return b;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Finding the state dict and materialising tensors

function isTensorDict(v: PyValue | undefined): v is PyDict {
  return v instanceof PyDict && v.size > 0 && [...v.values()].every((x) => x instanceof TorchTensorRef);
}

function extractWeights(loaded: Loaded, name: string, opts: ReadCheckpointOptions, format: CheckpointFormat): Omit<CheckpointContents, 'strippedPrefix'> {
  const root = loaded.root;
  const topLevelKeys = root instanceof PyDict ? [...root.keys()].map(String) : [];
  let dict: PyValue | undefined;
  let container = '';
  if (opts.container !== undefined) {
    dict = root;
    for (const part of opts.container.split('.').filter((p) => p !== '')) {
      if (!(dict instanceof PyDict) || !dict.has(part)) throw new CheckpointFormatError(`${name}: no "${opts.container}" in the checkpoint (top-level keys: ${topLevelKeys.join(', ') || 'none'})`);
      dict = dict.get(part);
    }
    container = opts.container;
  } else if (isTensorDict(root)) {
    dict = root;
  } else if (root instanceof PyDict) {
    for (const k of CONTAINER_KEYS) {
      if (isTensorDict(root.get(k))) {
        dict = root.get(k);
        container = k;
        break;
      }
    }
    if (dict === undefined) {
      const desc = [...root].map(([k, v]) => `${String(k)}: ${kindOf(v)}`).slice(0, 12).join(', ');
      throw new CheckpointFormatError(
        `${name}: no state dict found: the checkpoint is a dict (${desc}) with no tensor-only dict under ${CONTAINER_KEYS.join('/')}; ` +
          'name the key holding the weights explicitly',
      );
    }
  } else {
    throw new CheckpointFormatError(`${name}: the checkpoint holds a ${kindOf(root)}, not a dict of tensors`);
  }
  if (!(dict instanceof PyDict)) throw new CheckpointFormatError(`${name}: "${container}" is a ${kindOf(dict ?? null)}, not a dict of tensors`);
  const bad = [...dict].filter(([k, v]) => typeof k !== 'string' || !(v instanceof TorchTensorRef));
  if (bad.length > 0) {
    throw new CheckpointFormatError(
      `${name}: the state dict${container ? ` "${container}"` : ''} holds non-tensor entries: ` +
        bad.slice(0, 10).map(([k, v]) => `${String(k)} (${kindOf(v)})`).join(', ') + (bad.length > 10 ? `, … (${bad.length} in all)` : ''),
    );
  }
  const cache = new Map<string, Uint8Array>();
  const tensors = new Map<string, TorchTensor>();
  for (const [k, v] of dict) {
    const ref = v as TorchTensorRef;
    let storage = cache.get(ref.storage.key);
    if (!storage) cache.set(ref.storage.key, (storage = loaded.storageBytes(ref.storage.key)));
    tensors.set(k as string, materialize(ref, storage, `${name}: tensor "${String(k)}"`));
  }
  return { format, container, topLevelKeys, metadata: {}, tensors };
}

function kindOf(v: PyValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return 'list';
  if (v instanceof PyDict) return v.ordered ? 'OrderedDict' : 'dict';
  if (v instanceof TorchTensorRef) return 'tensor';
  if (v instanceof PyTuple) return 'tuple';
  if (v instanceof Uint8Array) return 'bytes';
  if (typeof v === 'object') return v.constructor.name;
  return typeof v === 'number' ? (Number.isInteger(v) ? 'int' : 'float') : typeof v === 'string' ? 'str' : typeof v;
}

export function contiguousStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

function typedFromBytes(dtype: TorchDType, buf: ArrayBuffer): TorchData {
  switch (dtype) {
    case 'float32':
      return new Float32Array(buf);
    case 'float64':
      return new Float64Array(buf);
    case 'float16':
    case 'bfloat16':
      return new Uint16Array(buf);
    case 'int64':
      return new BigInt64Array(buf);
    case 'int32':
      return new Int32Array(buf);
    case 'int16':
      return new Int16Array(buf);
    case 'int8':
      return new Int8Array(buf);
    case 'uint8':
    case 'bool':
      return new Uint8Array(buf);
  }
}

/** A contiguous copy of the strided view `ref` of `storage` (the root storage's bytes). */
function materialize(ref: TorchTensorRef, storage: Uint8Array, what: string): TorchTensor {
  const eb = DTYPE_BYTES[ref.dtype];
  const sb = DTYPE_BYTES[ref.storage.dtype];
  const viewStart = ref.storage.viewOffset * sb;
  const viewBytes = ref.storage.numel * sb;
  if (viewStart + viewBytes > storage.length) throw new CheckpointFormatError(`${what}: storage is ${storage.length} bytes, the pickle says at least ${viewStart + viewBytes}`);
  const shape = [...ref.shape];
  let numel = 1;
  for (const d of shape) {
    numel *= d;
    if (numel * eb > MAX_TENSOR_BYTES) throw new CheckpointFormatError(`${what}: shape [${shape.join(',')}] is larger than ${MAX_TENSOR_BYTES} bytes`);
  }
  const strides = contiguousStrides(shape);
  if (numel === 0) return { dtype: ref.dtype, shape, strides, data: typedFromBytes(ref.dtype, new ArrayBuffer(0)) };
  let maxIndex = ref.storageOffset;
  for (let i = 0; i < shape.length; i++) maxIndex += (shape[i] - 1) * ref.strides[i];
  const firstByte = viewStart + ref.storageOffset * eb;
  const endByte = viewStart + (maxIndex + 1) * eb;
  if (endByte > viewStart + viewBytes) {
    throw new CheckpointFormatError(
      `${what}: offset ${ref.storageOffset}, shape [${shape.join(',')}], stride [${ref.strides.join(',')}] reach element ${maxIndex} of a ${Math.floor(viewBytes / eb)}-element storage`,
    );
  }
  const contiguous = shape.every((d, i) => d === 1 || ref.strides[i] === strides[i]);
  const out = new ArrayBuffer(numel * eb);
  if (contiguous) {
    new Uint8Array(out).set(storage.subarray(firstByte, firstByte + numel * eb));
    return { dtype: ref.dtype, shape, strides, data: typedFromBytes(ref.dtype, out) };
  }
  // Strided gather, element by element in C order, on word-typed views (exact bit copies).
  const region = new ArrayBuffer(endByte - firstByte);
  new Uint8Array(region).set(storage.subarray(firstByte, endByte));
  const words = eb === 8 ? 2 : 1;
  const W = eb === 1 ? Uint8Array : eb === 2 ? Uint16Array : Uint32Array;
  const src = new W(region);
  const dst = new W(out);
  const rank = shape.length;
  const idx = new Array<number>(rank).fill(0);
  const last = rank - 1;
  const innerN = shape[last];
  const innerS = ref.strides[last] * words;
  let o = 0;
  for (;;) {
    let base = 0;
    for (let i = 0; i < last; i++) base += idx[i] * ref.strides[i];
    base *= words;
    if (words === 1) {
      for (let j = 0, s = base; j < innerN; j++, s += innerS) dst[o++] = src[s];
    } else {
      for (let j = 0, s = base; j < innerN; j++, s += innerS) {
        dst[o++] = src[s];
        dst[o++] = src[s + 1];
      }
    }
    let d = last - 1;
    while (d >= 0) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
      d--;
    }
    if (d < 0) break;
  }
  return { dtype: ref.dtype, shape, strides, data: typedFromBytes(ref.dtype, out) };
}

// ---------------------------------------------------------------------------------------------
// Conversions

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac === 0 ? sign * Infinity : NaN;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export function bfloat16ToFloat(b: number): number {
  u32Scratch[0] = b << 16;
  return f32Scratch[0];
}

/**
 * The values of a floating tensor as float32 (float64 is rounded; values beyond float32 range
 * become ±Inf, which callers that check finiteness will report). Integer and bool tensors are refused.
 */
export function tensorToFloat32(t: TorchTensor): Float32Array {
  switch (t.dtype) {
    case 'float32':
      return t.data as Float32Array;
    case 'float64':
      return Float32Array.from(t.data as Float64Array);
    case 'float16': {
      const src = t.data as Uint16Array;
      const out = new Float32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = halfToFloat(src[i]);
      return out;
    }
    case 'bfloat16': {
      const src = t.data as Uint16Array;
      const out = new Uint32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = src[i] << 16;
      return new Float32Array(out.buffer);
    }
    default:
      throw new CheckpointFormatError(`a ${t.dtype} tensor is not floating point`);
  }
}

export function isFloatingDType(d: TorchDType): boolean {
  return d === 'float32' || d === 'float64' || d === 'float16' || d === 'bfloat16';
}

// ---------------------------------------------------------------------------------------------
// safetensors with all common dtypes (shared/tensors/safetensors.ts reads F32 only)

const ST_DTYPES: Readonly<Record<string, TorchDType>> = {
  F32: 'float32',
  F64: 'float64',
  F16: 'float16',
  BF16: 'bfloat16',
  I64: 'int64',
  I32: 'int32',
  I16: 'int16',
  I8: 'int8',
  U8: 'uint8',
  BOOL: 'bool',
};

function readSafetensorsAnyDtype(buf: Uint8Array, name: string): Omit<CheckpointContents, 'strippedPrefix'> {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > MAX_PICKLE_BYTES || 8 + headerLen > buf.length) throw new CheckpointFormatError(`${name}: safetensors header length ${headerLen} does not fit in ${buf.length} bytes`);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(8, 8 + headerLen)));
  } catch (e) {
    throw new CheckpointFormatError(`${name}: safetensors header is not valid JSON: ${(e as Error).message}`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) throw new CheckpointFormatError(`${name}: safetensors header is not a JSON object`);
  const dataStart = 8 + headerLen;
  const dataLen = buf.length - dataStart;
  const metadata: Record<string, string> = {};
  const entries: { key: string; dtype: TorchDType; shape: number[]; begin: number; end: number }[] = [];
  for (const [key, raw] of Object.entries(header as Record<string, unknown>)) {
    if (key === '__metadata__') {
      if (raw && typeof raw === 'object') for (const [k, v] of Object.entries(raw)) metadata[k] = String(v);
      continue;
    }
    const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e?.dtype !== 'string' || !Array.isArray(e.shape) || !Array.isArray(e.data_offsets) || e.data_offsets.length !== 2) {
      throw new CheckpointFormatError(`${name}: tensor "${key}": header entry needs dtype, shape and data_offsets`);
    }
    const dtype = ST_DTYPES[e.dtype];
    if (!Object.hasOwn(ST_DTYPES, e.dtype)) throw new CheckpointFormatError(`${name}: tensor "${key}": dtype ${e.dtype} is not supported (${Object.keys(ST_DTYPES).join(', ')})`);
    const shape = e.shape as unknown[];
    if (!shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) throw new CheckpointFormatError(`${name}: tensor "${key}": bad shape ${JSON.stringify(shape)}`);
    const [begin, end] = e.data_offsets as unknown[];
    if (!Number.isSafeInteger(begin) || !Number.isSafeInteger(end) || (begin as number) < 0 || (end as number) < (begin as number) || (end as number) > dataLen) {
      throw new CheckpointFormatError(`${name}: tensor "${key}": data_offsets ${JSON.stringify(e.data_offsets)} outside the ${dataLen}-byte data section`);
    }
    const numel = (shape as number[]).reduce((a, d) => a * d, 1);
    if ((end as number) - (begin as number) !== numel * DTYPE_BYTES[dtype]) {
      throw new CheckpointFormatError(`${name}: tensor "${key}": shape [${shape.join(',')}] ${dtype} needs ${numel * DTYPE_BYTES[dtype]} bytes, offsets give ${(end as number) - (begin as number)}`);
    }
    entries.push({ key, dtype, shape: shape as number[], begin: begin as number, end: end as number });
  }
  const sorted = [...entries].sort((a, b) => a.begin - b.begin);
  let expect = 0;
  for (const e of sorted) {
    if (e.begin !== expect) throw new CheckpointFormatError(`${name}: tensor "${e.key}" starts at ${e.begin}, expected ${expect}: gap or overlap in the data`);
    expect = e.end;
  }
  if (expect !== dataLen) throw new CheckpointFormatError(`${name}: data section is ${dataLen} bytes but tensors cover ${expect}: truncated or trailing bytes`);
  const tensors = new Map<string, TorchTensor>();
  for (const e of entries) {
    const out = new ArrayBuffer(e.end - e.begin);
    new Uint8Array(out).set(buf.subarray(dataStart + e.begin, dataStart + e.end));
    tensors.set(e.key, { dtype: e.dtype, shape: e.shape, strides: contiguousStrides(e.shape), data: typedFromBytes(e.dtype, out) });
  }
  return { format: 'safetensors', container: '', topLevelKeys: [], metadata, tensors };
}

let littleEndian: boolean | undefined;
function hostIsLittleEndian(): boolean {
  if (littleEndian === undefined) littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  return littleEndian;
}
