/**
 * Where a training step's tensors live: a compute device with its own memory. The Med3D graph on a device
 * (shared/model/graph/device-ops.ts) holds only handles of type B; the device runs every kernel on them, so
 * a step moves the batch in and the loss out and nothing else crosses between host and device. Parameters,
 * their gradients and the optimiser's moments are uploaded once and read back once, at the end.
 *
 * Implementations:
 *   - host (host-device.ts): B is the Float32Array itself; every kernel is the selected ConvKernels /
 *     ElementwiseKernels / optimiser kernel, so it computes exactly what the host tape computes (zero copies).
 *   - cuda (cuda-device.ts): B is a handle to GPU memory; cuDNN convolutions and CUDA kernels (native/cuda/).
 *
 * Memory is step-scoped, as the host tape's BufferPool: everything a kernel returns belongs to the current step
 * and recycle() frees all of it at once; `persistent` uploads and allocations (weights, gradients, moments)
 * stay until free(). Layouts are the host engine's: NDHWC activations, DHWIO convolution weights.
 *
 * S is what a forward kernel saves for its backward (BatchNorm/GroupNorm statistics, max-pool argmax): opaque
 * to the graph, handed back to the same device.
 */
import type { Conv3dGeom } from './conv-kernels.ts';

export interface ComputeDevice<B, S = unknown> {
  readonly name: string;

  // ---- memory ----
  /** n float32 values, contents unspecified; persistent ones survive recycle(). */
  alloc(n: number, persistent?: boolean): B;
  /** A device copy of host values. */
  upload(src: Float32Array, persistent?: boolean): B;
  /** The values of b on the host (into `dst` when given). */
  download(b: B, dst?: Float32Array): Float32Array;
  length(b: B): number;
  /** values [offset, offset + length) of b, sharing its memory (no copy). */
  view(b: B, offset: number, length: number): B;
  fill(b: B, value: number): void;
  /** A step-scoped copy of b. */
  copy(b: B): B;
  /** Frees a persistent buffer. */
  free(b: B): void;
  /** Frees everything the kernels and non-persistent allocations handed out since the last recycle. */
  recycle(): void;

  // ---- convolutions (PyTorch Conv3d, no bias; x NDHWC, w DHWIO) ----
  conv3d(x: B, w: B, g: Conv3dGeom): B;
  conv3dBackwardData(dy: B, w: B, g: Conv3dGeom): B;
  /** gw += the filter gradient for x, dy. */
  conv3dBackwardFilterAdd(x: B, dy: B, g: Conv3dGeom, gw: B): void;

  // ---- normalisation (PyTorch semantics, see ElementwiseKernels) ----
  batchNormTrain(x: B, C: number, gamma: B, beta: B, runMean: B, runVar: B, momentum: number, eps: number, relu: boolean): { y: B; saved: S };
  /** Eval BatchNorm from the running statistics. */
  batchNormEval(x: B, C: number, gamma: B, beta: B, runMean: B, runVar: B, eps: number, relu: boolean): { y: B; saved: S };
  /** Adds dγ, dβ into gg, gb (when given); returns dx when wanted. `y` masks dy (the fused ReLU). */
  batchNormBackward(
    x: B, dy: B, C: number, saved: S, gamma: B, y: B | undefined, batchStats: boolean, wantDx: boolean, gg: B | undefined, gb: B | undefined,
  ): B | undefined;
  groupNormForward(x: B, n: number, C: number, G: number, gamma: B, beta: B, eps: number, relu: boolean): { y: B; saved: S };
  groupNormBackward(
    x: B, dy: B, n: number, C: number, G: number, saved: S, gamma: B, reluOut: B | undefined, wantDx: boolean, gg: B | undefined, gb: B | undefined,
  ): B | undefined;

  // ---- elementwise ----
  relu(x: B): B;
  reluBackward(y: B, dy: B): B;
  add(a: B, b: B, relu: boolean): B;
  /** dst += src. */
  addInto(dst: B, src: B): void;
  /** MaxPool3d 3³ / stride 2 / padding 1 over x [n, D, H, W, C]. */
  maxPool(x: B, shape: readonly number[]): { y: B; saved: S; shape: readonly [number, number, number, number, number] };
  maxPoolBackward(dy: B, saved: S, inShape: readonly number[]): B;
  concat(a: B, Ca: number, b: B, Cb: number): B;
  split(y: B, Ca: number, Cb: number, wantA: boolean, wantB: boolean): { a?: B; b?: B };
  /** y [·, C] += bias, in place. */
  biasAdd(y: B, C: number, bias: B): void;
  /** gb[c] += Σ over voxels of dy[·, c]. */
  biasGradAdd(gb: B, dy: B, C: number): void;
  /** Shortcut A: x[:, ::s, ::s, ::s, :] with zero channels appended up to outChannels. */
  shortcutA(x: B, shape: readonly number[], outChannels: number, stride: number): B;
  shortcutABackward(dy: B, inShape: readonly number[], outChannels: number, stride: number): B;

  // ---- loss and optimiser ----
  /**
   * Mean soft-Dice + cross-entropy of logits z [voxels, C] against soft targets (the host engine's segmentation
   * loss), optionally voxel-weighted: the loss as one value (download it to read it) and dL/dz.
   */
  segmentationLoss(z: B, target: B, C: number, weight: B | undefined): { loss: B; grad: B };
  /** Adam (PyTorch's, decoupled step size lr/c1 and √c2 as in OptimizerKernels). */
  adamStep(w: B, g: B, m: B, v: B, stepSize: number, beta1: number, beta2: number, eps: number, sqrtC2: number, weightDecay: number): void;
  sgdStep(w: B, g: B, buf: B, lr: number, momentum: number, weightDecay: number, first: number): void;
}

/** Any device, for code that only passes handles through. */
export type AnyComputeDevice = ComputeDevice<unknown, unknown>;
