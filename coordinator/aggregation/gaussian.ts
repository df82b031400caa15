/**
 * The DP close's N(0, 1) noise. Uniform 32-bit words come from the CSPRNG (crypto.randomFillSync: OpenSSL's, about
 * 4 GB/s here, so drawing them is not the cost) fresh on every call; Box–Muller turns each pair of words into two
 * samples. The transform is the cost (a log, a sqrt and a sine/cosine per pair): the native addon does it over both
 * cores when built (gaussianFromWords), else the JS twin below. Both use the same float64 formula; they can differ in
 * the last bit of a float32 sample only where the two libms round a log or a cosine differently.
 *
 * Why Box–Muller and not a ziggurat: two words per pair, always (no rejection loop, so the number of CSPRNG words and
 * the time do not depend on the values), an exact transform and no tables. The smallest u1 is 1/(2³² + 1), so
 * |sample| ≤ √(2·ln(2³² + 1)) ≈ 6.66: the tail beyond is cut, a 2.7e-11 share of the normal's mass.
 */
import { randomFillSync } from 'node:crypto';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';

/** Fills `out` with N(0, 1) samples from `words` (out.length rounded up to even of them). */
export type GaussianFromWords = (words: Uint32Array, out: Float32Array) => void;

export const gaussianFromWordsJs: GaussianFromWords = (u, out) => {
  if (u.length !== out.length + (out.length % 2)) throw new Error(`gaussianFromWords: words has ${u.length} elements, expected ${out.length + (out.length % 2)}`);
  for (let i = 0; i < out.length; i += 2) {
    const u1 = (u[i] + 1) / 4294967297; // (0, 1)
    const u2 = u[i + 1] / 4294967296;
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < out.length) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
};

interface GaussianAddon {
  gaussianFromWords: GaussianFromWords;
}

let nativeTransform: GaussianFromWords | null | undefined;

/** The addon's gaussianFromWords when the oneDNN addon is built and has it (an older build has not), else undefined. */
export function gaussianFromWordsNative(): GaussianFromWords | undefined {
  if (nativeTransform === undefined) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<GaussianAddon> | undefined;
    nativeTransform = typeof addon?.gaussianFromWords === 'function' ? addon.gaussianFromWords.bind(addon) : null;
  }
  return nativeTransform ?? undefined;
}

/** The uniform words, refilled from the CSPRNG on every call: reused so a DP close leaves no garbage per block. */
let uniformWords = new Uint32Array(0);

/** A noise source: fresh CSPRNG words on every call, turned into N(0, 1) by `transform`. */
export function cryptoGaussianWith(transform: GaussianFromWords): (out: Float32Array) => void {
  return (out) => {
    const words = out.length + (out.length % 2);
    if (uniformWords.length < words) uniformWords = new Uint32Array(words);
    const u = uniformWords.subarray(0, words);
    randomFillSync(u);
    transform(u, out);
  };
}

let defaultGaussian: ((out: Float32Array) => void) | undefined;

/** N(0, 1) from a CSPRNG: Box–Muller over crypto.randomFillSync, in the addon when built. */
export function cryptoGaussian(out: Float32Array): void {
  defaultGaussian ??= cryptoGaussianWith(gaussianFromWordsNative() ?? gaussianFromWordsJs);
  defaultGaussian(out);
}
