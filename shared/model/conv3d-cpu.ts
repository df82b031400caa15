/**
 * Hand-written 3D convolution kernels on Float32Arrays (NDHWC activations, [kD,kH,kW,in,out] weights,
 * any stride, dilation and padding), for the pure-JS engines: tiny3d's `cpu` path and the "js" ConvKernels. tfjs's cpu Conv3D and its backprop kernels are
 * naive nested loops (~0.1 GMAC/s for forward+backward at our channel counts); a patch gather plus
 * dot products keeps V8 in tight contiguous loops and skips zero gradients (after ReLU about half).
 * Forward, input gradient and weight gradient all run in one pass per output voxel.
 */

import { inputLength, tfSameGeom, type Conv3dGeom, type ConvKernels } from '../engine/conv-kernels.ts';

/** TF "same" geometry with a cubic kernel (tiny3d's layout); kept under its old name for callers. */
export const sameGeometry = (xShape: readonly number[], k: number, stride: number, cout: number): Conv3dGeom => tfSameGeom(xShape, cout, k, stride);

/**
 * Copies the receptive field of one output voxel into `col` (length kD·kH·kW·cin, order kd,kh,kw,ci —
 * the weight layout), zeros outside the volume. Any stride, dilation and padding.
 */
function gather(x: Float32Array, g: Conv3dGeom, nBase: number, oz: number, oy: number, ox: number, col: Float32Array): void {
  const cin = g.cin;
  const [inD, inH, inW] = g.in;
  const [kD, kH, kW] = g.k;
  const [dd, dh, dw] = g.dilation;
  const iz0 = oz * g.stride[0] - g.padBefore[0];
  const iy0 = oy * g.stride[1] - g.padBefore[1];
  const ix0 = ox * g.stride[2] - g.padBefore[2];
  const rowLen = kW * cin;
  // The kW voxels along x with all their channels are contiguous in NDHWC when undilated and inside.
  const xContiguous = dw === 1 && ix0 >= 0 && ix0 + kW <= inW;
  let c = 0;
  for (let kd = 0; kd < kD; kd++) {
    const iz = iz0 + kd * dd;
    if (iz < 0 || iz >= inD) {
      col.fill(0, c, c + kH * rowLen);
      c += kH * rowLen;
      continue;
    }
    for (let kh = 0; kh < kH; kh++) {
      const iy = iy0 + kh * dh;
      if (iy < 0 || iy >= inH) {
        col.fill(0, c, c + rowLen);
        c += rowLen;
        continue;
      }
      const rowBase = ((nBase + iz) * inH + iy) * inW;
      if (xContiguous) {
        let src = (rowBase + ix0) * cin;
        for (let j = 0; j < rowLen; j++) col[c++] = x[src++];
      } else {
        for (let kw = 0; kw < kW; kw++) {
          const ix = ix0 + kw * dw;
          if (ix < 0 || ix >= inW) {
            for (let ci = 0; ci < cin; ci++) col[c++] = 0;
          } else {
            let src = (rowBase + ix) * cin;
            for (let ci = 0; ci < cin; ci++) col[c++] = x[src++];
          }
        }
      }
    }
  }
}

/** Adds `col` back into the receptive field of one output voxel (the adjoint of gather). */
function scatterAdd(dx: Float32Array, g: Conv3dGeom, nBase: number, oz: number, oy: number, ox: number, col: Float32Array): void {
  const cin = g.cin;
  const [inD, inH, inW] = g.in;
  const [kD, kH, kW] = g.k;
  const [dd, dh, dw] = g.dilation;
  const iz0 = oz * g.stride[0] - g.padBefore[0];
  const iy0 = oy * g.stride[1] - g.padBefore[1];
  const ix0 = ox * g.stride[2] - g.padBefore[2];
  const rowLen = kW * cin;
  const xContiguous = dw === 1 && ix0 >= 0 && ix0 + kW <= inW;
  let c = 0;
  for (let kd = 0; kd < kD; kd++) {
    const iz = iz0 + kd * dd;
    if (iz < 0 || iz >= inD) {
      c += kH * rowLen;
      continue;
    }
    for (let kh = 0; kh < kH; kh++) {
      const iy = iy0 + kh * dh;
      if (iy < 0 || iy >= inH) {
        c += rowLen;
        continue;
      }
      const rowBase = ((nBase + iz) * inH + iy) * inW;
      if (xContiguous) {
        let dst = (rowBase + ix0) * cin;
        for (let j = 0; j < rowLen; j++) dx[dst++] += col[c++];
      } else {
        for (let kw = 0; kw < kW; kw++) {
          const ix = ix0 + kw * dw;
          if (ix < 0 || ix >= inW) {
            c += cin;
          } else {
            let dst = (rowBase + ix) * cin;
            for (let ci = 0; ci < cin; ci++) dx[dst++] += col[c++];
          }
        }
      }
    }
  }
}

/** Weights [K][cout] → [cout][K], so each output channel's filter is one contiguous row. */
function transposeWeights(w: Float32Array, kLen: number, cout: number): Float32Array {
  const wt = new Float32Array(w.length);
  for (let kk = 0; kk < kLen; kk++) for (let co = 0; co < cout; co++) wt[co * kLen + kk] = w[kk * cout + co];
  return wt;
}

/** y = conv3d(x, w) + bias, NDHWC. */
export function conv3dForward(x: Float32Array, w: Float32Array, bias: Float32Array | null, g: Conv3dGeom): Float32Array {
  const { n, cout } = g;
  const [outD, outH, outW] = g.out;
  const kLen = g.k[0] * g.k[1] * g.k[2] * g.cin;
  const wt = transposeWeights(w, kLen, cout);
  const y = new Float32Array(n * outD * outH * outW * cout);
  const col = new Float32Array(kLen);
  let p = 0;
  for (let b = 0; b < n; b++) {
    const nBase = b * g.in[0];
    for (let oz = 0; oz < outD; oz++) {
      for (let oy = 0; oy < outH; oy++) {
        for (let ox = 0; ox < outW; ox++) {
          gather(x, g, nBase, oz, oy, ox, col);
          const yBase = p * cout;
          let co = 0;
          for (; co + 8 <= cout; co += 8) {
            const r0 = co * kLen;
            let a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
            for (let kk = 0; kk < kLen; kk++) {
              const c = col[kk];
              const q = r0 + kk;
              a0 += c * wt[q];
              a1 += c * wt[q + kLen];
              a2 += c * wt[q + 2 * kLen];
              a3 += c * wt[q + 3 * kLen];
              a4 += c * wt[q + 4 * kLen];
              a5 += c * wt[q + 5 * kLen];
              a6 += c * wt[q + 6 * kLen];
              a7 += c * wt[q + 7 * kLen];
            }
            y[yBase + co] = a0; y[yBase + co + 1] = a1; y[yBase + co + 2] = a2; y[yBase + co + 3] = a3;
            y[yBase + co + 4] = a4; y[yBase + co + 5] = a5; y[yBase + co + 6] = a6; y[yBase + co + 7] = a7;
          }
          // Four filters at a time: each col value loaded once feeds four accumulators.
          for (; co + 4 <= cout; co += 4) {
            const r0 = co * kLen;
            const r1 = r0 + kLen;
            const r2 = r1 + kLen;
            const r3 = r2 + kLen;
            let a0 = 0;
            let a1 = 0;
            let a2 = 0;
            let a3 = 0;
            for (let kk = 0; kk < kLen; kk++) {
              const c = col[kk];
              a0 += c * wt[r0 + kk];
              a1 += c * wt[r1 + kk];
              a2 += c * wt[r2 + kk];
              a3 += c * wt[r3 + kk];
            }
            y[yBase + co] = a0;
            y[yBase + co + 1] = a1;
            y[yBase + co + 2] = a2;
            y[yBase + co + 3] = a3;
          }
          for (; co < cout; co++) {
            const r = co * kLen;
            let a = 0;
            for (let kk = 0; kk < kLen; kk++) a += col[kk] * wt[r + kk];
            y[yBase + co] = a;
          }
          if (bias) for (let c = 0; c < cout; c++) y[yBase + c] += bias[c];
          p++;
        }
      }
    }
  }
  return y;
}

export interface Conv3dGrads {
  /** Undefined when the caller said the input gradient is not needed (first layer). */
  readonly dx?: Float32Array;
  /** All zeros when the caller said the weight gradient is not needed. */
  readonly dw: Float32Array;
  readonly db: Float32Array;
}

/**
 * Gradients of conv3dForward with respect to x (optional), w (optional) and bias, given dy, in one pass
 * over the output voxels. `x` is not read when `needDw` is false.
 */
export function conv3dBackward(x: Float32Array, w: Float32Array, dy: Float32Array, g: Conv3dGeom, needDx: boolean, needDw = true): Conv3dGrads {
  const { n, cout } = g;
  const [outD, outH, outW] = g.out;
  const kLen = g.k[0] * g.k[1] * g.k[2] * g.cin;
  const wt = needDx ? transposeWeights(w, kLen, cout) : undefined;
  const dwt = new Float32Array(kLen * cout);
  const db = new Float32Array(cout);
  const dx = needDx ? new Float32Array(inputLength(g)) : undefined;
  const col = new Float32Array(kLen);
  const dcol = new Float32Array(kLen);
  // Non-zero output gradients of the current voxel (ReLU closes about half of them).
  const nzRow = new Int32Array(cout);
  const nzGrad = new Float32Array(cout);
  let p = 0;
  for (let b = 0; b < n; b++) {
    const nBase = b * g.in[0];
    for (let oz = 0; oz < outD; oz++) {
      for (let oy = 0; oy < outH; oy++) {
        for (let ox = 0; ox < outW; ox++, p++) {
          const yBase = p * cout;
          let m = 0;
          for (let co = 0; co < cout; co++) {
            const gv = dy[yBase + co];
            if (gv !== 0) {
              db[co] += gv;
              nzRow[m] = co * kLen;
              nzGrad[m] = gv;
              m++;
            }
          }
          if (m === 0) continue;
          if (needDw) gather(x, g, nBase, oz, oy, ox, col);
          if (wt) {
            dcol.fill(0);
            let i = 0;
            // Four filters at a time, so dcol is loaded once per four products.
            for (; i + 4 <= m; i += 4) {
              const r0 = nzRow[i];
              const r1 = nzRow[i + 1];
              const r2 = nzRow[i + 2];
              const r3 = nzRow[i + 3];
              const g0 = nzGrad[i];
              const g1 = nzGrad[i + 1];
              const g2 = nzGrad[i + 2];
              const g3 = nzGrad[i + 3];
              for (let kk = 0; kk < kLen; kk++) dcol[kk] += g0 * wt[r0 + kk] + g1 * wt[r1 + kk] + g2 * wt[r2 + kk] + g3 * wt[r3 + kk];
            }
            for (; i < m; i++) {
              const r = nzRow[i];
              const gv = nzGrad[i];
              for (let kk = 0; kk < kLen; kk++) dcol[kk] += gv * wt[r + kk];
            }
            scatterAdd(dx!, g, nBase, oz, oy, ox, dcol);
          }
          if (needDw) {
            let i = 0;
            for (; i + 4 <= m; i += 4) {
              const r0 = nzRow[i];
              const r1 = nzRow[i + 1];
              const r2 = nzRow[i + 2];
              const r3 = nzRow[i + 3];
              const g0 = nzGrad[i];
              const g1 = nzGrad[i + 1];
              const g2 = nzGrad[i + 2];
              const g3 = nzGrad[i + 3];
              for (let kk = 0; kk < kLen; kk++) {
                const c = col[kk];
                dwt[r0 + kk] += g0 * c;
                dwt[r1 + kk] += g1 * c;
                dwt[r2 + kk] += g2 * c;
                dwt[r3 + kk] += g3 * c;
              }
            }
            for (; i < m; i++) {
              const r = nzRow[i];
              const gv = nzGrad[i];
              for (let kk = 0; kk < kLen; kk++) dwt[r + kk] += gv * col[kk];
            }
          }
        }
      }
    }
  }
  const dw = new Float32Array(kLen * cout);
  if (needDw) for (let co = 0; co < cout; co++) for (let kk = 0; kk < kLen; kk++) dw[kk * cout + co] = dwt[co * kLen + kk];
  return { dx, dw, db };
}

/** The "js" ConvKernels: these loops behind the engine seam (always available; the others' reference). */
export const jsConvKernels: ConvKernels = {
  name: 'js',
  conv3d: (x, w, g) => conv3dForward(x, w, null, g),
  conv3dBackwardData: (dy, w, g) => conv3dBackward(EMPTY, w, dy, g, true, false).dx!,
  conv3dBackwardFilter: (x, dy, g) => conv3dBackward(x, EMPTY, dy, g, false, true).dw,
};
const EMPTY = new Float32Array(0);

/** Nearest-neighbour ×2 upsampling, NDHWC. */
export function upsample2xForward(x: Float32Array, shape: readonly number[]): Float32Array {
  const [n, d, h, w, c] = shape;
  const H2 = 2 * h;
  const W2 = 2 * w;
  const y = new Float32Array(x.length * 8);
  for (let b = 0; b < n; b++) {
    for (let z = 0; z < d; z++) {
      for (let yy = 0; yy < h; yy++) {
        // Build one upsampled x-row, then copy it to the 2×2 (z, y) children rows.
        const dst0 = (((b * 2 * d + 2 * z) * H2 + 2 * yy) * W2) * c;
        const src = (((b * d + z) * h + yy) * w) * c;
        for (let xx = 0; xx < w; xx++) {
          const s = src + xx * c;
          const t = dst0 + 2 * xx * c;
          for (let ch = 0; ch < c; ch++) {
            const v = x[s + ch];
            y[t + ch] = v;
            y[t + c + ch] = v;
          }
        }
        const rowLen = W2 * c;
        y.copyWithin(dst0 + rowLen, dst0, dst0 + rowLen);
        const planeLen = H2 * W2 * c;
        y.copyWithin(dst0 + planeLen, dst0, dst0 + 2 * rowLen);
      }
    }
  }
  return y;
}

/** Adjoint of upsample2xForward: each coarse voxel receives the sum of its 8 children. */
export function upsample2xBackward(dy: Float32Array, shape: readonly number[]): Float32Array {
  const [n, d, h, w, c] = shape;
  const H2 = 2 * h;
  const W2 = 2 * w;
  const dx = new Float32Array(dy.length / 8);
  for (let b = 0; b < n; b++) {
    for (let z2 = 0; z2 < 2 * d; z2++) {
      const z = z2 >> 1;
      for (let y2 = 0; y2 < H2; y2++) {
        const yy = y2 >> 1;
        const src = (((b * 2 * d + z2) * H2 + y2) * W2) * c;
        const dst = (((b * d + z) * h + yy) * w) * c;
        for (let x2 = 0; x2 < W2; x2++) {
          const s = src + x2 * c;
          const t = dst + (x2 >> 1) * c;
          for (let ch = 0; ch < c; ch++) dx[t + ch] += dy[s + ch];
        }
      }
    }
  }
  return dx;
}

/** y += a, then optionally ReLU, in place (the fused epilogue of a conv). */
export function addReluInPlace(y: Float32Array, add: Float32Array | undefined, relu: boolean): void {
  if (add) for (let i = 0; i < y.length; i++) y[i] += add[i];
  if (relu) for (let i = 0; i < y.length; i++) if (y[i] < 0) y[i] = 0;
}

/** dy where the ReLU output y was open, 0 elsewhere. */
export function reluGrad(y: Float32Array, dy: Float32Array): Float32Array {
  const out = new Float32Array(dy.length);
  for (let i = 0; i < out.length; i++) out[i] = y[i] > 0 ? dy[i] : 0;
  return out;
}
