import { describe, expect, it } from 'vitest';
import { diceScores, meanDicePerClass } from '../../shared/metrics/dice.ts';
import { gaussian, mulberry32, randomInt } from '../../shared/util/random.ts';

const u8 = (xs: number[]) => Uint8Array.from(xs);

describe('diceScores', () => {
  it('is 1 for a perfect prediction and 0 for disjoint masks', () => {
    expect(diceScores(u8([0, 1, 1, 0]), u8([0, 1, 1, 0]), 2)).toEqual([1]);
    expect(diceScores(u8([1, 1, 0, 0]), u8([0, 0, 1, 1]), 2)).toEqual([0]);
  });

  it('computes 2|A∩B|/(|A|+|B|) per foreground class', () => {
    // class 1: pred {1,2,3}, truth {2,3} → 2·2/5; class 2: pred {4}, truth {4,5} → 2·1/3
    const pred = u8([0, 1, 1, 1, 2, 0]);
    const truth = u8([0, 0, 1, 1, 2, 2]);
    const d = diceScores(pred, truth, 3);
    expect(d).toHaveLength(2);
    expect(d[0]).toBeCloseTo(4 / 5, 12);
    expect(d[1]).toBeCloseTo(2 / 3, 12);
  });

  it('scores a class absent from both prediction and truth as 1, absent from one as 0', () => {
    expect(diceScores(u8([0, 0, 0]), u8([0, 0, 0]), 2)).toEqual([1]);
    expect(diceScores(u8([0, 1, 0]), u8([0, 1, 0]), 3)).toEqual([1, 1]);
    expect(diceScores(u8([0, 0, 0]), u8([0, 1, 0]), 2)).toEqual([0]);
    expect(diceScores(u8([0, 2, 0]), u8([0, 0, 0]), 3)).toEqual([1, 0]);
  });

  it('is symmetric in prediction and truth', () => {
    const rng = mulberry32(5);
    const a = Uint8Array.from({ length: 500 }, () => randomInt(rng, 3));
    const b = Uint8Array.from({ length: 500 }, () => randomInt(rng, 3));
    expect(diceScores(a, b, 3)).toEqual(diceScores(b, a, 3));
  });

  it('rejects mismatched lengths and bad class counts', () => {
    expect(() => diceScores(u8([0, 1]), u8([0]), 2)).toThrow(/voxels/);
    expect(() => diceScores(u8([0]), u8([0]), 1)).toThrow(/numClasses/);
  });

  it('averages per-case scores class by class', () => {
    expect(meanDicePerClass([[1, 0.5], [0, 0.5]], 2)).toEqual([0.5, 0.5]);
    expect(meanDicePerClass([], 1)[0]).toBeNaN();
  });
});

describe('seeded random', () => {
  it('repeats for a seed, differs across seeds, stays in [0, 1)', () => {
    const a = mulberry32(42);
    const b = mulberry32(42);
    const c = mulberry32(43);
    const xa = Array.from({ length: 100 }, a);
    expect(Array.from({ length: 100 }, b)).toEqual(xa);
    expect(Array.from({ length: 100 }, c)).not.toEqual(xa);
    expect(xa.every((v) => v >= 0 && v < 1)).toBe(true);
  });

  it('gaussian has mean ≈ 0 and variance ≈ 1', () => {
    const rng = mulberry32(1);
    const n = 20000;
    let s = 0;
    let s2 = 0;
    for (let i = 0; i < n; i++) {
      const g = gaussian(rng);
      s += g;
      s2 += g * g;
    }
    expect(Math.abs(s / n)).toBeLessThan(0.03);
    expect(Math.abs(s2 / n - 1)).toBeLessThan(0.05);
  });
});
