/**
 * Writes a PyTorch state_dict as `torch.save` does (the zip format of torch ≥ 1.6), so `torch.load(FILE)`
 * — `weights_only=True` included — returns an OrderedDict of tensors, without Python on this side.
 *
 * Archive (every entry stored, uncompressed, its data 64-byte aligned like torch.save's own writer, so
 * `torch.load(..., mmap=True)` can map it):
 *   archive/data.pkl   pickle protocol 2: collections.OrderedDict of torch._utils._rebuild_tensor_v2(
 *                      persistent id ('storage', torch.FloatStorage|LongStorage, key, 'cpu', numel), 0, size,
 *                      stride, False, OrderedDict()) — the globals weights_only allows, nothing else
 *   archive/data/N     storage N: the tensor's raw little-endian values, C order
 *   archive/version    "3" (the format version torch.save writes)
 *   archive/byteorder  "little" (torch ≥ 2.1 reads it; older versions ignore it)
 * The reader of the same format is pth.ts; pickle.ts holds the opcode meanings.
 */
export type TorchWriteDType = 'float32' | 'int64';

export interface TorchWriteTensor {
  readonly name: string;
  readonly dtype: TorchWriteDType;
  readonly shape: readonly number[];
  readonly data: Float32Array | BigInt64Array;
}

const STORAGE_CLASS: Record<TorchWriteDType, string> = { float32: 'FloatStorage', int64: 'LongStorage' };
const ARCHIVE = 'archive';
/** torch.save's record alignment (caffe2 serialize kFieldAlignment). */
const ALIGN = 64;

/** Encodes `tensors` (in this order) as a torch.save file of one OrderedDict state_dict. */
export function encodeTorchStateDict(tensors: readonly TorchWriteTensor[]): Buffer {
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new Error('writing PyTorch files needs a little-endian host');
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.name)) throw new Error(`duplicate state_dict key "${t.name}"`);
    seen.add(t.name);
    if (t.shape.some((d) => !Number.isInteger(d) || d < 0)) throw new Error(`"${t.name}": bad shape [${t.shape.join(',')}]`);
    const n = t.shape.reduce((a, b) => a * b, 1);
    const okType = t.dtype === 'float32' ? t.data instanceof Float32Array : t.data instanceof BigInt64Array;
    if (!okType || t.data.length !== n) throw new Error(`"${t.name}": ${t.dtype} [${t.shape.join(',')}] needs ${n} values of that type, got ${t.data.length} (${t.data.constructor.name})`);
  }
  const entries: { name: string; data: Uint8Array }[] = [{ name: `${ARCHIVE}/data.pkl`, data: statePickle(tensors) }];
  tensors.forEach((t, i) => entries.push({ name: `${ARCHIVE}/data/${i}`, data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) }));
  entries.push({ name: `${ARCHIVE}/version`, data: Buffer.from('3\n') });
  entries.push({ name: `${ARCHIVE}/byteorder`, data: Buffer.from('little') });
  return storedZip(entries);
}

// ---------------------------------------------------------------------------------------------
// Pickle, protocol 2 (opcodes as in CPython's pickletools)

class PickleWriter {
  private readonly parts: Buffer[] = [];
  op(code: string): this {
    this.parts.push(Buffer.from(code, 'latin1'));
    return this;
  }
  global(module: string, name: string): this {
    return this.op(`c${module}\n${name}\n`);
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf8');
    const head = Buffer.alloc(5);
    head[0] = 0x58; // BINUNICODE
    head.writeUInt32LE(b.length, 1);
    this.parts.push(head, b);
    return this;
  }
  int(v: number): this {
    if (!Number.isSafeInteger(v)) throw new Error(`pickle: ${v} is not a safe integer`);
    if (v >= 0 && v < 0x100) this.parts.push(Buffer.from([0x4b, v])); // BININT1
    else if (v >= 0 && v < 0x10000) this.parts.push(Buffer.from([0x4d, v & 0xff, v >>> 8])); // BININT2
    else if (v >= -0x80000000 && v < 0x80000000) {
      const b = Buffer.alloc(5);
      b[0] = 0x4a; // BININT
      b.writeInt32LE(v, 1);
      this.parts.push(b);
    } else {
      const b = Buffer.alloc(10);
      b[0] = 0x8a; // LONG1, 8 bytes two's complement
      b[1] = 8;
      b.writeBigInt64LE(BigInt(v), 2);
      this.parts.push(b);
    }
    return this;
  }
  intTuple(vs: readonly number[]): this {
    if (vs.length === 0) return this.op(')'); // EMPTY_TUPLE
    this.op('(');
    for (const v of vs) this.int(v);
    return this.op('t');
  }
  bytes(): Buffer {
    return Buffer.concat(this.parts);
  }
}

function statePickle(tensors: readonly TorchWriteTensor[]): Buffer {
  const p = new PickleWriter();
  p.op('\x80\x02'); // PROTO 2
  p.global('collections', 'OrderedDict').op(')R'); // OrderedDict()
  // SETITEMS in batches of 1000 pairs, as pickle itself does (keeps the unpickler's stack small).
  for (let start = 0; start < tensors.length; start += 1000) {
    p.op('(');
    tensors.slice(start, start + 1000).forEach((t, j) => {
      const key = start + j;
      const strides: number[] = new Array<number>(t.shape.length);
      let acc = 1;
      for (let i = t.shape.length - 1; i >= 0; i--) {
        strides[i] = acc;
        acc *= t.shape[i];
      }
      p.str(t.name);
      p.global('torch._utils', '_rebuild_tensor_v2').op('(');
      p.op('(').str('storage').global('torch', STORAGE_CLASS[t.dtype]).str(String(key)).str('cpu').int(t.data.length).op('t').op('Q'); // BINPERSID
      p.int(0).intTuple(t.shape).intTuple(strides);
      p.op('\x89'); // NEWFALSE: requires_grad
      p.global('collections', 'OrderedDict').op(')R'); // backward hooks
      p.op('tR');
    });
    p.op('u'); // SETITEMS
  }
  return p.op('.').bytes();
}

// ---------------------------------------------------------------------------------------------
// Zip, stored entries only

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** DOS date 1980-01-01 00:00: fixed, so the same weights always give the same bytes. */
const DOS_DATE = 0x21;
const PAD_FIELD_ID = 0x4246; // "FB", the id torch.save's writer gives its alignment padding

function storedZip(entries: readonly { name: string; data: Uint8Array }[]): Buffer {
  if (entries.length > 0xffff) throw new Error(`zip: ${entries.length} entries need zip64, which this writer does not write`);
  const parts: Uint8Array[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const crc = crc32(e.data);
    const size = e.data.byteLength;
    // Pad with an extra field so the data starts on an ALIGN boundary (a field is ≥ 4 bytes: id + length).
    let pad = (ALIGN - ((offset + 30 + name.length) % ALIGN)) % ALIGN;
    if (pad > 0 && pad < 4) pad += ALIGN;
    const extra = Buffer.alloc(pad);
    if (pad > 0) {
      extra.writeUInt16LE(PAD_FIELD_ID, 0);
      extra.writeUInt16LE(pad - 4, 2);
    }
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4); // version needed
    local.writeUInt16LE(0, 6); // flags
    local.writeUInt16LE(0, 8); // method: stored
    local.writeUInt16LE(0, 10); // time
    local.writeUInt16LE(DOS_DATE, 12);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(size, 18);
    local.writeUInt32LE(size, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(pad, 28);
    const cd = Buffer.alloc(46);
    cd.writeUInt32LE(0x02014b50, 0);
    cd.writeUInt16LE(20, 4); // made by
    cd.writeUInt16LE(20, 6); // needed
    cd.writeUInt16LE(0, 8);
    cd.writeUInt16LE(0, 10);
    cd.writeUInt16LE(0, 12);
    cd.writeUInt16LE(DOS_DATE, 14);
    cd.writeUInt32LE(crc, 16);
    cd.writeUInt32LE(size, 20);
    cd.writeUInt32LE(size, 24);
    cd.writeUInt16LE(name.length, 28);
    // extra (30), comment (32), disk (34), internal (36), external (38) attributes: 0
    cd.writeUInt32LE(offset, 42);
    central.push(cd, name);
    parts.push(local, name, extra, e.data);
    offset += 30 + name.length + pad + size;
    if (offset > 0xffffffff) throw new Error('zip: the file would exceed 4 GiB, which needs zip64 (not written); export a narrower model');
  }
  const cdBytes = Buffer.concat(central);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(cdBytes.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...parts, cdBytes, end]);
}
