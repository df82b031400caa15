import { describe, expect, it } from 'vitest';
import { modalityOf, normalize, normalizeCt, normalizeMri } from '../../site-agent/data/normalize.ts';

describe('intensity normalisation', () => {
  it('CT: clips to the HU window and scales it to [0, 1]', () => {
    const hu = Float32Array.from([-1000, -200, 25, 250, 3000]);
    expect([...normalizeCt(hu, [-200, 250])]).toEqual([0, 0, 0.5, 1, 1]);
    expect(() => normalizeCt(hu, [10, 10])).toThrow(/lo < hi/);
  });

  it('MRI: z-score over nonzero voxels, background stays 0', () => {
    const a = new Float32Array(1000);
    for (let i = 0; i < 600; i++) a[i] = 200 + 30 * Math.sin(i);
    const { data, stats } = normalizeMri(a);
    expect(stats.foregroundVoxels).toBe(600);
    let m = 0;
    for (let i = 0; i < 600; i++) m += data[i];
    m /= 600;
    let v = 0;
    for (let i = 0; i < 600; i++) v += (data[i] - m) ** 2;
    expect(m).toBeCloseTo(0, 5);
    expect(Math.sqrt(v / 600)).toBeCloseTo(1, 4);
    expect(data.subarray(600).every((x) => x === 0)).toBe(true);
  });

  it('MRI: a constant or almost empty volume does not blow up', () => {
    const c = normalizeMri(new Float32Array(100).fill(5));
    expect(c.data.every((x) => x === 0)).toBe(true);
    const e = new Float32Array(1000);
    e[3] = 7;
    expect(normalizeMri(e).data.every(Number.isFinite)).toBe(true);
  });

  it('picks the modality from dataset.json channel names', () => {
    expect(['CT', ' ct ', 'T1', 'FLAIR', 'MRI', undefined].map(modalityOf)).toEqual(['ct', 'ct', 'mri', 'mri', 'mri', 'mri']);
    const x = Float32Array.from([1, 2, 3]);
    expect(normalize(x, 'none')).toBe(x);
  });
});
