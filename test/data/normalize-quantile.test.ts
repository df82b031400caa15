/**
 * Quantile (rank-based inverse-normal) normalisation: invariant to any monotone contrast curve, standard normal
 * over the foreground, background kept where the MRI z-score keeps it.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { normalize, normalizeQuantile, normalQuantile } from '../../site-agent/data/normalize.ts';
import { writeNifti } from '../../site-agent/data/nifti.ts';
import { SiteData } from '../../site-agent/data/site-data.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

/** A skull-stripped-like volume: zeros outside a ball, noisy tissue with a bright blob inside. */
function maskedVolume(seed: number): Float32Array {
  const rng = mulberry32(seed);
  const n = 24;
  const out = new Float32Array(n ** 3);
  for (let z = 0; z < n; z++) for (let y = 0; y < n; y++) for (let x = 0; x < n; x++) {
    const r = Math.hypot(z - 12, y - 12, x - 12);
    if (r > 10) continue;
    const blob = Math.hypot(z - 9, y - 12, x - 14) < 3 ? 0.6 : 0;
    out[(z * n + y) * n + x] = 1 + 0.3 * Math.cos(z / 3) + blob + 0.05 * gaussian(rng);
  }
  return out;
}

describe('quantile normalisation', () => {
  it('computes standard-normal quantiles', () => {
    expect(normalQuantile(0.5)).toBeCloseTo(0, 12);
    expect(normalQuantile(0.975)).toBeCloseTo(1.959964, 5);
    expect(normalQuantile(0.001)).toBeCloseTo(-3.090232, 5);
    expect(normalQuantile(1 - 1e-6)).toBeCloseTo(4.753424, 4);
    expect(() => normalQuantile(1)).toThrow(/0 < p < 1/);
  });

  it('gives the same volume whatever monotone contrast curve the scanner applied (the z-score does not)', () => {
    const v = maskedVolume(1);
    // A compressed bright end (lesions pushed towards grey matter), as a 1.5 T profile, and a gamma curve.
    const curves = [(x: number) => (x < 1.2 ? x : 1.2 + 0.4 * (x - 1.2)), (x: number) => 300 * x ** 2.2];
    const q = normalizeQuantile(v);
    for (const f of curves) {
      const w = v.map((x) => (x === 0 ? 0 : f(x)));
      expect(Array.from(normalizeQuantile(w))).toEqual(Array.from(q));
      const zs = normalize(w, 'mri');
      const z0 = normalize(v, 'mri');
      expect(Math.max(...zs.map((x, i) => Math.abs(x - z0[i])))).toBeGreaterThan(0.1);
    }
  });

  it('is standard normal over the foreground and keeps a masked background at 0; ties share a value', () => {
    const v = maskedVolume(2);
    const q = normalizeQuantile(v);
    const fg = Array.from(q).filter((_, i) => v[i] !== 0);
    const mean = fg.reduce((a, b) => a + b, 0) / fg.length;
    const sd = Math.sqrt(fg.reduce((a, b) => a + (b - mean) ** 2, 0) / fg.length);
    expect(Math.abs(mean)).toBeLessThan(1e-3);
    expect(sd).toBeGreaterThan(0.95);
    expect(sd).toBeLessThan(1.02);
    for (let i = 0; i < v.length; i++) if (v[i] === 0) expect(q[i]).toBe(0);
    const ties = Float32Array.from([0, 0, 0, 0, 0, 5, 5, 5, 7, 9]);
    const t = normalizeQuantile(ties);
    expect(t[5]).toBe(t[6]);
    expect(t[6]).toBe(t[7]);
    // Mid-rank 1 of 5 foreground voxels → Φ⁻¹(1.5 / 5); the largest → Φ⁻¹(4.5 / 5).
    expect(t[5]).toBeCloseTo(normalQuantile(1.5 / 5), 6);
    expect(t[9]).toBeCloseTo(normalQuantile(4.5 / 5), 6);
  });

  it('ranks an unmasked scan against its body, air taking the lowest quantile, and leaves a constant image at 0', () => {
    const rng = mulberry32(3);
    const v = Float32Array.from({ length: 4000 }, (_, i) => (i < 2000 ? 0.01 * Math.abs(gaussian(rng)) + 0.001 : 1 + 0.1 * gaussian(rng)));
    const q = normalizeQuantile(v);
    const air = Array.from(q.subarray(0, 2000));
    expect(new Set(air).size).toBe(1);
    expect(air[0]).toBeLessThanOrEqual(Math.min(...q.subarray(2000)));
    expect(Array.from(normalizeQuantile(new Float32Array(10).fill(3)))).toEqual(new Array(10).fill(0));
  });

  it('is what a site loads with data.normalization quantile: two scanners one contrast curve apart give the same case', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-quantile-'));
    try {
      mkdirSync(join(dir, 'imagesTr'));
      mkdirSync(join(dir, 'labelsTr'));
      const v = maskedVolume(4);
      const label = Uint8Array.from(v, (x) => (x > 1.5 ? 1 : 0));
      const dims: [number, number, number] = [24, 24, 24];
      await writeNifti(join(dir, 'imagesTr', 'a_0000.nii.gz'), { data: v, dims, spacing: [1, 1, 1] });
      await writeNifti(join(dir, 'imagesTr', 'b_0000.nii.gz'), { data: v.map((x) => (x === 0 ? 0 : 2000 * Math.sqrt(x))), dims, spacing: [1, 1, 1] });
      for (const c of ['a', 'b']) await writeNifti(join(dir, 'labelsTr', `${c}.nii.gz`), { data: label, dims, spacing: [1, 1, 1] });
      writeFileSync(join(dir, 'dataset.json'), JSON.stringify({ name: 'q', modality: { '0': 'MRI' }, labels: { '0': 'background', '1': 'lesion' }, numTraining: 2 }));
      const quantile = await SiteData.open(dir, { patch: [8, 8, 8], normalization: 'quantile' });
      const [a, b] = [await quantile.load(quantile.train[0]), await quantile.load(quantile.train[1])];
      // Equal up to float32 rounding of the curve (two nearly equal intensities may become one, a tie).
      const diff = (p: Float32Array, q: Float32Array) => p.reduce((m, x, i) => Math.max(m, Math.abs(x - q[i])), 0);
      expect(diff(a!.channels[0], b!.channels[0])).toBeLessThan(1e-3);
      const zscore = await SiteData.open(dir, { patch: [8, 8, 8] });
      const [za, zb] = [await zscore.load(zscore.train[0]), await zscore.load(zscore.train[1])];
      expect(diff(za!.channels[0], zb!.channels[0])).toBeGreaterThan(0.1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
