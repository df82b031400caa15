/**
 * The close of a plain mean (FedAvg over weights, unclipped): each float64 sum times 1/Σw, rounded to float32 and
 * written over the sums' own memory (float32 element i lives in bytes [4i, 4i+4), which only overlap sums already
 * read when the loop goes upwards). The native addon's loop where it is built (fold.cc fold_mean_f32, in the widest
 * SIMD the CPU runs), else the JS loop: one rounding for the product and one to float32 either way, the same bytes.
 */
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import type { NativeFoldVariant } from './checked-fold.ts';

/** Writes sums[i]·inv as float32 over `sums` and returns the float32 view of it (sums.length values). */
export type MeanToF32 = (sums: Float64Array, inv: number) => Float32Array;

export const meanToF32Js: MeanToF32 = (sums, inv) => {
  const y = new Float32Array(sums.buffer, sums.byteOffset, sums.length);
  for (let i = 0; i < sums.length; i++) y[i] = sums[i] * inv;
  return y;
};

interface MeanAddon {
  foldMeanF32(sums: Float64Array, inv: number, variant?: NativeFoldVariant): Float32Array;
}

function meanAddon(): MeanAddon | undefined {
  const addon = loadOneDnnKernels().kernels?.addon as Partial<MeanAddon> | undefined;
  return typeof addon?.foldMeanF32 === 'function' ? (addon as MeanAddon) : undefined;
}

/** The addon's loop forced to one variant (tests compare them). Throws without the addon, or where the CPU lacks `variant`. */
export function nativeMeanToF32With(variant: NativeFoldVariant): MeanToF32 {
  const addon = meanAddon();
  if (!addon) throw new Error('the native mean close is unavailable: build the addon (npm run build:native)');
  return (sums, inv) => addon.foldMeanF32(sums, inv, variant);
}

let chosen: MeanToF32 | undefined;

/** meanToF32Js's result, computed by the addon when it is built and has the loop (an older build: the JS loop). */
export const meanToF32: MeanToF32 = (sums, inv) => {
  if (!chosen) {
    const addon = meanAddon();
    chosen = addon ? (s, f) => addon.foldMeanF32(s, f) : meanToF32Js;
  }
  return chosen(sums, inv);
};
