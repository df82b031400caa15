/**
 * MRI bias-field correction (site-agent/data/bias-field.ts): the field the synthetic scanners draw (lattice noise,
 * not a polynomial) is mostly removed from a synthetic brain, the anatomy is not mistaken for a field, the
 * background and a lesion's contrast survive, and the plan switch reaches MRI channels only.
 */
import { describe, expect, it } from 'vitest';
import { correctBiasField } from '../../site-agent/data/bias-field.ts';
import { smoothNoise } from '../../site-agent/data/synthetic-brain/fields.ts';
import { preprocessCase } from '../../site-agent/data/preprocess.ts';
import { mulberry32, gaussian } from '../../shared/util/random.ts';
import type { Shape3 } from '../../site-agent/data/types.ts';
import { DataSettingsSchema } from '../../shared/plan/data-settings.ts';
import { normalize } from '../../site-agent/data/normalize.ts';
import { synthesizeCase } from '../../site-agent/data/synthetic-brain/generate.ts';
import { SCANNER_PROFILES } from '../../site-agent/data/synthetic-brain/profiles.ts';
import { BenchmarkOptionsSchema } from '../../site-agent/data/synthetic-brain/options.ts';

const SHAPE: Shape3 = [40, 48, 40];
const SPACING: Shape3 = [2, 2, 2];

/** An ellipsoidal "brain" (0 outside) of three tissues in nested shells, a bright "lesion", and 2 % noise. */
function phantom(seed: number): { tissue: Float32Array; label: Uint8Array } {
  const [D, H, W] = SHAPE;
  const rng = mulberry32(seed);
  const tissue = new Float32Array(D * H * W);
  const label = new Uint8Array(D * H * W);
  for (let z = 0; z < D; z++)
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) {
        const r = Math.hypot((z - D / 2) / (D * 0.45), (y - H / 2) / (H * 0.45), (x - W / 2) / (W * 0.45));
        if (r >= 1) continue;
        const i = (z * H + y) * W + x;
        // Cortex-like grey rim, white core, fluid "ventricles" at the centre.
        let v = r > 0.75 ? 0.68 : r > 0.2 ? 0.5 : 0.15;
        if (Math.hypot(z - 14, y - 30, x - 26) < 3) {
          v = 0.9;
          label[i] = 1;
        }
        tissue[i] = v * (1 + 0.02 * gaussian(rng));
      }
  return { tissue, label };
}

function withField(tissue: Float32Array, strength: number, seed: number): Float32Array {
  const field = smoothNoise(SHAPE, [2, 2, 2], mulberry32(seed));
  return tissue.map((v, i) => v * Math.exp(strength * field[i]));
}

describe('bias-field correction', () => {
  it('on a synthetic brain of the strongest-bias scanner profile, removes most of the field and adds little where there is none', () => {
    // The same subject scanned twice by profile B, with and without its bias field (same anatomy, lesions, noise).
    const profile = SCANNER_PROFILES.find((p) => p.name.startsWith('B-'))!;
    const biased = synthesizeCase(11, profile, BenchmarkOptionsSchema.parse({ seed: 1 })).acquisition;
    const clean = synthesizeCase(11, profile, BenchmarkOptionsSchema.parse({ seed: 1, knobs: { biasScale: 0 } })).acquisition;
    /** Spread (SD over the brain) of log(image / clean image): the field left in `img`. */
    const leftField = (img: Float32Array): number => {
      let n = 0;
      let s = 0;
      let ss = 0;
      for (let i = 0; i < img.length; i++) {
        if (!(img[i] > 0 && clean.image[i] > 0)) continue;
        const d = Math.log(img[i] / clean.image[i]);
        n++;
        s += d;
        ss += d * d;
      }
      return Math.sqrt(ss / n - (s / n) ** 2);
    };
    const before = leftField(biased.image);
    const corrected = correctBiasField(biased.image, biased.shape, biased.spacingMm);
    const after = leftField(corrected.image);
    expect(before).toBeGreaterThan(0.15);
    expect(after).toBeLessThan(before / 3);
    expect(corrected.logFieldSd).toBeGreaterThan(0.12);
    // Anatomy is not read as a field: on the clean scan the correction changes little.
    expect(leftField(correctBiasField(clean.image, clean.shape, clean.spacingMm).image)).toBeLessThan(0.04);
  });

  it('keeps the background at 0 and a bright lesion bright against its surroundings', () => {
    const { tissue, label } = phantom(3);
    const biased = withField(tissue, 0.22, 9);
    const { image } = correctBiasField(biased, SHAPE, SPACING);
    for (let i = 0; i < image.length; i++) if (tissue[i] === 0) expect(image[i]).toBe(0);
    let lesion = 0;
    let n = 0;
    for (let i = 0; i < image.length; i++) if (label[i]) (lesion += image[i]), n++;
    expect(lesion / n / 0.5).toBeGreaterThan(1.5); // white matter stays near its level, the lesion well above it
  });

  it('an unmasked scan (noisy air, no zeros): fits over the head and keeps the air finite and near its level', () => {
    const { tissue } = phantom(5);
    const rng = mulberry32(3);
    const biased = withField(tissue, 0.22, 13).map((v) => (v === 0 ? 0.02 + 0.01 * Math.abs(gaussian(rng)) : v));
    const { image, logFieldSd } = correctBiasField(biased, SHAPE, SPACING);
    expect(logFieldSd).toBeGreaterThan(0.05);
    let airMax = 0;
    for (let i = 0; i < image.length; i++) {
      expect(Number.isFinite(image[i])).toBe(true);
      if (tissue[i] === 0) airMax = Math.max(airMax, image[i]);
    }
    expect(airMax).toBeLessThan(0.15); // still darker than fluid: the clamp keeps the extrapolated field bounded
  });

  it('returns a scan with too little foreground unchanged, and refuses a wrong shape', () => {
    const tiny = new Float32Array(SHAPE[0] * SHAPE[1] * SHAPE[2]);
    tiny[5] = 3;
    const r = correctBiasField(tiny, SHAPE, SPACING);
    expect(r.logFieldSd).toBe(0);
    expect(Array.from(r.image)).toEqual(Array.from(tiny));
    expect(() => correctBiasField(new Float32Array(10), SHAPE, SPACING)).toThrow(/shape/);
  });

  it('the plan switch corrects MRI channels before normalising, and never CT', () => {
    const { tissue } = phantom(4);
    const biased = withField(tissue, 0.22, 11);
    const raw = { shape: SHAPE, spacing: SPACING, channels: [biased, biased] };
    const plain = preprocessCase('c', raw as never, { modalities: ['mri', 'ct'] });
    const corrected = preprocessCase('c', raw as never, { modalities: ['mri', 'ct'], biasCorrection: true });
    expect(Array.from(corrected.channels[0])).toEqual(Array.from(normalize(correctBiasField(biased, SHAPE, SPACING).image, 'mri')));
    expect(Array.from(corrected.channels[0])).not.toEqual(Array.from(plain.channels[0]));
    expect(Array.from(corrected.channels[1])).toEqual(Array.from(plain.channels[1]));
    expect(DataSettingsSchema.parse({}).biasCorrection).toBe('none');
    expect(() => DataSettingsSchema.parse({ biasCorrection: 'n4' })).toThrow();
  });
});
