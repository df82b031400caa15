/**
 * Fixed-point encoding into the ring Z_{2^32}: x ↦ round(clip(x, ±clip) · scale) mod 2^32 (two's complement
 * for negatives). Sums of up to `maxSites` encoded values cannot wrap as long as maxSites · clip · scale
 * < 2^31, which `quantizer()` checks; the decoded sum is then exact up to 0.5/scale per site and element.
 */
export interface QuantizerConfig {
  /** Values are clipped to [−clip, clip] before encoding. */
  clip: number;
  /** Fixed-point scale (units per 1.0). Default: the largest that cannot overflow for maxSites. */
  scale?: number;
  maxSites: number;
}

export interface Quantizer {
  clip: number;
  scale: number;
  encode(x: Float32Array | Float64Array): Uint32Array;
  /** Decodes a ring sum back to floats (the sum of the clipped inputs, up to rounding). */
  decode(sum: Uint32Array): Float32Array;
}

export function quantizer(c: QuantizerConfig): Quantizer {
  if (!(c.clip > 0) || !Number.isFinite(c.clip)) throw new RangeError(`clip ${c.clip} must be a finite number > 0`);
  if (!Number.isInteger(c.maxSites) || c.maxSites < 1) throw new RangeError(`maxSites ${c.maxSites} must be a whole number ≥ 1`);
  const limit = 2 ** 31 - 1;
  let scale = c.scale ?? Math.floor(limit / (c.maxSites * c.clip));
  // The largest encoded magnitude is round(clip·scale): step the default down until n of them fit.
  if (c.scale === undefined) while (scale > 0 && c.maxSites * Math.round(c.clip * scale) > limit) scale--;
  if (!(scale > 0)) throw new RangeError(`no fixed-point scale fits ${c.maxSites} sites with clip ${c.clip} in 32 bits; lower clip`);
  if (c.maxSites * Math.round(c.clip * scale) > limit) {
    throw new RangeError(`scale ${scale} with clip ${c.clip} can overflow the 32-bit ring for ${c.maxSites} sites (needs maxSites·clip·scale < 2^31); lower the scale or the clip`);
  }
  const clip = c.clip;
  return {
    clip,
    scale,
    encode(x) {
      const out = new Uint32Array(x.length);
      for (let i = 0; i < x.length; i++) {
        const v = x[i]!;
        if (Number.isNaN(v)) throw new RangeError(`value ${i} is NaN: refuse to encode it`);
        const clipped = v > clip ? clip : v < -clip ? -clip : v;
        out[i] = Math.round(clipped * scale) >>> 0;
      }
      return out;
    },
    decode(sum) {
      const out = new Float32Array(sum.length);
      for (let i = 0; i < sum.length; i++) out[i] = (sum[i]! | 0) / scale;
      return out;
    },
  };
}
