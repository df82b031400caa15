import { describe, expect, it } from 'vitest';
import { generatedSiteName, siteLetters, SITE_NAME_PATTERN } from '../../shared/protocol/site-names.ts';

describe('generated site names', () => {
  it('run site-a … site-z, then site-aa, site-ab, … and never leave the letters', () => {
    expect([0, 1, 25].map(generatedSiteName)).toEqual(['site-a', 'site-b', 'site-z']);
    expect([26, 27, 51, 52, 701, 702].map(siteLetters)).toEqual(['aa', 'ab', 'az', 'ba', 'zz', 'aaa']);
    const names = Array.from({ length: 800 }, (_, i) => generatedSiteName(i));
    expect(new Set(names).size).toBe(800);
    for (const n of names) {
      expect(n).toMatch(/^site-[a-z]+$/);
      expect(n).toMatch(SITE_NAME_PATTERN);
    }
  });

  it('refuses an index that names no site', () => {
    expect(() => siteLetters(-1)).toThrow(RangeError);
    expect(() => siteLetters(1.5)).toThrow(RangeError);
  });
});
