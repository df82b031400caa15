/**
 * Probabilities on a window's grid from a network's logits on a coarser one: linear upsampling (PyTorch's trilinear,
 * align_corners=False) by the head's factor, then softmax. The post-network step of whole-volume and windowed
 * inference in JS; window-blend.ts fuses it with the blending in the native addon.
 */
/** Linear interpolation by an integer factor along D, H and W (PyTorch `align_corners=False`), NDHWC. */
export function upsampleLinear(x: Float32Array, shape: readonly number[], f: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): Float32Array {
  let data = x;
  let cur = [...shape];
  for (let axis = 1; axis <= 3; axis++) {
    const inLen = cur[axis];
    const outLen = inLen * f;
    const outer = cur.slice(0, axis).reduce((a, b) => a * b, 1);
    const inner = cur.slice(axis + 1).reduce((a, b) => a * b, 1);
    const out = alloc(outer * outLen * inner);
    const i0s = new Int32Array(outLen);
    const i1s = new Int32Array(outLen);
    const ts = new Float64Array(outLen);
    for (let o = 0; o < outLen; o++) {
      const src = Math.max(0, (o + 0.5) / f - 0.5);
      i0s[o] = Math.min(inLen - 1, Math.floor(src));
      i1s[o] = Math.min(inLen - 1, i0s[o] + 1);
      ts[o] = src - i0s[o];
    }
    // Rows outermost: the writes run through memory in order (the inner axes are short for W).
    for (let a = 0; a < outer; a++) {
      for (let o = 0; o < outLen; o++) {
        const t = ts[o];
        const s0 = (a * inLen + i0s[o]) * inner;
        const s1 = (a * inLen + i1s[o]) * inner;
        const dst = (a * outLen + o) * inner;
        for (let k = 0; k < inner; k++) out[dst + k] = data[s0 + k] * (1 - t) + data[s1 + k] * t;
      }
    }
    data = out;
    cur[axis] = outLen;
  }
  return data;
}

/** Softmax along the last axis of logits [..., C] (max-shifted; one exp per value). */
export function softmaxRows(logits: Float32Array, C: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): Float32Array {
  const out = alloc(logits.length);
  if (C === 2) {
    // The logistic of the difference: one exp per voxel (most plans have two classes).
    for (let o = 0; o < logits.length; o += 2) {
      const p1 = 1 / (1 + Math.exp(logits[o] - logits[o + 1]));
      out[o] = 1 - p1;
      out[o + 1] = p1;
    }
    return out;
  }
  for (let o = 0; o < logits.length; o += C) {
    let max = logits[o];
    for (let c = 1; c < C; c++) if (logits[o + c] > max) max = logits[o + c];
    let se = 0;
    for (let c = 0; c < C; c++) {
      const e = Math.exp(logits[o + c] - max);
      out[o + c] = e;
      se += e;
    }
    for (let c = 0; c < C; c++) out[o + c] /= se;
  }
  return out;
}

/**
 * Softmax probabilities [n, d, h, w, C] of `n` windows from their logits [n, d/f, h/f, w/f, C] (f = `factor`); the
 * arrays come from `take`.
 */
export function windowProbsFromLogits(
  logits: Float32Array,
  n: number,
  window: readonly [number, number, number],
  factor: number,
  C: number,
  take: (n: number) => Float32Array = (k) => new Float32Array(k),
): Float32Array {
  if (factor === 1) return softmaxRows(logits, C, take);
  const coarse = [n, window[0] / factor, window[1] / factor, window[2] / factor];
  if (C === 2) {
    // Two classes: the softmax is the logistic of l1 − l0, and linear upsampling commutes with the difference,
    // so one channel is upsampled instead of two.
    const diff = take(logits.length / 2);
    for (let v = 0; v < diff.length; v++) diff[v] = logits[2 * v + 1] - logits[2 * v];
    const up = upsampleLinear(diff, [...coarse, 1], factor, take);
    const out = take(up.length * 2);
    for (let v = 0; v < up.length; v++) {
      const p1 = 1 / (1 + Math.exp(-up[v]));
      out[2 * v] = 1 - p1;
      out[2 * v + 1] = p1;
    }
    return out;
  }
  return softmaxRows(upsampleLinear(logits, [...coarse, C], factor, take), C, take);
}
