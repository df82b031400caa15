/**
 * The restricted unpickler and the checkpoint reader, against files written by PyTorch 1.13
 * (test/fixtures/pth, made by scripts/make_pth_fixtures.py) and hand-made hostile/broken inputs.
 */
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { zipSync } from 'fflate';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  PickleFormatError,
  PyDict,
  PySet,
  PyTuple,
  type PyValue,
  TORCH_WEIGHTS_GLOBALS,
  UnsafePickleError,
  unpickle,
} from '../../shared/checkpoints/pickle.ts';
import {
  CheckpointFormatError,
  bfloat16ToFloat,
  halfToFloat,
  readCheckpoint,
  readTorchCheckpoint,
  readTorchCheckpointFile,
  tensorToFloat32,
  type TorchTensor,
} from '../../shared/checkpoints/pth.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';

const DIR = join(import.meta.dirname, '..', 'fixtures', 'pth');
const fixture = (name: string) => new Uint8Array(readFileSync(join(DIR, name)));
/** What the malicious fixtures' payloads would create. */
const PWNED = '/tmp/medfl-pickle-pwned';

interface ExpectedTensor {
  dtype: string;
  shape: number[];
  values: number[];
}
const expected = JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8')) as {
  torch_version: string;
  medicalnet_tiny: Record<string, ExpectedTensor>;
  plain_state_dict: Record<string, ExpectedTensor>;
  mixed_dtypes: Record<string, ExpectedTensor>;
  primitives: Record<string, unknown>;
};

/** Values as plain numbers, floats decoded (fp16/bf16 exactly, as torch's .float()). */
function numbers(t: TorchTensor): number[] {
  if (t.dtype === 'float16' || t.dtype === 'bfloat16') return [...tensorToFloat32(t)];
  return Array.from(t.data as ArrayLike<number | bigint>, (x) => Number(x));
}

function expectMatches(tensors: Map<string, TorchTensor>, want: Record<string, ExpectedTensor>) {
  expect([...tensors.keys()].sort()).toEqual(Object.keys(want).sort());
  for (const [k, e] of Object.entries(want)) {
    const t = tensors.get(k)!;
    expect(t.dtype, k).toBe(e.dtype);
    expect(t.shape, k).toEqual(e.shape);
    expect(numbers(t), k).toEqual(e.values);
  }
}

/**
 * Rewrites a legacy CPU checkpoint as if saved from CUDA tensors: GLOBAL torch.X → torch.cuda.X and
 * the location 'cpu' → 'cuda:0'. (Python: torch.load(..., map_location='cpu') reads the result.)
 * Legacy files have no framing, so growing the pickle in place is fine.
 */
function toGpuLegacy(b: Uint8Array): Uint8Array {
  const s = Buffer.from(b).toString('latin1');
  const out = s
    .replace(/ctorch\n(\w+Storage)\n/g, 'ctorch.cuda\n$1\n')
    .replaceAll('X\x03\x00\x00\x00cpu', 'X\x06\x00\x00\x00cuda:0');
  expect(out).toContain('torch.cuda\nFloatStorage');
  expect(out).toContain('cuda:0');
  return new Uint8Array(Buffer.from(out, 'latin1'));
}

describe('reading PyTorch checkpoints', () => {
  it('zip format, MedicalNet layout: state_dict container, module. prefix stripped, every dtype and view exact', () => {
    const c = readCheckpoint(fixture('medicalnet_tiny.pth'), 'medicalnet_tiny.pth');
    expect(c.format).toBe('torch-zip');
    expect(c.container).toBe('state_dict');
    expect(c.strippedPrefix).toBe('module.');
    expect(c.topLevelKeys).toEqual(['state_dict', 'epoch', 'arch']);
    expectMatches(c.tensors, expected.medicalnet_tiny);

    // the awkward ones, explicitly
    const conv = c.tensors.get('conv1.weight')!; // saved as a permuted (non-contiguous) view
    expect(conv.strides).toEqual([54, 27, 9, 3, 1]);
    expect(conv.data).toBeInstanceOf(Float32Array);
    expect(c.tensors.get('bn1.weight')!.shape).toEqual([3]); // offset 5 in a shared 64-float storage
    expect(c.tensors.get('bn1.bias')!.strides).toEqual([1]); // offset 20, stride 2 in the same storage
    expect(c.tensors.get('bn1.running_var')!.data).toBeInstanceOf(Float64Array);
    expect(c.tensors.get('conv_seg.1.running_mean')!.data).toBeInstanceOf(Uint16Array); // fp16 bits
    const nbt = c.tensors.get('bn1.num_batches_tracked')!;
    expect(nbt.shape).toEqual([]);
    expect(nbt.dtype).toBe('int64');
    expect((nbt.data as BigInt64Array)[0]).toBe(7n);
    expect(c.tensors.get('fc.weight')!.shape).toEqual([3, 4]); // an nn.Parameter (_rebuild_parameter)
  });

  it('legacy (pre-1.6, non-zip) format gives the same tensors', () => {
    const legacy = readCheckpoint(fixture('medicalnet_tiny_legacy.pth'), 'legacy');
    expect(legacy.format).toBe('torch-legacy');
    expect(legacy.strippedPrefix).toBe('module.');
    expectMatches(legacy.tensors, expected.medicalnet_tiny);
    const zip = readTorchCheckpoint(fixture('medicalnet_tiny.pth'));
    for (const [k, t] of zip) expect(legacy.tensors.get(k), k).toEqual(t);
  });

  it('a checkpoint saved from GPU tensors (torch.cuda.*Storage, location cuda:0), as MedicalNet trained them', () => {
    const gpu = toGpuLegacy(fixture('medicalnet_tiny_legacy.pth'));
    const c = readCheckpoint(gpu, 'gpu.pth');
    expectMatches(c.tensors, expected.medicalnet_tiny);
  });

  it('plain state dict (no container, no prefix) and the async file reader', async () => {
    const c = await readTorchCheckpointFile(join(DIR, 'plain_state_dict.pth'));
    expect(c.container).toBe('');
    expect(c.strippedPrefix).toBe('');
    expectMatches(c.tensors, expected.plain_state_dict);
  });

  it('floatAs float32 converts float64 / float16 / bfloat16 and records the source dtype', () => {
    const t = readTorchCheckpoint(fixture('medicalnet_tiny.pth'), 'x', { floatAs: 'float32' });
    for (const [k, src] of [['bn1.running_var', 'float64'], ['conv_seg.1.running_mean', 'float16'], ['conv_seg.1.running_var', 'bfloat16']] as const) {
      const x = t.get(k)!;
      expect(x.dtype).toBe('float32');
      expect(x.sourceDtype).toBe(src);
      expect(x.data).toBeInstanceOf(Float32Array);
      expect([...x.data as Float32Array]).toEqual(expected.medicalnet_tiny[k].values.map(Math.fround));
    }
    expect(t.get('bn1.num_batches_tracked')!.dtype).toBe('int64'); // integers are left alone
    expect(() => tensorToFloat32(t.get('bn1.num_batches_tracked')!)).toThrow(/not floating point/);
  });

  it('keeps the module. prefix when asked, or when not every key has it', () => {
    const kept = readTorchCheckpoint(fixture('medicalnet_tiny.pth'), 'x', { stripModulePrefix: false });
    expect([...kept.keys()].every((k) => k.startsWith('module.'))).toBe(true);
    const mixed = encodeSafetensors(
      makeBundle([
        { name: 'module.a', dtype: 'F32', shape: [1], data: new Float32Array([1]) },
        { name: 'b', dtype: 'F32', shape: [1], data: new Float32Array([2]) },
      ]),
    );
    const c = readCheckpoint(mixed, 'mixed.safetensors');
    expect(c.strippedPrefix).toBe('');
    expect([...c.tensors.keys()].sort()).toEqual(['b', 'module.a']);
  });

  it('an explicit container path, and a clear error when it is not there', () => {
    const c = readCheckpoint(fixture('medicalnet_tiny.pth'), 'x', { container: 'state_dict' });
    expect(c.tensors.size).toBe(18);
    expect(() => readCheckpoint(fixture('medicalnet_tiny.pth'), 'x', { container: 'model' })).toThrow(/no "model" in the checkpoint \(top-level keys: state_dict, epoch, arch\)/);
    expect(() => readCheckpoint(fixture('medicalnet_tiny.pth'), 'x', { container: 'epoch' })).toThrow(/"epoch" is a int, not a dict of tensors/);
  });

  it('safetensors with F32/F64/I64/F16', () => {
    const c = readCheckpoint(fixture('mixed_dtypes.safetensors'), 'mixed_dtypes.safetensors');
    expect(c.format).toBe('safetensors');
    expect(c.metadata).toEqual({ format: 'pt' });
    expectMatches(c.tensors, expected.mixed_dtypes);
  });

  it('half and bfloat16 decoding at the edges', () => {
    expect(halfToFloat(0x3c00)).toBe(1);
    expect(halfToFloat(0xc000)).toBe(-2);
    expect(halfToFloat(0x7bff)).toBe(65504);
    expect(halfToFloat(0x0001)).toBe(2 ** -24);
    expect(halfToFloat(0x7c00)).toBe(Infinity);
    expect(halfToFloat(0xfc00)).toBe(-Infinity);
    expect(halfToFloat(0x7e00)).toBeNaN();
    expect(Object.is(halfToFloat(0x8000), -0)).toBe(true);
    expect(bfloat16ToFloat(0x3f80)).toBe(1);
    expect(bfloat16ToFloat(0xc040)).toBe(-3);
  });
});

describe('refusing what is not a plain weights file', () => {
  beforeAll(() => rmSync(PWNED, { force: true }));

  for (const [file, global] of [
    ['malicious_os_system.pth', 'os.system'],
    ['malicious_legacy_eval.pth', 'builtins.eval'],
    // protocol 2 writes subprocess.Popen under its Python 2 name; either way it is not allowed
    ['malicious_popen_in_state_dict.pth', 'commands.Popen'],
  ] as const) {
    it(`${file}: refused, naming ${global}, and nothing ran`, () => {
      let err: unknown;
      try {
        readTorchCheckpoint(fixture(file), file);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(UnsafePickleError);
      expect((err as UnsafePickleError).refused).toBe(global);
      expect((err as Error).message).toContain(`"${global}"`);
      expect((err as Error).message).toContain('not a plain weights checkpoint');
      expect((err as Error).message).toContain(file);
      expect(existsSync(PWNED)).toBe(false);
    });
  }

  it('a whole pickled nn.Module is refused, naming its class', () => {
    expect(() => readTorchCheckpoint(fixture('whole_module.pth'), 'whole_module.pth')).toThrow(/"__main__\.Tiny".*not a plain weights checkpoint.*state_dict\(\)/s);
  });

  it('a TorchScript archive is recognised and refused', () => {
    expect(() => readTorchCheckpoint(fixture('torchscript_conv.pt'), 'torchscript_conv.pt')).toThrow(/TorchScript archive \(torch\.jit\.save\)/);
  });

  it('unsupported formats get messages that say what the file is', () => {
    const tar = new Uint8Array(1024);
    tar.set(new TextEncoder().encode('ustar'), 257);
    const cases: [Uint8Array, RegExp][] = [
      [tar, /tar-based checkpoint format of PyTorch < 0\.4/],
      [new Uint8Array([0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e, 0, 0, 0]), /bare Python pickle, not a torch\.save file/],
      [zipSync({ 'arr_0.npy': new Uint8Array(10) }, { level: 0 }), /zip archive without a data\.pkl \(entries: arr_0\.npy\).*npz/],
      [new Uint8Array([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]), /gzip-compressed/],
      [new Uint8Array([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, 0, 0]), /numpy \.npy/],
      [new Uint8Array([0x89, 0x48, 0x44, 0x46, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0]), /HDF5/],
      [new TextEncoder().encode('hello, I am not a model'), /unrecognised file format \(first bytes 68 65 6c 6c 6f 2c 20 49\)/],
      [new Uint8Array(3), /only 3 bytes/],
    ];
    for (const [bytes, re] of cases) {
      expect(() => readTorchCheckpoint(bytes, 'f')).toThrow(CheckpointFormatError);
      expect(() => readTorchCheckpoint(bytes, 'f')).toThrow(re);
    }
  });

  it('truncated files fail with a format error, not garbage', () => {
    const zip = fixture('medicalnet_tiny.pth');
    expect(() => readTorchCheckpoint(zip.subarray(0, zip.length - 100), 'cut.pth')).toThrow(/cut\.pth: the zip archive cannot be read/);
    const legacy = fixture('medicalnet_tiny_legacy.pth');
    expect(() => readTorchCheckpoint(legacy.subarray(0, legacy.length - 10), 'cut.pth')).toThrow(/file ends inside storage/);
    expect(() => readTorchCheckpoint(legacy.subarray(0, 400), 'cut.pth')).toThrow(PickleFormatError);
    const longer = new Uint8Array(legacy.length + 3);
    longer.set(legacy);
    expect(() => readTorchCheckpoint(longer, 'long.pth')).toThrow(/3 unexpected trailing bytes/);
  });
});

// ---------------------------------------------------------------------------------------------
// Hand-made pickles

const enc = new TextEncoder();
function bytesOf(...parts: (string | number[] | Uint8Array)[]): Uint8Array {
  const chunks = parts.map((p) => (typeof p === 'string' ? Uint8Array.from(p, (c) => c.charCodeAt(0)) : Uint8Array.from(p)));
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}
const u32 = (n: number) => [n & 255, (n >> 8) & 255, (n >> 16) & 255, (n >>> 24) & 255];
const str = (s: string) => {
  const b = enc.encode(s);
  return bytesOf([0x58, ...u32(b.length)], b); // BINUNICODE
};
const int1 = (n: number) => [0x4b, n]; // BININT1
const G = (m: string, n: string) => `c${m}\n${n}\n`; // GLOBAL
const emptyOd = bytesOf(G('collections', 'OrderedDict'), ')R');
/** _rebuild_tensor_v2(storage pid, offset, (shape,), (stride,), False, hooks) for a 1-D float tensor. */
function tensorPickle(numel: number, offset: number, size: number, stride: number, hooks: Uint8Array = emptyOd) {
  return bytesOf(
    G('torch._utils', '_rebuild_tensor_v2'),
    '(',
    '(', str('storage'), G('torch', 'FloatStorage'), str('0'), str('cpu'), int1(numel), 't', 'Q',
    int1(offset), int1(size), [0x85], int1(stride), [0x85], [0x89], hooks,
    't', 'R',
  );
}
const dictWith = (key: string, value: Uint8Array) => bytesOf([0x80, 2], '}', str(key), value, 's', '.');
const zipWith = (pkl: Uint8Array, storages: Record<string, Uint8Array>) =>
  zipSync({ 'archive/data.pkl': pkl, ...Object.fromEntries(Object.entries(storages).map(([k, v]) => [`archive/data/${k}`, v])) }, { level: 0 });

function canonical(v: PyValue): unknown {
  if (v === null || typeof v === 'boolean' || typeof v === 'string' || typeof v === 'number') return v;
  if (typeof v === 'bigint') return { int: v.toString() };
  if (v instanceof Uint8Array) return { bytes: Buffer.from(v).toString('hex') };
  if (v instanceof PyTuple) return { tuple: v.items.map(canonical) };
  if (Array.isArray(v)) return v.map(canonical);
  if (v instanceof PySet) return { [v.frozen ? 'frozenset' : 'set']: v.items.map(canonical).sort((a, b) => ((a as number) < (b as number) ? -1 : 1)) };
  if (v instanceof PyDict) return { [v.ordered ? 'odict' : 'dict']: [...v].map(([k, x]) => [canonical(k), canonical(x)]) };
  throw new Error(`unexpected ${String(v)}`);
}

describe('the restricted unpickler', () => {
  for (const proto of [0, 1, 2, 3, 4, 5]) {
    it(`plain data pickled by Python with protocol ${proto} round-trips exactly`, () => {
      const r = unpickle(fixture(`primitives_p${proto}.pkl`));
      expect(canonical(r.value)).toEqual(expected.primitives[String(proto)]);
    });
  }

  it('memo references give the same object, not a copy', () => {
    const r = unpickle(fixture('primitives_p4.pkl')).value as PyDict;
    const memo = r.get('memo') as PyValue[];
    expect(memo[0]).toBe(memo[1]);
  });

  it('refuses calls, NEWOBJ, BUILD and extension codes outside the allow-list', () => {
    const cases: [Uint8Array, string][] = [
      [bytesOf([0x80, 2], G('torch', 'FloatStorage'), ')R.'), 'torch.FloatStorage'], // a value, not a callable
      [bytesOf([0x80, 2], G('torch._utils', '_rebuild_parameter'), ')', [0x81], '.'), 'torch._utils._rebuild_parameter'], // NEWOBJ
      [bytesOf([0x80, 2], '}', '}', 'b.'), 'PyDict'], // BUILD on a plain dict
      [bytesOf([0x80, 2], [0x82, 1], '.'), 'copyreg extension'], // EXT1
      [bytesOf([0x80, 4], [0x8c, 2], 'os', [0x8c, 5], 'popen', [0x93], '.'), 'os.popen'], // STACK_GLOBAL
      [bytesOf('(', str('true'), 'ios\nsystem\n', '.'), 'os.system'], // INST
      [bytesOf([0x80, 2], G('__builtin__', 'getattr'), '.'), '__builtin__.getattr'],
      [bytesOf([0x80, 2], G('numpy.core.multiarray', '_reconstruct'), '.'), 'numpy.core.multiarray._reconstruct'],
    ];
    for (const [b, refused] of cases) {
      let err: unknown;
      try {
        unpickle(b);
      } catch (e) {
        err = e;
      }
      expect(err, refused).toBeInstanceOf(UnsafePickleError);
      expect((err as UnsafePickleError).refused).toBe(refused);
    }
  });

  it('an unsupported tensor element type is a format error that names it', () => {
    expect(() => unpickle(bytesOf([0x80, 2], G('torch', 'ComplexFloatStorage'), '.'))).toThrow(PickleFormatError);
    expect(() => unpickle(bytesOf([0x80, 2], G('torch', 'ComplexFloatStorage'), '.'))).toThrow(/"torch\.ComplexFloatStorage" are not supported/);
  });

  it('the allow-list is exactly the torch weights names', () => {
    const names = [...TORCH_WEIGHTS_GLOBALS.keys()];
    expect(names).toContain('collections.OrderedDict');
    expect(names).toContain('torch._utils._rebuild_tensor_v2');
    expect(names).toContain('torch.cuda.FloatStorage'); // GPU-saved checkpoints (MedicalNet trained on GPUs)
    expect(names.every((n) => n === 'collections.OrderedDict' || n.startsWith('torch.'))).toBe(true);
  });

  it('malformed pickles fail with PickleFormatError', () => {
    for (const b of [
      bytesOf([0x80, 2], '}'), // no STOP
      bytesOf([0x80, 2], [0xff]), // unknown opcode
      bytesOf([0x80, 2], [0x58, ...u32(1000)], 'abc'), // string longer than the data
      bytesOf([0x80, 2], 'h', [7], '.'), // BINGET of a never-stored memo slot
      bytesOf([0x80, 2], 's.'), // SETITEM on an empty stack
      bytesOf([0x80, 9], '.'), // unknown protocol
      bytesOf([0x80, 2], [0x8b, ...u32(100_000)], new Uint8Array(100_000), '.'), // a 100 KB integer
    ]) {
      expect(() => unpickle(b)).toThrow(PickleFormatError);
    }
  });

  it('"__proto__" keys stay data', () => {
    const r = unpickle(dictWith('__proto__', bytesOf('}', str('polluted'), int1(1), 's'))).value as PyDict;
    expect(r.get('__proto__')).toBeInstanceOf(PyDict);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it('tensors that reach past their storage, missing storages and hooks are rejected', () => {
    const f32 = (n: number) => new Uint8Array(new Float32Array(n).buffer);
    // 10 elements from a 4-element storage
    expect(() => readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(4, 0, 10, 1)), { '0': f32(4) }), 'oob.pth')).toThrow(/reach element 9 of a 4-element storage/);
    // offset + stride beyond the end
    expect(() => readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(8, 3, 3, 3)), { '0': f32(8) }), 'oob.pth')).toThrow(/reach element 9 of a 8-element storage/);
    // the storage file is shorter than the pickle says
    expect(() => readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(8, 0, 8, 1)), { '0': f32(2) }), 'short.pth')).toThrow(/storage 0 has 8 bytes, the pickle says 32/);
    // no storage file at all
    expect(() => readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(4, 0, 4, 1)), {}), 'gone.pth')).toThrow(/archive\/data\/0 is missing/);
    // a backward hook would need code
    const hooks = bytesOf(G('collections', 'OrderedDict'), ')R', int1(0), G('os', 'getcwd'), 's');
    expect(() => readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(4, 0, 4, 1, hooks)), { '0': f32(4) }), 'hooks.pth')).toThrow(/"os\.getcwd"/);
    // and a valid strided one works: elements 1, 4, 7 of 0..7
    const ok = readTorchCheckpoint(zipWith(dictWith('w', tensorPickle(8, 1, 3, 3)), { '0': new Uint8Array(Float32Array.from([0, 1, 2, 3, 4, 5, 6, 7]).buffer) }), 'ok.pth');
    expect([...(ok.get('w')!.data as Float32Array)]).toEqual([1, 4, 7]);
  });

  it('a state dict with non-tensor values, or no state dict at all, is reported with what was found', () => {
    const f32 = new Uint8Array(16);
    const mixed = bytesOf([0x80, 2], '}', '(', str('w'), tensorPickle(4, 0, 4, 1), str('note'), str('hi'), 'u', '.');
    expect(() => readTorchCheckpoint(zipWith(mixed, { '0': f32 }), 'm.pth')).toThrow(/no state dict found: the checkpoint is a dict \(w: tensor, note: str\)/);
    expect(() => readTorchCheckpoint(zipWith(mixed, { '0': f32 }), 'm.pth', { container: '' })).toThrow(/non-tensor entries: note \(str\)/);
    expect(() => readTorchCheckpoint(zipWith(bytesOf([0x80, 2], ']', '.'), {}), 'l.pth')).toThrow(/holds a list, not a dict of tensors/);
  });
});
