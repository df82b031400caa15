import { describe, expect, it } from 'vitest';
import { DEFAULT_AUGMENT } from '../../site-agent/data/augment.ts';
import { augmentOptions, DataSettingsSchema, siteDataOptions } from '../../site-agent/data/settings.ts';

describe('data settings', () => {
  it('defaults are complete and match the module defaults', () => {
    const s = DataSettingsSchema.parse({});
    expect(s).toMatchObject({ normalization: 'auto', ctWindow: [-200, 250], foregroundFraction: 0.33, cacheMiB: 1024 });
    expect(s.spacing).toBeUndefined();
    expect(augmentOptions(s)).toEqual(DEFAULT_AUGMENT);
    expect(siteDataOptions(s, [8, 8, 8])).toEqual({ patch: [8, 8, 8], normalization: 'auto', biasCorrection: 'none', ctWindow: [-200, 250], foregroundFraction: 0.33, cacheBytes: 2 ** 30, carveValidation: true });
  });

  it('refuses bad values, naming them', () => {
    expect(() => DataSettingsSchema.parse({ spacing: [1, 0, 1] })).toThrow(/spacing/);
    expect(() => DataSettingsSchema.parse({ ctWindow: [300, -100] })).toThrow(/low, high/);
    expect(() => DataSettingsSchema.parse({ augment: { noiseProbability: 3 } })).toThrow(/noiseProbability/);
    expect(() => DataSettingsSchema.parse({ bogus: 1 })).toThrow(/bogus/);
    expect(augmentOptions(DataSettingsSchema.parse({ augment: false }))).toBe(false);
    expect(siteDataOptions(DataSettingsSchema.parse({ spacing: [3, 1, 1], cacheMiB: 0.5 }), [4, 4, 4])).toMatchObject({ spacing: [3, 1, 1], cacheBytes: 524288 });
  });
});
