/**
 * The convolution-kernel seam: 3D convolution forward and both gradients on plain Float32Arrays.
 * Everything else in a training step (BatchNorm, ReLU, pooling, losses) is memory-bound and runs in JS;
 * convolutions are where the FLOPs are, so they get interchangeable implementations:
 *   - "js": hand-written loops (always available, the reference for the others' tests),
 *   - "onednn": a native addon over oneDNN, the library PyTorch itself uses on CPU (when built).
 * Transposed convolution needs no kernels of its own: its forward is conv3dBackwardData, its input
 * gradient is conv3d, and its weight gradient is conv3dBackwardFilter with the roles of x and dy swapped.
 *
 * Layouts: activations NDHWC (channels last), weights [kD, kH, kW, cin, cout] (tfjs / TF "DHWIO").
 */

export type Triple = readonly [number, number, number];

export interface Conv3dGeom {
  readonly n: number;
  /** Input spatial size [D, H, W]. */
  readonly in: Triple;
  readonly cin: number;
  readonly cout: number;
  /** Kernel size [kD, kH, kW]. */
  readonly k: Triple;
  readonly stride: Triple;
  readonly dilation: Triple;
  /** Zero padding before each spatial dimension; the padding after is implied by `out`. */
  readonly padBefore: Triple;
  /** Output spatial size [D, H, W]. */
  readonly out: Triple;
}

/**
 * Each method may be given `out`, an array of the result's length with any contents: an implementation that
 * supports it writes every value of the result there and returns `out` (the training step's buffer pool hands
 * these out); one that does not returns a new array, so callers use the returned array, never `out` itself.
 */
export interface ConvKernels {
  /** "js" or "onednn"; shown in logs, `medfl status` and benchmark output. */
  readonly name: string;
  /** y[n, out…, cout] = Σ x[n, in…, cin] · w[k…, cin, cout] (no bias). */
  conv3d(x: Float32Array, w: Float32Array, g: Conv3dGeom, out?: Float32Array): Float32Array;
  /** dx[n, in…, cin] for a given dy[n, out…, cout]. */
  conv3dBackwardData(dy: Float32Array, w: Float32Array, g: Conv3dGeom, out?: Float32Array): Float32Array;
  /** dw[k…, cin, cout] for a given x and dy. */
  conv3dBackwardFilter(x: Float32Array, dy: Float32Array, g: Conv3dGeom, out?: Float32Array): Float32Array;
}

const triple = (v: number | Triple): Triple => (typeof v === 'number' ? [v, v, v] : v);

/** PyTorch Conv3d geometry: symmetric zero padding, out = ⌊(in + 2p − d(k−1) − 1)/s⌋ + 1. */
export function torchConvGeom(
  xShape: readonly number[],
  cout: number,
  opts: { k: number | Triple; stride?: number | Triple; dilation?: number | Triple; pad?: number | Triple },
): Conv3dGeom {
  const [n, D, H, W, cin] = xShape;
  const k = triple(opts.k);
  const stride = triple(opts.stride ?? 1);
  const dilation = triple(opts.dilation ?? 1);
  const pad = triple(opts.pad ?? 0);
  const inp: Triple = [D, H, W];
  const out = inp.map((size, i) => Math.floor((size + 2 * pad[i] - dilation[i] * (k[i] - 1) - 1) / stride[i]) + 1) as unknown as Triple;
  if (out.some((o) => o < 1)) throw new Error(`conv3d: input ${inp.join('×')} is too small for kernel ${k.join('×')} (out ${out.join('×')})`);
  return { n, in: inp, cin, cout, k, stride, dilation, padBefore: pad, out };
}

/** TF "same" padding: out = ⌈in/s⌉, the odd extra padding after (tiny3d's layout). */
export function tfSameGeom(xShape: readonly number[], cout: number, k: number, stride: number): Conv3dGeom {
  const [n, D, H, W, cin] = xShape;
  const inp: Triple = [D, H, W];
  const out = inp.map((size) => Math.ceil(size / stride)) as unknown as Triple;
  const padBefore = inp.map((size, i) => Math.floor(Math.max((out[i] - 1) * stride + k - size, 0) / 2)) as unknown as Triple;
  return { n, in: inp, cin, cout, k: [k, k, k], stride: [stride, stride, stride], dilation: [1, 1, 1], padBefore, out };
}

/** Padding after each dimension implied by the geometry (may be negative: trailing input not read). */
export function padAfter(g: Conv3dGeom): Triple {
  return g.in.map((size, i) => (g.out[i] - 1) * g.stride[i] + g.dilation[i] * (g.k[i] - 1) + 1 - size - g.padBefore[i]) as unknown as Triple;
}

export const inputLength = (g: Conv3dGeom): number => g.n * g.in[0] * g.in[1] * g.in[2] * g.cin;
export const outputLength = (g: Conv3dGeom): number => g.n * g.out[0] * g.out[1] * g.out[2] * g.cout;
export const weightLength = (g: Conv3dGeom): number => g.k[0] * g.k[1] * g.k[2] * g.cin * g.cout;
/** Multiply-adds of one forward pass (each gradient costs about the same). */
export const convMacs = (g: Conv3dGeom): number => outputLength(g) * g.k[0] * g.k[1] * g.k[2] * g.cin;
