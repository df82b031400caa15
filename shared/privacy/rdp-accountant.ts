/**
 * Rényi-DP accountant for the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
 * "Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv 1908.10530).
 *
 * One `step(q, z)` is one release of a sum of contributions of L2 sensitivity 1, each contributor
 * included independently with probability q (Poisson sampling), plus N(0, z²) noise. RDP composes by
 * addition, so the accountant keeps one running total per order α and converts to (ε, δ) on demand.
 *
 * - Integer α ≥ 2: exact, by the binomial expansion
 *     A_α = Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k² − k) / (2z²)),   RDP(α) = log A_α / (α − 1),
 *   summed in log space so large α and small z neither overflow nor lose the small terms.
 * - Fractional α > 1: the two-sided series of Mironov et al. §3.3 (Gaussian tails split at
 *   z₀ = z² log(1/q − 1) + ½), summed until the terms fall 30 nats below the running sum.
 * - q = 1: the plain Gaussian mechanism, RDP(α) = α / (2z²). q = 0: nothing released, RDP = 0.
 *
 * (ε, δ) conversion: by default the tighter bound of Balle et al. 2020 ("Hypothesis testing
 * interpretations and Rényi DP", Prop. 12; also Canonne–Kamath–Steinke 2020):
 *     ε = rdp + log((α − 1)/α) − (log δ + log α) / (α − 1)
 * and, on request, the classic Mironov 2017 bound ε = rdp + log(1/δ) / (α − 1). Both are minimised
 * over the accountant's orders; the order that gave the minimum is returned with it.
 */
import { z } from 'zod';

/**
 * Default orders: 1.1 … 10.9 in steps of 0.1, every integer 11 … 63, then 128 … 1024. The fine grid
 * near 1 matters for large ε; the large orders for small q and large z (tiny per-step cost).
 */
export const DEFAULT_RDP_ORDERS: readonly number[] = Object.freeze([
  ...Array.from({ length: 99 }, (_, i) => Math.round((1 + (i + 1) / 10) * 10) / 10),
  ...Array.from({ length: 53 }, (_, i) => 11 + i),
  128,
  256,
  512,
  1024,
]);

export type EpsilonConversion = 'balle2020' | 'classic';

export const RdpAccountantStateSchema = z
  .object({
    version: z.literal(1),
    mechanism: z.literal('sampled-gaussian'),
    orders: z.array(z.number().gt(1)).min(1),
    /** Running RDP total per order, same length and order as `orders`. */
    rdp: z.array(z.number().min(0)),
    /** Total number of steps composed (informational). */
    steps: z.number().int().min(0),
  })
  .strict()
  .refine((s) => s.rdp.length === s.orders.length, { message: 'rdp must have one entry per order' });

export type RdpAccountantState = z.infer<typeof RdpAccountantStateSchema>;

export class RdpAccountant {
  private readonly orders: number[];
  private readonly rdp: number[];
  private totalSteps = 0;

  constructor(orders: readonly number[] = DEFAULT_RDP_ORDERS) {
    if (orders.length === 0) throw new RangeError('RdpAccountant needs at least one order; pass none to use the defaults.');
    for (const a of orders) {
      if (!Number.isFinite(a) || a <= 1) {
        throw new RangeError(`RDP order ${a} is not usable: every order must be a finite number > 1.`);
      }
    }
    this.orders = [...orders];
    this.rdp = new Array<number>(orders.length).fill(0);
  }

  /**
   * Composes `steps` (default 1) releases of the sampled Gaussian mechanism with sampling rate
   * q ∈ [0, 1] and noise multiplier z > 0 (noise std / L2 sensitivity).
   */
  step(samplingRate: number, noiseMultiplier: number, steps = 1): void {
    if (!(samplingRate >= 0 && samplingRate <= 1)) {
      throw new RangeError(`sampling rate ${samplingRate} must lie in [0, 1] (fraction of contributors in one release).`);
    }
    if (!(noiseMultiplier > 0) || !Number.isFinite(noiseMultiplier)) {
      throw new RangeError(`noise multiplier ${noiseMultiplier} must be a finite number > 0; with no noise there is no DP guarantee.`);
    }
    if (!Number.isInteger(steps) || steps < 0) throw new RangeError(`steps ${steps} must be a whole number ≥ 0.`);
    if (steps === 0) return;
    for (let i = 0; i < this.orders.length; i++) {
      this.rdp[i]! += steps * sampledGaussianRdp(samplingRate, noiseMultiplier, this.orders[i]!);
    }
    this.totalSteps += steps;
  }

  /** Steps composed so far. */
  get steps(): number {
    return this.totalSteps;
  }

  /** Smallest ε over the orders such that everything composed so far is (ε, δ)-DP. */
  epsilon(delta: number, conversion: EpsilonConversion = 'balle2020'): { epsilon: number; order: number } {
    if (!(delta > 0 && delta < 1)) throw new RangeError(`delta ${delta} must lie strictly between 0 and 1.`);
    let best = Number.POSITIVE_INFINITY;
    let bestOrder = this.orders[0]!;
    for (let i = 0; i < this.orders.length; i++) {
      const eps = rdpToEpsilon(this.orders[i]!, this.rdp[i]!, delta, conversion);
      if (eps < best) {
        best = eps;
        bestOrder = this.orders[i]!;
      }
    }
    return { epsilon: Math.max(0, best), order: bestOrder };
  }

  toJSON(): RdpAccountantState {
    return { version: 1, mechanism: 'sampled-gaussian', orders: [...this.orders], rdp: [...this.rdp], steps: this.totalSteps };
  }

  static fromJSON(s: RdpAccountantState): RdpAccountant {
    const parsed = RdpAccountantStateSchema.safeParse(s);
    if (!parsed.success) {
      throw new Error(`RDP accountant state is invalid (${parsed.error.issues.map((i) => `${i.path.join('.') || '(top)'}: ${i.message}`).join('; ')}); it was not written by this accountant or was edited — restore it from a backup.`);
    }
    const acc = new RdpAccountant(parsed.data.orders);
    for (let i = 0; i < parsed.data.rdp.length; i++) acc.rdp[i] = parsed.data.rdp[i]!;
    acc.totalSteps = parsed.data.steps;
    return acc;
  }
}

/** ε for one order's RDP value. */
export function rdpToEpsilon(order: number, rdp: number, delta: number, conversion: EpsilonConversion = 'balle2020'): number {
  if (!Number.isFinite(rdp)) return Number.POSITIVE_INFINITY;
  const logDelta = Math.log(delta);
  if (conversion === 'classic') return rdp - logDelta / (order - 1);
  return rdp + Math.log1p(-1 / order) - (logDelta + Math.log(order)) / (order - 1);
}

/** RDP of order α for one release of the sampled Gaussian mechanism. */
export function sampledGaussianRdp(q: number, sigma: number, alpha: number): number {
  if (q === 0) return 0;
  if (q === 1) return alpha / (2 * sigma * sigma);
  const logA = Number.isInteger(alpha) ? logAInteger(q, sigma, alpha) : logAFractional(q, sigma, alpha);
  return Math.max(0, logA / (alpha - 1));
}

function logAddExp(a: number, b: number): number {
  if (a === Number.NEGATIVE_INFINITY) return b;
  if (b === Number.NEGATIVE_INFINITY) return a;
  const m = Math.max(a, b);
  return m + Math.log1p(Math.exp(-Math.abs(a - b)));
}

/** log(e^a − e^b) for a ≥ b. */
function logSubExp(a: number, b: number): number {
  if (b === Number.NEGATIVE_INFINITY) return a;
  if (b > a) throw new Error(`internal: log-space subtraction would go negative (${a} < ${b})`);
  if (a === b) return Number.NEGATIVE_INFINITY;
  return a + Math.log(-Math.expm1(b - a));
}

/** Exact for integer α: log-sum-exp over the binomial expansion. */
function logAInteger(q: number, sigma: number, alpha: number): number {
  const logQ = Math.log(q);
  const log1mQ = Math.log1p(-q);
  const twoS2 = 2 * sigma * sigma;
  let logBinom = 0; // log C(α, 0)
  let acc = Number.NEGATIVE_INFINITY;
  for (let k = 0; k <= alpha; k++) {
    if (k > 0) logBinom += Math.log(alpha - k + 1) - Math.log(k);
    const term = logBinom + k * logQ + (alpha - k) * log1mQ + (k * k - k) / twoS2;
    acc = logAddExp(acc, term);
  }
  return acc;
}

/** Fractional α: the convergent two-sided series (Mironov et al. 2019, §3.3). */
function logAFractional(q: number, sigma: number, alpha: number): number {
  const logQ = Math.log(q);
  const log1mQ = Math.log1p(-q);
  const twoS2 = 2 * sigma * sigma;
  const z0 = sigma * sigma * Math.log(1 / q - 1) + 0.5;
  const sqrt2Sigma = Math.SQRT2 * sigma;
  // Positive and negative parts kept apart: the generalised binomial C(α, i) alternates in sign once i > α.
  let pos = Number.NEGATIVE_INFINITY;
  let neg = Number.NEGATIVE_INFINITY;
  let logAbsBinom = 0;
  let sign = 1;
  for (let i = 0; i < 100_000; i++) {
    if (i > 0) {
      const f = alpha - i + 1;
      logAbsBinom += Math.log(Math.abs(f)) - Math.log(i);
      if (f < 0) sign = -sign;
    }
    const j = alpha - i;
    const s0 = logAbsBinom + i * logQ + j * log1mQ + (i * i - i) / twoS2 + Math.log(0.5) + logErfc((i - z0) / sqrt2Sigma);
    const s1 = logAbsBinom + j * logQ + i * log1mQ + (j * j - j) / twoS2 + Math.log(0.5) + logErfc((z0 - j) / sqrt2Sigma);
    const term = logAddExp(s0, s1);
    if (sign > 0) pos = logAddExp(pos, term);
    else neg = logAddExp(neg, term);
    if (i > alpha && Math.max(s0, s1) < Math.max(pos, -30) - 30) break;
  }
  return logSubExp(pos, neg);
}

/**
 * log(erfc(x)) to near double precision for every x, without underflow for large x:
 * |x| < 2.5 by the all-positive series erf(x) = (2/√π) e^{−x²} Σ 2ⁿ x^{2n+1} / (2n+1)!!,
 * x ≥ 2.5 by the continued fraction √π e^{x²} erfc(x) = 1/(x + ½/(x + 1/(x + 3⁄2/(x + …)))) (modified Lentz),
 * and erfc(−x) = 2 − erfc(x).
 */
export function logErfc(x: number): number {
  if (Number.isNaN(x)) return Number.NaN;
  const ax = Math.abs(x);
  if (ax < 2.5) {
    let term = ax;
    let sum = ax;
    const twoX2 = 2 * ax * ax;
    for (let n = 1; n < 500; n++) {
      term *= twoX2 / (2 * n + 1);
      sum += term;
      if (term < sum * 1e-17) break;
    }
    const erfAbs = (2 / Math.sqrt(Math.PI)) * Math.exp(-ax * ax) * sum;
    return Math.log(x >= 0 ? 1 - erfAbs : 1 + erfAbs);
  }
  if (ax === Number.POSITIVE_INFINITY) return x > 0 ? Number.NEGATIVE_INFINITY : Math.LN2;
  const tiny = 1e-300;
  let f = ax;
  let c = f;
  let d = 0;
  for (let n = 1; n < 10_000; n++) {
    const a = n / 2;
    d = ax + a * d;
    if (Math.abs(d) < tiny) d = tiny;
    d = 1 / d;
    c = ax + a / c;
    if (Math.abs(c) < tiny) c = tiny;
    const delta = c * d;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  const logErfcAbs = -ax * ax - 0.5 * Math.log(Math.PI) - Math.log(f);
  if (x >= 0) return logErfcAbs;
  return Math.log(2 - Math.exp(logErfcAbs));
}
