/**
 * ConvKernels on a tfjs backend, so the Med3D trainer runs its convolutions on native TensorFlow (GPU or
 * CPU) where @tensorflow/tfjs-node(-gpu) is installed. tfjs has no gradient for dilated conv3d, so the
 * gradients call the backprop kernels directly (Conv3DBackpropInputV2 through tf.conv3dTranspose,
 * Conv3DBackpropFilterV2 through runKernel); those take no dilation, so a dilated filter is expanded with
 * zeros between its taps (k → d(k−1)+1): correct everywhere, at d³ times the multiply-adds of those layers.
 * Padding is explicit (PyTorch's symmetric padding, or TF "same" offsets) and the convolution itself 'valid'.
 * Never use this on the wasm backend: its Conv3D backprop kernels compute wrong gradients (tfjs-backend-wasm 4.22, measured against the cpu backend).
 */
import type * as TfModule from '@tensorflow/tfjs';
import { padAfter, type Conv3dGeom, type ConvKernels, type Triple } from './conv-kernels.ts';

type Tf = typeof TfModule;
type T5 = TfModule.Tensor5D;

/** Filter [k…, cin, cout] with d−1 zeros between taps along each axis. */
export function dilateFilter(w: Float32Array, k: Triple, d: Triple, cin: number, cout: number): { data: Float32Array; k: Triple } {
  if (d[0] === 1 && d[1] === 1 && d[2] === 1) return { data: w, k };
  const ke = k.map((kk, i) => d[i] * (kk - 1) + 1) as unknown as Triple;
  const c = cin * cout;
  const out = new Float32Array(ke[0] * ke[1] * ke[2] * c);
  for (let a = 0; a < k[0]; a++) {
    for (let b = 0; b < k[1]; b++) {
      for (let e = 0; e < k[2]; e++) {
        const src = ((a * k[1] + b) * k[2] + e) * c;
        const dst = ((a * d[0] * ke[1] + b * d[1]) * ke[2] + e * d[2]) * c;
        out.set(w.subarray(src, src + c), dst);
      }
    }
  }
  return { data: out, k: ke };
}

/** The taps of a dilated filter's gradient back from its zero-expanded form. */
function undilateFilter(we: Float32Array, k: Triple, d: Triple, cin: number, cout: number): Float32Array {
  if (d[0] === 1 && d[1] === 1 && d[2] === 1) return we;
  const ke = k.map((kk, i) => d[i] * (kk - 1) + 1);
  const c = cin * cout;
  const out = new Float32Array(k[0] * k[1] * k[2] * c);
  for (let a = 0; a < k[0]; a++) {
    for (let b = 0; b < k[1]; b++) {
      for (let e = 0; e < k[2]; e++) {
        const dst = ((a * k[1] + b) * k[2] + e) * c;
        const src = ((a * d[0] * ke[1] + b * d[1]) * ke[2] + e * d[2]) * c;
        out.set(we.subarray(src, src + c), dst);
      }
    }
  }
  return out;
}

export function createTfjsConvKernels(tf: Tf, name: string): ConvKernels {
  const read = (t: TfModule.Tensor): Float32Array => {
    // Copy: a backend may hand out its own storage, and the tensor is disposed right after.
    const v = new Float32Array(t.dataSync() as Float32Array);
    t.dispose();
    return v;
  };
  /** x padded (or cropped, where padding after is negative) to the extent the 'valid' convolution reads. */
  const padInput = (x: TfModule.Tensor, g: Conv3dGeom): T5 => {
    const after = padAfter(g);
    return tf.tidy(() => {
      let t = x as T5;
      const crop = after.map((a) => Math.min(0, a));
      if (crop.some((c) => c < 0)) t = tf.slice(t, [0, 0, 0, 0, 0], [g.n, g.in[0] + crop[0], g.in[1] + crop[1], g.in[2] + crop[2], g.cin]);
      const pads: [number, number][] = [[0, 0], [g.padBefore[0], Math.max(0, after[0])], [g.padBefore[1], Math.max(0, after[1])], [g.padBefore[2], Math.max(0, after[2])], [0, 0]];
      return pads.some(([a, b]) => a > 0 || b > 0) ? tf.pad(t, pads) : t;
    });
  };
  const stride = (g: Conv3dGeom): [number, number, number] => [g.stride[0], g.stride[1], g.stride[2]];

  return {
    name,
    conv3d(x, w, g) {
      const out = tf.tidy(() => {
        const xt = padInput(tf.tensor5d(x, [g.n, g.in[0], g.in[1], g.in[2], g.cin]), g);
        const wt = tf.tensor5d(w, [g.k[0], g.k[1], g.k[2], g.cin, g.cout]);
        const dilated = g.dilation.some((d) => d > 1);
        // tfjs takes dilation only with stride 1 (true in Med3D); otherwise expand the filter.
        if (dilated && g.stride.some((s) => s > 1)) {
          const e = dilateFilter(w, g.k, g.dilation, g.cin, g.cout);
          return tf.conv3d(xt, tf.tensor5d(e.data, [e.k[0], e.k[1], e.k[2], g.cin, g.cout]), stride(g), 'valid');
        }
        return tf.conv3d(xt, wt, stride(g), 'valid', 'NDHWC', [g.dilation[0], g.dilation[1], g.dilation[2]]);
      });
      return read(out);
    },
    conv3dBackwardData(dy, w, g) {
      const e = dilateFilter(w, g.k, g.dilation, g.cin, g.cout);
      const after = padAfter(g);
      const full = g.in.map((size, i) => g.padBefore[i] + size + after[i]) as unknown as Triple;
      const out = tf.tidy(() => {
        const dyt = tf.tensor5d(dy, [g.n, g.out[0], g.out[1], g.out[2], g.cout]);
        const wt = tf.tensor5d(e.data, [e.k[0], e.k[1], e.k[2], g.cin, g.cout]);
        // The gradient over the padded extent, then the padding cut off (and zeros for unread trailing input).
        const dxp = tf.conv3dTranspose(dyt, wt, [g.n, full[0], full[1], full[2], g.cin], stride(g), 'valid');
        const keep = g.in.map((size, i) => Math.min(size, full[i] - g.padBefore[i]));
        let dx = tf.slice(dxp, [0, g.padBefore[0], g.padBefore[1], g.padBefore[2], 0], [g.n, keep[0], keep[1], keep[2], g.cin]) as T5;
        if (keep.some((k, i) => k < g.in[i])) dx = tf.pad(dx, [[0, 0], [0, g.in[0] - keep[0]], [0, g.in[1] - keep[1]], [0, g.in[2] - keep[2]], [0, 0]]);
        return dx;
      });
      return read(out);
    },
    conv3dBackwardFilter(x, dy, g) {
      const ke = g.k.map((k, i) => g.dilation[i] * (k - 1) + 1) as unknown as Triple;
      const out = tf.tidy(() => {
        const xt = padInput(tf.tensor5d(x, [g.n, g.in[0], g.in[1], g.in[2], g.cin]), g);
        const dyt = tf.tensor5d(dy, [g.n, g.out[0], g.out[1], g.out[2], g.cout]);
        return tf.engine().runKernel('Conv3DBackpropFilterV2', { x: xt, dy: dyt }, { strides: stride(g), pad: 'valid', filterShape: [ke[0], ke[1], ke[2], g.cin, g.cout] }) as TfModule.Tensor;
      });
      return undilateFilter(read(out), g.k, g.dilation, g.cin, g.cout);
    },
  };
}
