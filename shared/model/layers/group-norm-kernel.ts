/**
 * GroupNorm forward and backward on NDHWC Float32Arrays (channel innermost), PyTorch's nn.GroupNorm: per sample
 * and per group of C/G consecutive channels, mean and biased variance over the group's channels and every
 * voxel, eps inside the square root, then a per-channel affine γ, β. InstanceNorm (with affine) is G = C.
 * No running statistics: training and inference compute the same thing, which is why it suits batches of 2
 * and sites whose intensity statistics differ.
 *
 * Both directions fold everything per (sample, channel) into one multiply-add per element, so each pass is a
 * plain loop over the contiguous voxel × channel block of one sample.
 */

export interface GroupNormForward {
  readonly y: Float32Array;
  /** Per (sample, group), [N·G]. */
  readonly mean: Float64Array;
  readonly invStd: Float64Array;
}

export interface GroupNormGrads {
  /** Absent when not asked for. */
  readonly dx?: Float32Array;
  readonly dgamma: Float64Array;
  readonly dbeta: Float64Array;
}

/** Checks the layout and returns [samples, voxels per sample, channels per group]. */
function geometry(length: number, n: number, C: number, G: number): [number, number] {
  if (!Number.isInteger(G) || G < 1 || C % G !== 0) throw new Error(`group norm: ${C} channels cannot be split into ${G} groups`);
  const perSample = length / n;
  if (!Number.isInteger(perSample) || perSample % C !== 0) throw new Error(`group norm: ${length} values do not form ${n} samples of ${C} channels`);
  return [perSample / C, C / G];
}

function groupIndex(C: number, cg: number): Int32Array {
  const g = new Int32Array(C);
  for (let c = 0; c < C; c++) g[c] = Math.floor(c / cg);
  return g;
}

/**
 * y = γ·(x − μ)/√(σ² + eps) + β per group (then ReLU when `relu`); x holds `n` samples of V voxels × C channels.
 * `out` (every value is written) receives y when given.
 */
export function groupNormForward(
  x: Float32Array,
  n: number,
  C: number,
  G: number,
  gamma: Float32Array,
  beta: Float32Array,
  eps: number,
  relu: boolean,
  out?: Float32Array,
): GroupNormForward {
  const [V, cg] = geometry(x.length, n, C, G);
  const M = V * cg;
  const y = out ?? new Float32Array(x.length);
  const mean = new Float64Array(n * G);
  const invStd = new Float64Array(n * G);
  const groupOf = groupIndex(C, cg);
  const mu = new Float64Array(G);
  const sq = new Float64Array(G);
  for (let b = 0; b < n; b++) {
    const base = b * V * C;
    const end = base + V * C;
    // Reductions run channel by channel with a scalar accumulator (strided, but several times faster in V8
    // than indexing a per-channel accumulator array); two passes keep the variance accurate when |μ| ≫ σ.
    mu.fill(0);
    sq.fill(0);
    for (let c = 0; c < C; c++) {
      let s = 0;
      for (let i = base + c; i < end; i += C) s += x[i];
      mu[groupOf[c]] += s;
    }
    for (let g = 0; g < G; g++) mu[g] /= M;
    for (let c = 0; c < C; c++) {
      const m = mu[groupOf[c]];
      let s = 0;
      for (let i = base + c; i < end; i += C) {
        const d = x[i] - m;
        s += d * d;
      }
      sq[groupOf[c]] += s;
    }
    for (let g = 0; g < G; g++) {
      mean[b * G + g] = mu[g];
      invStd[b * G + g] = 1 / Math.sqrt(sq[g] / M + eps);
    }
    for (let c = 0; c < C; c++) {
      const g = groupOf[c];
      const a = gamma[c] * invStd[b * G + g];
      const t0 = beta[c] - mu[g] * a;
      if (relu) {
        for (let i = base + c; i < end; i += C) {
          const t = x[i] * a + t0;
          y[i] = t > 0 ? t : 0;
        }
      } else {
        for (let i = base + c; i < end; i += C) y[i] = x[i] * a + t0;
      }
    }
  }
  return { y, mean, invStd };
}

/**
 * Gradients of groupNormForward. With `reluOut` (the forward's output when it fused a ReLU) dy counts only
 * where the output was positive. dx = s·γ·dy − s/M·(Σ γ·dy + x̂·Σ γ·dy·x̂) per group, written per
 * (sample, channel) as dx = dy·p + x·q + r; into `dxOut` (every value is written) when given.
 */
export function groupNormBackward(
  x: Float32Array,
  dy: Float32Array,
  n: number,
  C: number,
  G: number,
  fwd: Pick<GroupNormForward, 'mean' | 'invStd'>,
  gamma: Float32Array,
  reluOut: Float32Array | undefined,
  needDx: boolean,
  dxOut?: Float32Array,
): GroupNormGrads {
  const [V, cg] = geometry(x.length, n, C, G);
  const M = V * cg;
  const groupOf = groupIndex(C, cg);
  const dgamma = new Float64Array(C);
  const dbeta = new Float64Array(C);
  const dx = needDx ? (dxOut ?? new Float32Array(x.length)) : undefined;
  const sumDy = new Float64Array(C);
  const sumDyX = new Float64Array(C);
  const s1 = new Float64Array(G);
  const s2 = new Float64Array(G);
  for (let b = 0; b < n; b++) {
    const base = b * V * C;
    const end = base + V * C;
    for (let c = 0; c < C; c++) {
      let sd = 0;
      let sdx = 0;
      if (reluOut) {
        for (let i = base + c; i < end; i += C) {
          if (reluOut[i] > 0) {
            sd += dy[i];
            sdx += dy[i] * x[i];
          }
        }
      } else {
        for (let i = base + c; i < end; i += C) {
          sd += dy[i];
          sdx += dy[i] * x[i];
        }
      }
      sumDy[c] = sd;
      sumDyX[c] = sdx;
    }
    // Per group: S1 = Σ γ·dy, S2 = Σ γ·dy·x̂ (x̂ = (x − μ)·s).
    s1.fill(0);
    s2.fill(0);
    for (let c = 0; c < C; c++) {
      const g = groupOf[c];
      const mu = fwd.mean[b * G + g];
      const s = fwd.invStd[b * G + g];
      const dyXhat = s * (sumDyX[c] - mu * sumDy[c]);
      dbeta[c] += sumDy[c];
      dgamma[c] += dyXhat;
      s1[g] += gamma[c] * sumDy[c];
      s2[g] += gamma[c] * dyXhat;
    }
    if (!dx) continue;
    for (let c = 0; c < C; c++) {
      const g = groupOf[c];
      const mu = fwd.mean[b * G + g];
      const s = fwd.invStd[b * G + g];
      const p = s * gamma[c];
      const q = (-s * s * s2[g]) / M;
      const r = (mu * s * s * s2[g] - s * s1[g]) / M;
      if (reluOut) {
        for (let i = base + c; i < end; i += C) dx[i] = (reluOut[i] > 0 ? dy[i] * p : 0) + x[i] * q + r;
      } else {
        for (let i = base + c; i < end; i += C) dx[i] = dy[i] * p + x[i] * q + r;
      }
    }
  }
  return { dx, dgamma, dbeta };
}
