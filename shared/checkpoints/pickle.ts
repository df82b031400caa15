/**
 * A RESTRICTED Python unpickler, enough to read what `torch.save` writes for weights (state dicts,
 * MedicalNet-style `{state_dict: …}` dicts, optimizer states) and nothing more.
 *
 * Safety model: the pickle virtual machine only builds plain data (None, bools, ints, floats, str,
 * bytes, tuples, lists, dicts, sets). Every class or function a pickle names (GLOBAL, STACK_GLOBAL,
 * INST, OBJ) is looked up in an ALLOW-LIST of our own JavaScript implementations; any other name
 * (`os.system`, `builtins.eval`, `subprocess.Popen`, a model class, numpy scalars, …) stops the load
 * with an UnsafePickleError naming it. REDUCE / NEWOBJ / BUILD call only those implementations;
 * nothing in the file is ever executed, imported or evaluated. Sizes read from the file are bounds
 * checked before anything is allocated, and containers are kept in Maps (never plain objects) so
 * keys such as "__proto__" cannot reach prototypes.
 */

// ---------------------------------------------------------------------------------------------
// Python values as seen from JavaScript

/** A Python tuple (JS arrays stand for lists). */
export class PyTuple {
  constructor(readonly items: readonly PyValue[]) {}
}

/** A Python dict or collections.OrderedDict. Keys are str/int/float/bool/None (others are refused). */
export class PyDict extends Map<PyKey, PyValue> {
  /** Attributes set by BUILD (state dicts carry `_metadata`); informational only. */
  readonly attrs = new Map<string, PyValue>();
  constructor(readonly ordered: boolean) {
    super();
  }
}

export class PySet {
  readonly items: PyValue[] = [];
  constructor(readonly frozen: boolean) {}
}

export type TorchDType = 'float32' | 'float64' | 'float16' | 'bfloat16' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

export const DTYPE_BYTES: Readonly<Record<TorchDType, number>> = {
  float32: 4,
  float64: 8,
  float16: 2,
  bfloat16: 2,
  int64: 8,
  int32: 4,
  int16: 2,
  int8: 1,
  uint8: 1,
  bool: 1,
};

/** A storage class global such as `torch.FloatStorage` (or `torch.UntypedStorage`, bytes). */
export class TorchStorageType {
  constructor(
    readonly qualname: string,
    readonly dtype: TorchDType,
  ) {}
}

/** A `torch.float32`-style dtype object. */
export class TorchDTypeObject {
  constructor(readonly dtype: TorchDType) {}
}

/**
 * A storage as the file names it: what the caller's persistentLoad returns. `dtype` is the element
 * type of the storage (uint8 for untyped storages); `numel` counts elements of that type.
 */
export class TorchStorageRef {
  constructor(
    readonly key: string,
    readonly dtype: TorchDType,
    readonly numel: number,
    /** Element offset into the root storage (legacy storage views only). */
    readonly viewOffset = 0,
  ) {}
}

/** The result of `torch._utils._rebuild_tensor*`: a strided view of a storage, not yet read. */
export class TorchTensorRef {
  constructor(
    readonly storage: TorchStorageRef,
    readonly dtype: TorchDType,
    /** In elements of `dtype`. */
    readonly storageOffset: number,
    readonly shape: readonly number[],
    readonly strides: readonly number[],
  ) {}
}

/** An allowed global: either a value (dtype, storage class) or a callable we implement. */
export class PyGlobal {
  constructor(
    readonly qualname: string,
    readonly call?: (args: readonly PyValue[]) => PyValue,
    /** What BUILD does on objects this callable made; omitted = BUILD is refused. */
    readonly build?: (obj: PyValue, state: PyValue) => void,
    readonly value?: PyValue,
  ) {}
}

export type PyKey = string | number | bigint | boolean | null;
export type PyValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | PyTuple
  | PyValue[]
  | PyDict
  | PySet
  | PyGlobal
  | TorchStorageType
  | TorchDTypeObject
  | TorchStorageRef
  | TorchTensorRef;

// ---------------------------------------------------------------------------------------------
// Errors

/** The pickle names something outside the allow-list, i.e. it is not a plain weights checkpoint. */
export class UnsafePickleError extends Error {
  override name = 'UnsafePickleError';
  constructor(
    readonly refused: string,
    detail: string,
  ) {
    super(detail);
  }
}

/** The bytes are not a well-formed pickle (truncated, unknown opcode, stack misuse, bad sizes). */
export class PickleFormatError extends Error {
  override name = 'PickleFormatError';
}

// ---------------------------------------------------------------------------------------------
// The torch weights allow-list

const STORAGE_DTYPES: Readonly<Record<string, TorchDType>> = {
  FloatStorage: 'float32',
  DoubleStorage: 'float64',
  HalfStorage: 'float16',
  BFloat16Storage: 'bfloat16',
  LongStorage: 'int64',
  IntStorage: 'int32',
  ShortStorage: 'int16',
  CharStorage: 'int8',
  ByteStorage: 'uint8',
  BoolStorage: 'bool',
};

const DTYPE_OBJECTS: Readonly<Record<string, TorchDType>> = {
  float32: 'float32',
  float: 'float32',
  float64: 'float64',
  double: 'float64',
  float16: 'float16',
  half: 'float16',
  bfloat16: 'bfloat16',
  int64: 'int64',
  long: 'int64',
  int32: 'int32',
  int: 'int32',
  int16: 'int16',
  short: 'int16',
  int8: 'int8',
  uint8: 'uint8',
  bool: 'bool',
};

function isInt(v: PyValue): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v);
}

function intTuple(v: PyValue, what: string): number[] {
  const items = v instanceof PyTuple ? v.items : Array.isArray(v) ? v : undefined;
  if (!items || !items.every((d) => isInt(d) && d >= 0)) throw new PickleFormatError(`${what} must be a tuple of non-negative integers`);
  return items as number[];
}

function rebuildTensor(fn: string, args: readonly PyValue[], dtypeOverride?: PyValue): TorchTensorRef {
  const [storage, offset, size, stride] = args;
  if (!(storage instanceof TorchStorageRef)) throw new PickleFormatError(`${fn}: first argument is not a storage from this file`);
  if (!isInt(offset) || offset < 0) throw new PickleFormatError(`${fn}: storage offset must be a non-negative integer`);
  const shape = intTuple(size, `${fn}: size`);
  const strides = intTuple(stride, `${fn}: stride`);
  if (shape.length !== strides.length) throw new PickleFormatError(`${fn}: size has ${shape.length} dims but stride has ${strides.length}`);
  let dtype = storage.dtype;
  if (dtypeOverride !== undefined) {
    if (!(dtypeOverride instanceof TorchDTypeObject)) throw new PickleFormatError(`${fn}: dtype argument is not a torch dtype`);
    dtype = dtypeOverride.dtype;
  }
  return new TorchTensorRef(storage, dtype, offset, shape, strides);
}

function ignoreHooks(fn: string, hooks: PyValue | undefined): void {
  // backward_hooks is always an empty OrderedDict in saved weights; anything else would need code.
  if (hooks !== undefined && hooks !== null && !(hooks instanceof PyDict && hooks.size === 0)) {
    throw new UnsafePickleError(fn, `${fn}: tensor carries backward hooks, which cannot be restored without running code`);
  }
}

function makeTorchGlobals(): Map<string, PyGlobal> {
  const g = new Map<string, PyGlobal>();
  const add = (x: PyGlobal) => g.set(x.qualname, x);
  const orderedDict = (name: string) =>
    add(
      new PyGlobal(
        name,
        (args) => {
          const d = new PyDict(true);
          if (args.length > 0) {
            // OrderedDict([(k, v), ...]) — protocol-0/1 pickles and some writers pass the items.
            const items = args[0];
            const list = items instanceof PyTuple ? items.items : Array.isArray(items) ? items : undefined;
            if (args.length > 1 || !list) throw new PickleFormatError(`${name}: unsupported constructor arguments`);
            for (const kv of list) {
              const pair = kv instanceof PyTuple ? kv.items : Array.isArray(kv) ? kv : undefined;
              if (!pair || pair.length !== 2) throw new PickleFormatError(`${name}: items must be (key, value) pairs`);
              d.set(dictKey(pair[0]), pair[1]);
            }
          }
          return d;
        },
        (obj, state) => buildDictAttrs(obj, state),
      ),
    );
  orderedDict('collections.OrderedDict');

  add(new PyGlobal('torch._utils._rebuild_tensor', (a) => rebuildTensor('_rebuild_tensor', a)));
  add(
    new PyGlobal('torch._utils._rebuild_tensor_v2', (a) => {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (a.length < 4 || a.length > 7) throw new PickleFormatError(`_rebuild_tensor_v2: expected 4-7 arguments, got ${a.length}`);
      ignoreHooks('torch._utils._rebuild_tensor_v2', a[5]);
      return rebuildTensor('_rebuild_tensor_v2', a);
    }),
  );
  add(
    new PyGlobal('torch._utils._rebuild_tensor_v3', (a) => {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
      if (a.length < 7 || a.length > 8) throw new PickleFormatError(`_rebuild_tensor_v3: expected 7-8 arguments, got ${a.length}`);
      ignoreHooks('torch._utils._rebuild_tensor_v3', a[5]);
      return rebuildTensor('_rebuild_tensor_v3', a, a[6]);
    }),
  );
  const parameter = (name: string) =>
    add(
      new PyGlobal(name, (a) => {
        // _rebuild_parameter(data, requires_grad, backward_hooks); the _with_state form adds a state
        // (Python attributes on the Parameter), which a weights reader has no use for.
        if (a.length < 3 || !(a[0] instanceof TorchTensorRef)) throw new PickleFormatError(`${name}: expected (tensor, requires_grad, hooks, …)`);
        ignoreHooks(name, a[2]);
        return a[0];
      }),
    );
  parameter('torch._utils._rebuild_parameter');
  parameter('torch._utils._rebuild_parameter_with_state');

  for (const [cls, dtype] of Object.entries(STORAGE_DTYPES)) {
    for (const mod of ['torch', 'torch.cuda']) {
      const q = `${mod}.${cls}`;
      add(new PyGlobal(q, undefined, undefined, new TorchStorageType(q, dtype)));
    }
  }
  for (const q of ['torch.UntypedStorage', 'torch.storage.UntypedStorage', 'torch.storage._UntypedStorage', 'torch.cuda.UntypedStorage']) {
    add(new PyGlobal(q, undefined, undefined, new TorchStorageType(q, 'uint8')));
  }
  for (const [name, dtype] of Object.entries(DTYPE_OBJECTS)) add(new PyGlobal(`torch.${name}`, undefined, undefined, new TorchDTypeObject(dtype)));
  return g;
}

/** The globals a weights-only torch pickle may name. Exported so tests and docs can list them. */
export const TORCH_WEIGHTS_GLOBALS: ReadonlyMap<string, PyGlobal> = makeTorchGlobals();

function buildDictAttrs(obj: PyValue, state: PyValue): void {
  if (!(obj instanceof PyDict)) throw new PickleFormatError('BUILD state for a dict applied to a non-dict');
  // OrderedDict.__reduce__ gives state = instance __dict__ (e.g. {'_metadata': …}) or None.
  let dictState: PyValue = state;
  if (state instanceof PyTuple && state.items.length === 2) dictState = state.items[0];
  if (dictState === null) return;
  if (!(dictState instanceof PyDict)) throw new PickleFormatError('BUILD state for an OrderedDict must be a dict');
  for (const [k, v] of dictState) {
    if (typeof k !== 'string') throw new PickleFormatError('BUILD attribute names must be strings');
    obj.attrs.set(k, v);
  }
}

function dictKey(k: PyValue): PyKey {
  if (k === null || typeof k === 'string' || typeof k === 'number' || typeof k === 'bigint' || typeof k === 'boolean') return k;
  throw new PickleFormatError(`dict key of type ${describe(k)} is not supported (only str, int, float, bool, None)`);
}

function describe(v: PyValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return 'list';
  if (v instanceof Uint8Array) return 'bytes';
  if (typeof v === 'object') return v.constructor.name;
  return typeof v;
}

// ---------------------------------------------------------------------------------------------
// The virtual machine

export interface UnpickleOptions {
  /** Allowed globals by "module.name"; defaults to TORCH_WEIGHTS_GLOBALS. */
  readonly globals?: ReadonlyMap<string, PyGlobal>;
  /** Resolves BINPERSID/PERSID ids (torch storages). Without it persistent ids are refused. */
  readonly persistentLoad?: (pid: PyValue) => PyValue;
  /** Start offset in `bytes` (legacy torch files hold several pickles back to back). */
  readonly offset?: number;
  /** Context for error messages, e.g. the file name. */
  readonly source?: string;
}

export interface UnpickleResult {
  readonly value: PyValue;
  /** Offset just past the STOP opcode. */
  readonly end: number;
}

const MARK = Symbol('mark');
const MAX_LONG_BYTES = 64;
type StackItem = PyValue | typeof MARK;

const NOT_WEIGHTS =
  'the file is not a plain weights checkpoint (it would construct or call arbitrary Python objects when loaded with torch.load). ' +
  'Load it in a trusted Python session and re-save only the tensors, e.g. torch.save(model.state_dict(), "weights.pth"), or convert it to .safetensors';

export function unpickle(bytes: Uint8Array, opts: UnpickleOptions = {}): UnpickleResult {
  const globals = opts.globals ?? TORCH_WEIGHTS_GLOBALS;
  const src = opts.source ? `${opts.source}: ` : '';
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const latin1 = new TextDecoder('latin1');
  let pos = opts.offset ?? 0;
  const stack: StackItem[] = [];
  const memo = new Map<number, PyValue>();
  // Objects made by an allowed callable, so BUILD can use that callable's own build rule.
  const madeBy = new WeakMap<object, PyGlobal>();

  const fail = (msg: string): never => {
    throw new PickleFormatError(`${src}corrupt or unsupported pickle at byte ${pos}: ${msg}`);
  };
  const need = (n: number) => {
    if (n < 0 || pos + n > bytes.length) fail(`needs ${n} more bytes but the data ends at ${bytes.length} (truncated file?)`);
  };
  const u8 = () => (need(1), bytes[pos++]);
  const u16 = () => (need(2), (pos += 2), view.getUint16(pos - 2, true));
  const u32 = () => (need(4), (pos += 4), view.getUint32(pos - 4, true));
  const i32 = () => (need(4), (pos += 4), view.getInt32(pos - 4, true));
  const u64 = () => {
    need(8);
    const v = view.getBigUint64(pos, true);
    pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail('64-bit length too large');
    return Number(v);
  };
  const take = (n: number) => {
    need(n);
    const out = bytes.subarray(pos, pos + n);
    pos += n;
    return out;
  };
  const line = () => {
    const end = bytes.indexOf(0x0a, pos);
    if (end < 0) fail('unterminated text line');
    const s = latin1.decode(bytes.subarray(pos, end));
    pos = end + 1;
    return s;
  };
  const decodeUtf8 = (b: Uint8Array) => {
    try {
      return utf8.decode(b);
    } catch {
      return fail('string is not valid UTF-8');
    }
  };

  const push = (v: PyValue) => stack.push(v);
  const pop = (): PyValue => {
    if (stack.length === 0) fail('stack underflow');
    const v = stack.pop()!;
    if (v === MARK) fail('unexpected MARK on the stack');
    return v as PyValue;
  };
  const top = (): PyValue => {
    if (stack.length === 0) fail('stack underflow');
    const v = stack[stack.length - 1];
    if (v === MARK) fail('unexpected MARK on the stack');
    return v as PyValue;
  };
  const popMark = (): PyValue[] => {
    for (let i = stack.length - 1; i >= 0; i--) {
      if (stack[i] === MARK) {
        const items = stack.slice(i + 1) as PyValue[];
        stack.length = i;
        return items;
      }
    }
    return fail('no MARK on the stack');
  };

  const resolveGlobal = (module: string, name: string): PyGlobal => {
    const q = `${module}.${name}`;
    const g = globals.get(q);
    if (!g && globals === TORCH_WEIGHTS_GLOBALS && /^torch(\.cuda)?\.\w+Storage$/.test(q)) {
      // A tensor type we do not decode (complex, quantized, float8, …): a format limit, not an attack.
      throw new PickleFormatError(
        `${src}tensors stored as "${q}" are not supported (supported element types: ${Object.keys(STORAGE_DTYPES).join(', ')}); convert them to float32 before saving`,
      );
    }
    if (!g) throw new UnsafePickleError(q, `${src}refused to load: the pickle references "${q}", which is not on the allow-list; ${NOT_WEIGHTS}`);
    return g;
  };
  const globalValue = (g: PyGlobal): PyValue => (g.value !== undefined ? g.value : g);
  const call = (fn: PyValue, args: readonly PyValue[], op: string): PyValue => {
    if (!(fn instanceof PyGlobal) || !fn.call) {
      const what = fn instanceof PyGlobal ? fn.qualname : fn instanceof TorchStorageType ? fn.qualname : describe(fn);
      throw new UnsafePickleError(what, `${src}refused to load: ${op} would call "${what}", which is not an allowed callable; ${NOT_WEIGHTS}`);
    }
    const out = fn.call(args);
    if (out !== null && typeof out === 'object') madeBy.set(out, fn);
    return out;
  };
  const argsOf = (v: PyValue, op: string): readonly PyValue[] => {
    if (v instanceof PyTuple) return v.items;
    return fail(`${op} arguments must be a tuple, got ${describe(v)}`);
  };
  const setItems = (d: PyValue, kv: readonly PyValue[]) => {
    if (!(d instanceof PyDict)) fail(`SETITEM(S) on a ${describe(d)}`);
    if (kv.length % 2 !== 0) fail('SETITEMS with an odd number of items');
    for (let i = 0; i < kv.length; i += 2) (d as PyDict).set(dictKey(kv[i]), kv[i + 1]);
  };
  const appendItems = (l: PyValue, items: readonly PyValue[]) => {
    if (!Array.isArray(l)) fail(`APPEND(S) on a ${describe(l)}`);
    for (const it of items) (l as PyValue[]).push(it);
  };
  const memoGet = (i: number) => {
    if (!memo.has(i)) fail(`memo entry ${i} was never stored`);
    return memo.get(i)!;
  };
  const longFrom = (b: Uint8Array): number | bigint => {
    if (b.length === 0) return 0;
    // Checkpoints hold small ints; a huge LONG would only cost quadratic time to decode.
    if (b.length > MAX_LONG_BYTES) fail(`integer of ${b.length} bytes is too large`);
    let v = 0n;
    for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    if (b[b.length - 1] & 0x80) v -= 1n << BigInt(8 * b.length);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  };
  const textInt = (s: string): number | bigint | boolean => {
    const t = s.trim().replace(/L$/, '');
    if (t.length > 2 * MAX_LONG_BYTES) fail('integer literal too long');
    if (t === '00') return false; // protocol 0 spells booleans as INT 00 / 01
    if (t === '01') return true;
    if (!/^[+-]?\d+$/.test(t)) fail(`bad integer literal ${JSON.stringify(s)}`);
    const b = BigInt(t);
    return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b;
  };

  for (;;) {
    const opPos = pos;
    const op = u8();
    switch (op) {
      // ---- framing / protocol
      case 0x80: { // PROTO
        const p = u8();
        if (p > 5) fail(`pickle protocol ${p} is newer than this reader (max 5)`);
        break;
      }
      case 0x95: // FRAME (protocol 4+): an 8-byte length hint; the data follows inline.
        u64();
        break;
      case 0x2e: { // STOP
        const v = pop();
        return { value: v, end: pos };
      }
      // ---- stack manipulation
      case 0x28: // MARK
        stack.push(MARK);
        break;
      case 0x30: // POP
        if (stack.length === 0) fail('stack underflow');
        stack.pop();
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        push(top());
        break;
      // ---- constants
      case 0x4e: // NONE
        push(null);
        break;
      case 0x88: // NEWTRUE
        push(true);
        break;
      case 0x89: // NEWFALSE
        push(false);
        break;
      case 0x4a: // BININT
        push(i32());
        break;
      case 0x4b: // BININT1
        push(u8());
        break;
      case 0x4d: // BININT2
        push(u16());
        break;
      case 0x8a: // LONG1
        push(longFrom(take(u8())));
        break;
      case 0x8b: { // LONG4
        const n = i32();
        if (n < 0) fail('negative LONG4 length');
        push(longFrom(take(n)));
        break;
      }
      case 0x49: // INT (protocol 0)
        push(textInt(line()));
        break;
      case 0x4c: { // LONG (protocol 0)
        const v = textInt(line());
        push(typeof v === 'boolean' ? Number(v) : v);
        break;
      }
      case 0x47: // BINFLOAT (big-endian double)
        need(8);
        push(view.getFloat64(pos, false));
        pos += 8;
        break;
      case 0x46: { // FLOAT (protocol 0)
        const s = line().trim();
        const v = Number(s);
        if (s === '' || (Number.isNaN(v) && !/^[+-]?nan$/i.test(s))) fail(`bad float literal ${JSON.stringify(s)}`);
        push(v);
        break;
      }
      // ---- strings and bytes
      case 0x58: // BINUNICODE
        push(decodeUtf8(take(u32())));
        break;
      case 0x8c: // SHORT_BINUNICODE
        push(decodeUtf8(take(u8())));
        break;
      case 0x8d: // BINUNICODE8
        push(decodeUtf8(take(u64())));
        break;
      case 0x55: // SHORT_BINSTRING (Python 2 str; torch.load decodes with utf-8)
        push(decodeUtf8(take(u8())));
        break;
      case 0x54: { // BINSTRING
        const n = i32();
        if (n < 0) fail('negative BINSTRING length');
        push(decodeUtf8(take(n)));
        break;
      }
      case 0x43: // SHORT_BINBYTES
        push(take(u8()).slice());
        break;
      case 0x42: // BINBYTES
        push(take(u32()).slice());
        break;
      case 0x8e: // BINBYTES8
        push(take(u64()).slice());
        break;
      case 0x96: // BYTEARRAY8
        push(take(u64()).slice());
        break;
      case 0x56: // UNICODE (protocol 0): raw-unicode-escape, i.e. latin-1 plus \uXXXX / \UXXXXXXXX escapes
        push(
          line().replace(/\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})/g, (_m, u4: string | undefined, u8hex: string | undefined) => {
            const cp = parseInt(u4 ?? u8hex!, 16);
            return cp <= 0x10ffff ? String.fromCodePoint(cp) : fail('bad \\U escape');
          }),
        );
        break;
      case 0x53: { // STRING (protocol 0, quoted repr)
        const s = line().trim();
        const m = /^(['"])(.*)\1$/s.exec(s);
        if (!m || m[2].includes('\\')) fail('only simple quoted STRING literals are supported');
        push(m![2]);
        break;
      }
      // ---- containers
      case 0x29: // EMPTY_TUPLE
        push(new PyTuple([]));
        break;
      case 0x85: // TUPLE1
        push(new PyTuple([pop()]));
        break;
      case 0x86: { // TUPLE2
        const b = pop();
        const a = pop();
        push(new PyTuple([a, b]));
        break;
      }
      case 0x87: { // TUPLE3
        const c = pop();
        const b = pop();
        const a = pop();
        push(new PyTuple([a, b, c]));
        break;
      }
      case 0x74: // TUPLE
        push(new PyTuple(popMark()));
        break;
      case 0x5d: // EMPTY_LIST
        push([]);
        break;
      case 0x6c: // LIST
        push(popMark());
        break;
      case 0x61: { // APPEND
        const v = pop();
        appendItems(top(), [v]);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark();
        appendItems(top(), items);
        break;
      }
      case 0x7d: // EMPTY_DICT
        push(new PyDict(false));
        break;
      case 0x64: { // DICT
        const kv = popMark();
        const d = new PyDict(false);
        setItems(d, kv);
        push(d);
        break;
      }
      case 0x73: { // SETITEM
        const v = pop();
        const k = pop();
        setItems(top(), [k, v]);
        break;
      }
      case 0x75: { // SETITEMS
        const kv = popMark();
        setItems(top(), kv);
        break;
      }
      case 0x8f: // EMPTY_SET
        push(new PySet(false));
        break;
      case 0x90: { // ADDITEMS
        const items = popMark();
        const s = top();
        if (!(s instanceof PySet) || s.frozen) fail('ADDITEMS on a non-set');
        for (const it of items) (s as PySet).items.push(it);
        break;
      }
      case 0x91: { // FROZENSET
        const s = new PySet(true);
        for (const it of popMark()) s.items.push(it);
        push(s);
        break;
      }
      // ---- memo
      case 0x71: // BINPUT
        memo.set(u8(), top());
        break;
      case 0x72: // LONG_BINPUT
        memo.set(u32(), top());
        break;
      case 0x70: // PUT (protocol 0)
        memo.set(Number(textInt(line())), top());
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, top());
        break;
      case 0x68: // BINGET
        push(memoGet(u8()));
        break;
      case 0x6a: // LONG_BINGET
        push(memoGet(u32()));
        break;
      case 0x67: // GET (protocol 0)
        push(memoGet(Number(textInt(line()))));
        break;
      // ---- globals and calls: allow-list only
      case 0x63: { // GLOBAL "module\nname\n"
        const module = line();
        const name = line();
        push(globalValue(resolveGlobal(module, name)));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') fail('STACK_GLOBAL needs two strings');
        push(globalValue(resolveGlobal(module as string, name as string)));
        break;
      }
      case 0x69: { // INST "module\nname\n" with MARKed args (protocol 0)
        const cls = resolveGlobal(line(), line());
        push(call(cls, popMark(), 'INST'));
        break;
      }
      case 0x6f: { // OBJ: MARK cls args… (protocol 1)
        const items = popMark();
        if (items.length === 0) fail('OBJ without a class');
        push(call(items[0], items.slice(1), 'OBJ'));
        break;
      }
      case 0x52: { // REDUCE
        const args = pop();
        const fn = pop();
        push(call(fn, argsOf(args, 'REDUCE'), 'REDUCE'));
        break;
      }
      case 0x81: { // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is constructible this way
        const args = pop();
        const cls = pop();
        if (!(cls instanceof PyGlobal) || cls.qualname !== 'collections.OrderedDict') {
          const what = cls instanceof PyGlobal ? cls.qualname : describe(cls);
          throw new UnsafePickleError(what, `${src}refused to load: NEWOBJ would instantiate "${what}"; ${NOT_WEIGHTS}`);
        }
        argsOf(args, 'NEWOBJ');
        push(call(cls, [], 'NEWOBJ'));
        break;
      }
      case 0x92: { // NEWOBJ_EX
        pop();
        pop();
        const cls = pop();
        const what = cls instanceof PyGlobal ? cls.qualname : describe(cls);
        throw new UnsafePickleError(what, `${src}refused to load: NEWOBJ_EX would instantiate "${what}"; ${NOT_WEIGHTS}`);
      }
      case 0x62: { // BUILD
        const state = pop();
        const obj = top();
        const maker = obj !== null && typeof obj === 'object' ? madeBy.get(obj) : undefined;
        if (!maker?.build) {
          const what = maker?.qualname ?? describe(obj);
          throw new UnsafePickleError(what, `${src}refused to load: BUILD would set the state of a "${what}" object; ${NOT_WEIGHTS}`);
        }
        maker.build(obj, state);
        break;
      }
      case 0x51: { // BINPERSID
        const pid = pop();
        if (!opts.persistentLoad) fail('persistent id found but this pickle is not expected to reference external storage');
        push(opts.persistentLoad!(pid));
        break;
      }
      case 0x50: { // PERSID (text)
        const pid = line();
        if (!opts.persistentLoad) fail('persistent id found but this pickle is not expected to reference external storage');
        push(opts.persistentLoad!(pid));
        break;
      }
      case 0x82:
      case 0x83:
      case 0x84: // EXT1/2/4: the copyreg extension registry names arbitrary globals
        throw new UnsafePickleError('copyreg extension', `${src}refused to load: the pickle uses the copyreg extension registry (EXT opcodes); ${NOT_WEIGHTS}`);
      case 0x97:
      case 0x98: // NEXT_BUFFER / READONLY_BUFFER: out-of-band buffers, never in torch files
        fail('out-of-band buffers (protocol 5) are not supported');
        break;
      default:
        pos = opPos;
        fail(`unknown opcode 0x${op.toString(16).padStart(2, '0')}`);
    }
  }
}
