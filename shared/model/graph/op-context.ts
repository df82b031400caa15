/**
 * What a layer's training op gets from the graph it runs in: its parameters (by name), the elementwise kernels
 * (with the step's allocator and the native addon's functions by name), and the tape to record its backward on.
 */
import type { ElementwiseKernels } from '../../engine/elementwise-kernels.ts';
import type { Act } from './tape.ts';

/** Where ops read parameters and put their gradients; parameters are referred to by name. */
export interface ParamStore {
  value(name: string): Float32Array;
  shape(name: string): readonly number[];
  /** The gradient accumulator of a trained parameter; undefined when it is frozen or not trained. */
  grad(name: string): Float32Array | undefined;
}

export interface OpContext {
  readonly store: ParamStore;
  /** Batch statistics and running-statistics updates (BatchNorm), dropout on. */
  readonly training: boolean;
  /** PyTorch BatchNorm momentum (weight of the new batch in the running estimate). */
  readonly bnMomentum: number;
  /** Outputs come from `kernels.alloc`; `kernels.native(name)` is the addon's function of that name, if built. */
  readonly kernels: ElementwiseKernels;
  /** Records a backward step (no-op for inference). */
  record(backward: () => void): void;
  /** Adds a gradient into an input's; `owned` lets it take the array over. */
  accumulate(a: Act, g: Float32Array, owned: boolean): void;
}
