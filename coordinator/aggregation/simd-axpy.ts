/**
 * acc += w·x over float32, in WebAssembly SIMD (f32x4), hand-assembled so nothing has to be installed.
 * Plain JS loops reach 1.5–3.5 GB/s on this loop; f32x4 runs at memory speed (bench/README.md), which is
 * what lets FedAvg keep up with updates arriving at wire speed. Operands live in the module's memory:
 * an arena holding the running sums and a staging area for one update, so memory stays O(model).
 */

/** The slice of the WebAssembly API used here (tsconfig's lib has no WebAssembly types). */
interface WasmApi {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { exports: Record<string, unknown> };
}

const leb = (n: number): number[] => {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n !== 0) b |= 0x80;
    out.push(b);
  } while (n !== 0);
  return out;
};

/** (func $axpy (param $acc i32) (param $x i32) (param $bytes i32) (param $w f32)): 16 bytes a step. */
function moduleBytes(): Uint8Array {
  const section = (id: number, body: number[]) => [id, ...leb(body.length), ...body];
  const str = (s: string) => [s.length, ...Buffer.from(s)];
  const body = [
    0x02, 0x01, 0x7f, 0x01, 0x7b, // locals: end i32 (4), wv v128 (5)
    0x20, 0x03, 0xfd, 0x13, 0x21, 0x05, // wv = f32x4.splat(w)
    0x20, 0x00, 0x20, 0x02, 0x6a, 0x21, 0x04, // end = acc + bytes
    0x02, 0x40, 0x03, 0x40, // block loop
    0x20, 0x00, 0x20, 0x04, 0x4f, 0x0d, 0x01, // if acc >= end: break
    0x20, 0x00, // address for the store
    0x20, 0x00, 0xfd, 0x00, 0x04, 0x00, // v128.load acc
    0x20, 0x01, 0xfd, 0x00, 0x04, 0x00, // v128.load x
    0x20, 0x05, 0xfd, 0xe6, 0x01, // f32x4.mul
    0xfd, 0xe4, 0x01, // f32x4.add
    0xfd, 0x0b, 0x04, 0x00, // v128.store
    0x20, 0x00, 0x41, 0x10, 0x6a, 0x21, 0x00, // acc += 16
    0x20, 0x01, 0x41, 0x10, 0x6a, 0x21, 0x01, // x += 16
    0x0c, 0x00, 0x0b, 0x0b, 0x0b, // br loop; end; end; end
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [0x01, 0x60, 0x04, 0x7f, 0x7f, 0x7f, 0x7d, 0x00]), // (i32 i32 i32 f32) → ()
    ...section(3, [0x01, 0x00]),
    ...section(5, [0x01, 0x00, 0x01]), // memory, min 1 page (grown to fit)
    ...section(7, [0x02, ...str('axpy'), 0x00, 0x00, ...str('mem'), 0x02, 0x00]),
    ...section(10, [0x01, ...leb(body.length), ...body]),
  ]);
}

/** 32-bit wasm memory tops out at 4 GiB; keep clear of it. */
const MAX_ARENA_FLOATS = Math.floor((4 * 1024 ** 3 - 65536) / 4);

export interface SimdArena {
  /** The whole arena as float32: [0, floats) are the sums, [floats, floats + stagingFloats) the staging area. */
  readonly mem: Float32Array;
  readonly floats: number;
  readonly stagingFloats: number;
  /** sums[off … off+n) += w · staging[off … off+n) (needs a full-size staging area) */
  axpyFromStaging(off: number, n: number, w: number): void;
  /** sums[off … off+n) += w · staging[stagingOff … stagingOff+n) */
  axpyBlock(off: number, stagingOff: number, n: number, w: number): void;
}

/**
 * An arena for `floats` sums plus a staging area (by default as many floats; a smaller one lets callers
 * stage updates block by block, so the arena costs one model instead of two), or undefined where wasm
 * SIMD is unavailable.
 */
export function createSimdArena(floats: number, stagingFloats = floats): SimdArena | undefined {
  const WA = (globalThis as unknown as { WebAssembly?: WasmApi }).WebAssembly;
  if (!WA || floats + stagingFloats > MAX_ARENA_FLOATS) return undefined;
  let inst: { exports: Record<string, unknown> };
  try {
    inst = new WA.Instance(new WA.Module(moduleBytes()));
  } catch {
    return undefined; // no SIMD in this runtime
  }
  const memory = inst.exports.mem as { buffer: ArrayBuffer; grow(pages: number): number };
  memory.grow(Math.ceil(((floats + stagingFloats) * 4) / 65536));
  const fn = inst.exports.axpy as (acc: number, x: number, bytes: number, w: number) => void;
  const mem = new Float32Array(memory.buffer);
  const block = (off: number, x: number, n: number, w: number) => {
    const n4 = n - (n % 4);
    fn(off * 4, x * 4, n4 * 4, w);
    for (let i = n4; i < n; i++) mem[off + i] += w * mem[x + i];
  };
  return {
    mem,
    floats,
    stagingFloats,
    axpyFromStaging(off, n, w) {
      if (off + n > stagingFloats) throw new RangeError(`staging holds ${stagingFloats} floats; use axpyBlock`);
      block(off, floats + off, n, w);
    },
    axpyBlock(off, stagingOff, n, w) {
      block(off, floats + stagingOff, n, w);
    },
  };
}

/**
 * The float64 variant: sums[i] += w · f64(x[i]), 4 floats a step (two f64x2 lanes pairs). Updates stay float32 on
 * the wire and in staging; only the running sums are float64, so huge but finite values (3e38 from one site)
 * cannot overflow the sum (float64 reaches 1.8e308) and rounding no longer grows with the number of sites.
 * (func $axpy64 (param $acc i32) (param $x i32) (param $xBytes i32) (param $w f64))
 */
function moduleBytes64(): Uint8Array {
  const section = (id: number, body: number[]) => [id, ...leb(body.length), ...body];
  const str = (s: string) => [s.length, ...Buffer.from(s)];
  const half = (offset: number) => [
    0x20, 0x00, // address for the store
    0x20, 0x00, 0xfd, 0x00, 0x04, offset, // v128.load acc (+offset)
    0x20, 0x01, 0xfd, 0x5d, 0x03, offset / 2, // v128.load64_zero x (+offset/2): two floats
    0xfd, 0x5f, // f64x2.promote_low_f32x4
    0x20, 0x05, 0xfd, 0xf2, 0x01, // f64x2.mul by wv
    0xfd, 0xf0, 0x01, // f64x2.add
    0xfd, 0x0b, 0x04, offset, // v128.store (+offset)
  ];
  const body = [
    0x02, 0x01, 0x7f, 0x01, 0x7b, // locals: end i32 (4), wv v128 (5)
    0x20, 0x03, 0xfd, 0x14, 0x21, 0x05, // wv = f64x2.splat(w)
    0x20, 0x01, 0x20, 0x02, 0x6a, 0x21, 0x04, // end = x + xBytes
    0x02, 0x40, 0x03, 0x40, // block loop
    0x20, 0x01, 0x20, 0x04, 0x4f, 0x0d, 0x01, // if x >= end: break
    ...half(0),
    ...half(16),
    0x20, 0x00, 0x41, 0x20, 0x6a, 0x21, 0x00, // acc += 32
    0x20, 0x01, 0x41, 0x10, 0x6a, 0x21, 0x01, // x += 16
    0x0c, 0x00, 0x0b, 0x0b, 0x0b, // br loop; end; end; end
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [0x01, 0x60, 0x04, 0x7f, 0x7f, 0x7f, 0x7c, 0x00]), // (i32 i32 i32 f64) → ()
    ...section(3, [0x01, 0x00]),
    ...section(5, [0x01, 0x00, 0x01]),
    ...section(7, [0x02, ...str('axpy'), 0x00, 0x00, ...str('mem'), 0x02, 0x00]),
    ...section(10, [0x01, ...leb(body.length), ...body]),
  ]);
}

/** Float64 sums plus a float32 staging block, in one WebAssembly memory. */
export interface SimdArena64 {
  readonly floats: number;
  readonly stagingFloats: number;
  /** The running sums, [0, floats). */
  readonly sums: Float64Array;
  /** Where an update block is copied before it is folded. */
  readonly staging: Float32Array;
  /** sums[off … off+n) += w · staging[stagingOff … stagingOff+n) */
  axpyBlock(off: number, stagingOff: number, n: number, w: number): void;
}

/** An arena of `floats` float64 sums and `stagingFloats` float32 staging slots, or undefined where wasm SIMD is unavailable. */
export function createSimdArena64(floats: number, stagingFloats: number): SimdArena64 | undefined {
  const WA = (globalThis as unknown as { WebAssembly?: WasmApi }).WebAssembly;
  const bytes = floats * 8 + stagingFloats * 4;
  if (!WA || bytes > 4 * MAX_ARENA_FLOATS) return undefined;
  let inst: { exports: Record<string, unknown> };
  try {
    inst = new WA.Instance(new WA.Module(moduleBytes64()));
  } catch {
    return undefined;
  }
  const memory = inst.exports.mem as { buffer: ArrayBuffer; grow(pages: number): number };
  memory.grow(Math.ceil(bytes / 65536));
  const fn = inst.exports.axpy as (acc: number, x: number, xBytes: number, w: number) => void;
  const sums = new Float64Array(memory.buffer, 0, floats);
  const staging = new Float32Array(memory.buffer, floats * 8, stagingFloats);
  return {
    floats,
    stagingFloats,
    sums,
    staging,
    axpyBlock(off, stagingOff, n, w) {
      const n4 = n - (n % 4);
      fn(off * 8, floats * 8 + stagingOff * 4, n4 * 4, w);
      for (let i = n4; i < n; i++) sums[off + i] += w * staging[stagingOff + i];
    },
  };
}
