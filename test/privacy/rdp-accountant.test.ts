import { describe, expect, it } from 'vitest';
import { DEFAULT_RDP_ORDERS, RdpAccountant, logErfc, sampledGaussianRdp } from '../../shared/privacy/rdp-accountant.ts';

describe('RDP accountant (sampled Gaussian)', () => {
  it('q = 1 is the plain Gaussian: RDP α/(2σ²), ε close to the closed-form optimum 1/(2σ²) + √(2 log(1/δ))/σ', () => {
    expect(sampledGaussianRdp(1, 2, 5)).toBeCloseTo(5 / 8, 12);
    for (const sigma of [1, 2, 5]) {
      const acc = new RdpAccountant();
      acc.step(1, sigma);
      const L = Math.log(1e5);
      const continuous = 1 / (2 * sigma * sigma) + Math.sqrt(2 * L) / sigma;
      const { epsilon } = acc.epsilon(1e-5, 'classic');
      // The grid optimum is never below the continuous one and, with 0.1-spaced orders, barely above it.
      expect(epsilon).toBeGreaterThanOrEqual(continuous - 1e-9);
      expect(epsilon).toBeLessThan(continuous + 0.02);
    }
  });

  it('integer orders match a direct (non-log-space) evaluation of the binomial expansion', () => {
    const q = 0.2, s = 1.5, a = 6;
    let A = 0;
    let binom = 1;
    for (let k = 0; k <= a; k++) {
      if (k > 0) binom = (binom * (a - k + 1)) / k;
      A += binom * (1 - q) ** (a - k) * q ** k * Math.exp((k * k - k) / (2 * s * s));
    }
    expect(sampledGaussianRdp(q, s, a)).toBeCloseTo(Math.log(A) / (a - 1), 12);
  });

  it('fractional orders join the integer ones continuously (series vs exact expansion)', () => {
    for (const [q, s, a] of [[0.01, 4, 3], [0.05, 1.1, 20], [0.3, 0.8, 7]] as const) {
      const exact = sampledGaussianRdp(q, s, a);
      const near = sampledGaussianRdp(q, s, a + 1e-7);
      expect(Math.abs(near - exact) / exact).toBeLessThan(1e-5);
    }
    // and are monotone in α in between (RDP is non-decreasing in the order)
    const vals = [2, 2.25, 2.5, 2.75, 3].map((a) => sampledGaussianRdp(0.05, 1, a));
    for (let i = 1; i < vals.length; i++) expect(vals[i]!).toBeGreaterThan(vals[i - 1]!);
  });

  it('log erfc agrees with tabulated erfc values, including deep in the tail', () => {
    expect(Math.exp(logErfc(0.5))).toBeCloseTo(0.4795001221869535, 14);
    expect(Math.exp(logErfc(1))).toBeCloseTo(0.1572992070502851, 14);
    expect(Math.exp(logErfc(3)) / 2.209049699858544e-5).toBeCloseTo(1, 12);
    expect(Math.exp(logErfc(-1))).toBeCloseTo(1.842700792949715, 14);
    // asymptotic expansion erfc(x) ≈ e^{−x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴))
    expect(logErfc(30)).toBeCloseTo(-900 - Math.log(30 * Math.sqrt(Math.PI)) + Math.log(1 - 1 / 1800 + 3 / (4 * 30 ** 4)), 8);
  });

  it('reproduces published values (classic conversion, as those sources used)', () => {
    // Abadi et al. 2016 (§3.1): q = 0.01, σ = 4, 10 000 steps, δ = 1e-5 → ε ≈ 1.26 with the moments accountant.
    const abadi = new RdpAccountant();
    abadi.step(0.01, 4, 10_000);
    expect(abadi.epsilon(1e-5, 'classic').epsilon).toBeCloseTo(1.26, 2);
    // TF-Privacy MNIST tutorial: 60 000 examples, batch 256, σ = 1.1, 60 epochs → ε = 3.01 at δ = 1e-5.
    const tf = new RdpAccountant();
    tf.step(256 / 60_000, 1.1, Math.ceil((60 * 60_000) / 256));
    expect(tf.epsilon(1e-5, 'classic').epsilon).toBeCloseTo(3.01, 2);
    // TF-Privacy Keras tutorial: batch 250, σ = 1.3, 15 epochs → ε = 1.18.
    const tf2 = new RdpAccountant();
    tf2.step(250 / 60_000, 1.3, Math.ceil((15 * 60_000) / 250));
    expect(tf2.epsilon(1e-5, 'classic').epsilon).toBeCloseTo(1.18, 2);
    // The Balle et al. 2020 conversion (default) is never looser.
    for (const acc of [abadi, tf, tf2]) expect(acc.epsilon(1e-5).epsilon).toBeLessThan(acc.epsilon(1e-5, 'classic').epsilon);
  });

  it('ε grows with steps and shrinks with noise', () => {
    let prev = 0;
    const acc = new RdpAccountant();
    for (let r = 0; r < 5; r++) {
      acc.step(0.5, 1.2, 10);
      const e = acc.epsilon(1e-6).epsilon;
      expect(e).toBeGreaterThan(prev);
      prev = e;
    }
    let last = Number.POSITIVE_INFINITY;
    for (const sigma of [0.7, 1, 1.5, 3, 8]) {
      const a = new RdpAccountant();
      a.step(0.1, sigma, 100);
      const e = a.epsilon(1e-5).epsilon;
      expect(e).toBeLessThan(last);
      last = e;
    }
    const a = new RdpAccountant();
    a.step(0, 1, 1000);
    // nothing released: RDP stays 0; ε is only the conversion's floor for δ = 1e-5 at the largest order
    expect(a.toJSON().rdp.every((v) => v === 0)).toBe(true);
    expect(a.epsilon(1e-5).epsilon).toBeLessThan(0.01);
  });

  it('state round-trips through JSON and continues composing identically', () => {
    const a = new RdpAccountant();
    a.step(0.2, 1.1, 7);
    const b = RdpAccountant.fromJSON(JSON.parse(JSON.stringify(a.toJSON())));
    expect(b.epsilon(1e-5)).toEqual(a.epsilon(1e-5));
    a.step(1, 2);
    b.step(1, 2);
    expect(b.toJSON()).toEqual(a.toJSON());
    expect(b.steps).toBe(8);
    expect(a.toJSON().orders).toEqual([...DEFAULT_RDP_ORDERS]);
  });

  it('refuses bad inputs and tampered state with a reason', () => {
    const a = new RdpAccountant();
    expect(() => a.step(1.5, 1)).toThrow(/sampling rate/);
    expect(() => a.step(0.1, 0)).toThrow(/noise multiplier/);
    expect(() => a.epsilon(0)).toThrow(/delta/);
    expect(() => new RdpAccountant([0.5])).toThrow(/order/);
    const s = a.toJSON();
    expect(() => RdpAccountant.fromJSON({ ...s, rdp: s.rdp.slice(1) })).toThrow(/one entry per order/);
  });
});
