import { describe, expect, it } from 'vitest';
import { makeBundle, checkAgainstSpecs, findNonFinite, specsOf } from '../shared/tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors, SafetensorsError } from '../shared/tensors/safetensors.ts';

const bundle = () =>
  makeBundle([
    { name: 'b.bias', dtype: 'F32', shape: [3], data: new Float32Array([1, -2, 3.5]) },
    { name: 'a.weight', dtype: 'F32', shape: [2, 2], data: new Float32Array([0.1, 0.2, 0.3, 0.4]) },
  ]);

describe('safetensors', () => {
  it('round-trips names, shapes, values and metadata', () => {
    const buf = encodeSafetensors(bundle(), { round: '3' });
    expect((8 + Number(buf.readBigUInt64LE(0))) % 8).toBe(0);
    const { bundle: out, metadata } = decodeSafetensors(buf);
    expect([...out.keys()]).toEqual(['a.weight', 'b.bias']);
    expect(out.get('a.weight')!.shape).toEqual([2, 2]);
    expect([...out.get('b.bias')!.data]).toEqual([1, -2, 3.5]);
    expect(metadata).toEqual({ round: '3' });
  });

  it('can return views into the buffer instead of copies', () => {
    const buf = encodeSafetensors(bundle());
    const viewed = decodeSafetensors(buf, { views: true }).bundle.get('b.bias')!.data;
    expect(viewed.buffer).toBe(buf.buffer);
    expect([...viewed]).toEqual([1, -2, 3.5]);
    expect(decodeSafetensors(buf).bundle.get('b.bias')!.data.buffer).not.toBe(buf.buffer);
  });

  it('is byte-identical for the same content whatever the insertion order', () => {
    const b1 = bundle();
    const b2 = makeBundle([...b1.values()].reverse());
    expect(encodeSafetensors(b1).equals(encodeSafetensors(b2))).toBe(true);
  });

  it('refuses truncated data, bad offsets and unknown dtypes with a reason', () => {
    const buf = encodeSafetensors(bundle());
    expect(() => decodeSafetensors(buf.subarray(0, buf.length - 4))).toThrow(/truncated|outside/);
    expect(() => decodeSafetensors(buf.subarray(0, 5))).toThrow(SafetensorsError);
    const header = JSON.stringify({ x: { dtype: 'F64', shape: [1], data_offsets: [0, 8] } });
    const h = Buffer.alloc(8); h.writeBigUInt64LE(BigInt(header.length));
    expect(() => decodeSafetensors(Buffer.concat([h, Buffer.from(header), Buffer.alloc(8)]))).toThrow(/F64 is not supported/);
    const lie = JSON.stringify({ x: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } });
    h.writeBigUInt64LE(BigInt(lie.length));
    expect(() => decodeSafetensors(Buffer.concat([h, Buffer.from(lie), Buffer.alloc(8)]))).toThrow(/needs 12 bytes/);
  });

  it('checks bundles against specs and finds non-finite values', () => {
    const b = bundle();
    expect(checkAgainstSpecs(b, specsOf(b))).toBeUndefined();
    expect(checkAgainstSpecs(b, [{ name: 'a.weight', dtype: 'F32', shape: [4] }, { name: 'b.bias', dtype: 'F32', shape: [3] }])).toMatch(/shape \[2,2\], expected \[4\]/);
    expect(checkAgainstSpecs(b, [{ name: 'a.weight', dtype: 'F32', shape: [2, 2] }])).toMatch(/unknown tensor name\(s\): b.bias/);
    expect(findNonFinite(b)).toBeUndefined();
    const bad = makeBundle([{ name: 'w', dtype: 'F32', shape: [2], data: new Float32Array([1, Number.NaN]) }]);
    expect(findNonFinite(bad)).toMatch(/NaN at index 1/);
  });
});
