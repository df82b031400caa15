import { describe, expect, it } from 'vitest';
import { decodeUpdate, encodeUpdate, fromHalf, toHalf, weightsOf } from '../../shared/tensors/update-codec.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { rng } from './helpers.ts';

const r = rng(5);
const base = makeBundle([
  { name: 'enc.w', dtype: 'F32', shape: [30, 500], data: Float32Array.from({ length: 15000 }, () => r()) },
  { name: 'enc.b', dtype: 'F32', shape: [7], data: Float32Array.from({ length: 7 }, () => r() * 3) },
]);
const weights = makeBundle([...base.values()].map((t) => ({ ...t, data: t.data.map((v) => v + 0.01 * r()) })));
const maxErr = (a: TensorBundle, b: TensorBundle) => Math.max(...[...a.values()].flatMap((t) => [...t.data].map((v, i) => Math.abs(v - b.get(t.name)!.data[i]))));

describe('update encodings', () => {
  it('float32 weights stay the same bytes (default plans send exactly what they sent before)', () => {
    const bytes = encodeSafetensors(weights);
    expect(encodeUpdate(bytes, { update: 'float32', delta: false }).equals(bytes)).toBe(true);
    const d = decodeUpdate(bytes, { views: true });
    expect(d.isDelta).toBe(false);
    expect(maxErr(d.bundle, weights)).toBe(0);
  });

  it('float16 and int8 round-trip within their precision; deltas are far more precise than weights at the same bits', () => {
    const sizes: Record<string, number> = {};
    const errs: Record<string, number> = {};
    for (const update of ['float32', 'float16', 'int8'] as const) {
      for (const delta of [false, true]) {
        const bytes = encodeUpdate(encodeSafetensors(weights), { update, delta }, () => base);
        const d = decodeUpdate(bytes);
        expect(d.encoding).toEqual({ update, delta });
        expect(d.isDelta).toBe(delta);
        // A plain safetensors reader still opens it (dtype checks aside), and the header names the shapes.
        const key = `${update}${delta ? '+delta' : ''}`;
        sizes[key] = bytes.length;
        errs[key] = maxErr(weightsOf(d, base), weights);
      }
    }
    expect(errs['float32']).toBe(0);
    expect(errs['float32+delta']).toBeLessThan(1e-6);
    expect(errs['float16']).toBeLessThan(3 * 2 ** -11 * 1.1); // |x| < 3.1: half ulp at 2 is 2^-10
    expect(errs['int8']).toBeLessThan(((3 * 2 + 0.1) / 255) * 0.51 * 2); // per-tensor range/255/2
    expect(errs['int8+delta']).toBeLessThan(0.02 / 255);
    expect(errs['float16+delta']).toBeLessThan(1e-5);
    expect(sizes['float16']).toBeLessThan(0.6 * sizes['float32']);
    expect(sizes['int8']).toBeLessThan(0.45 * sizes['float32']);
  });

  it('half-precision conversion rounds to nearest even and keeps specials', () => {
    for (const v of [0, 1, -2, 0.5, 65504, 6.103515625e-5, 2 ** -24]) expect(fromHalf(toHalf(v))).toBe(v);
    expect(fromHalf(toHalf(1e6))).toBe(Infinity);
    expect(Number.isNaN(fromHalf(toHalf(Number.NaN)))).toBe(true);
    expect(fromHalf(toHalf(1 + 2 ** -11))).toBe(1); // tie → even
    expect(fromHalf(toHalf(1 + 3 * 2 ** -11))).toBe(1 + 2 ** -9);
    expect(Object.is(fromHalf(toHalf(-0)), -0)).toBe(true);
  });

  it('decoding refuses a file whose dtypes contradict its declared encoding', () => {
    const f16 = encodeUpdate(encodeSafetensors(weights), { update: 'float16', delta: false });
    const len = Number(f16.readBigUInt64LE(0));
    const header = JSON.parse(f16.subarray(8, 8 + len).toString('utf8'));
    header.__metadata__['medfl.encoding'] = header.__metadata__['medfl.encoding'].replace('float16', 'int8');
    const h = Buffer.from(JSON.stringify(header));
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(h.length));
    const tampered = Buffer.concat([prefix, h, f16.subarray(8 + len)]);
    expect(() => decodeUpdate(tampered)).toThrow(/is F16, but the encoding says I8/);
    expect(() => decodeSafetensors(f16)).toThrow(/F16 is not supported/); // the plain F32 reader refuses, never misreads
  });
});
