/**
 * The validation filter: every update is checked before it counts. Names, dtypes, shapes and sample
 * counts here; finiteness and the delta norm in one pass over the update (norm.ts-style loop below).
 */
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import { checkAgainstSpecs, findNonFinite, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { asBaseBlocks, BASE_BLOCK_FLOATS, type BaseLike } from './base-blocks.ts';
import type { UpdateInfo } from './strategy.ts';

export interface ValidationRules {
  readonly minSamples: number;
  readonly maxSamples: number;
  readonly maxNorm?: number;
  readonly maxNormFactor?: number;
  /** Accepted norms needed before maxNormFactor applies. */
  readonly normReference: number;
  /** Largest magnitude any weight an update proposes may have (absolute: applies from the first update on). */
  readonly maxValue?: number;
}

/** No trained network weight comes near this; 3e38 (what broke a federation) is far beyond it. */
export const DEFAULT_MAX_VALUE = 1e6;

export const DEFAULT_RULES: ValidationRules = { minSamples: 1, maxSamples: 1_000_000, normReference: 3, maxValue: DEFAULT_MAX_VALUE };

/** Layout and sample-count problems (cheap), or undefined. */
export function shapeAndSamplesProblem(update: TensorBundle, info: UpdateInfo, specs: readonly TensorSpec[], rules: ValidationRules): string | undefined {
  const spec = checkAgainstSpecs(update, specs);
  if (spec) return `update does not match the plan's shared tensors: ${spec}`;
  return samplesProblem(info, rules);
}

/** The claimed sample count against the plan's minSamples and maxSamples. */
export function samplesProblem(info: UpdateInfo, rules: ValidationRules): string | undefined {
  if (!Number.isInteger(info.numSamples) || info.numSamples < rules.minSamples) {
    return `update claims ${info.numSamples} training samples; the plan needs at least ${rules.minSamples} (aggregation.validation.minSamples)`;
  }
  if (info.numSamples > rules.maxSamples) {
    return `update claims ${info.numSamples} training samples, more than the plan's plausible maximum ${rules.maxSamples} (aggregation.validation.maxSamples)`;
  }
  return undefined;
}

/**
 * L2 norm of the update's delta against the base (`base` flat in spec order or read in blocks, `offsets` per
 * tensor), or of the update itself when it is a delta. Non-finite values make the sum non-finite; the caller then
 * names the tensor.
 */
export type DeltaNorm = (update: TensorBundle, isDelta: boolean, base: BaseLike | undefined, offsets: ReadonlyMap<string, { off: number; n: number }>) => number;

/** The JS loop (the reference; what runs without the native addon). */
export const deltaNormJs: DeltaNorm = (update, isDelta, baseLike, offsets) => {
  const base = asBaseBlocks(baseLike);
  const lanes = new Float64Array(4);
  let s = 0;
  for (const [name, { off, n }] of offsets) {
    const x = update.get(name)!.data;
    lanes.fill(0);
    if (isDelta || !base) deltaSqLanesJs(x.subarray(0, n), undefined, lanes);
    else {
      // Block by block (a multiple of four long): each lane sees the same values in the same order as in one loop.
      for (let at = 0; at < n; at += BASE_BLOCK_FLOATS) {
        const len = Math.min(BASE_BLOCK_FLOATS, n - at);
        deltaSqLanesJs(x.subarray(at, at + len), base.block(off + at, len), lanes);
      }
    }
    s += lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
  return Math.sqrt(s);
};

interface NormAddon {
  deltaSqLanes(x: Float32Array, b: Float32Array | null, lanes: Float64Array): void;
}

/** The same sums in the addon (one thread, the same four lanes in the same order): equal to deltaNormJs bit for bit. */
function nativeDeltaNorm(addon: NormAddon): DeltaNorm {
  const lanes = new Float64Array(4);
  return (update, isDelta, baseLike, offsets) => {
    const base = isDelta ? undefined : asBaseBlocks(baseLike);
    let s = 0;
    for (const [name, { off, n }] of offsets) {
      const x = update.get(name)!.data;
      lanes.fill(0);
      if (!base) addon.deltaSqLanes(x.length === n ? x : x.subarray(0, n), null, lanes);
      // The lanes carry on across blocks (a multiple of four long): the one-call sums bit for bit.
      else for (let at = 0; at < n; at += BASE_BLOCK_FLOATS) {
        const len = Math.min(BASE_BLOCK_FLOATS, n - at);
        addon.deltaSqLanes(x.subarray(at, at + len), base.block(off + at, len), lanes);
      }
      s += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
    return Math.sqrt(s);
  };
}

/**
 * lanes += the four interleaved float64 sums of (x − b)² (b undefined: x²), the x.length mod 4 values past the last
 * group of four added to lanes[0]: deltaNormJs's loop over one piece of a tensor. Called on consecutive pieces a
 * multiple of four long, the lanes end as one call over the whole tensor leaves them, so a pass that measures the
 * norm piece by piece (a spill, robust.ts) gets deltaNorm's result bit for bit.
 */
export type DeltaSqLanes = (x: Float32Array, b: Float32Array | undefined, lanes: Float64Array) => void;

export const deltaSqLanesJs: DeltaSqLanes = (x, b, lanes) => {
  let s0 = lanes[0], s1 = lanes[1], s2 = lanes[2], s3 = lanes[3];
  const n = x.length;
  const n4 = n - (n % 4);
  let i = 0;
  if (!b) {
    for (; i < n4; i += 4) {
      const p = x[i], q = x[i + 1], r = x[i + 2], t = x[i + 3];
      s0 += p * p; s1 += q * q; s2 += r * r; s3 += t * t;
    }
    for (; i < n; i++) s0 += x[i] * x[i];
  } else {
    for (; i < n4; i += 4) {
      const p = x[i] - b[i], q = x[i + 1] - b[i + 1], r = x[i + 2] - b[i + 2], t = x[i + 3] - b[i + 3];
      s0 += p * p; s1 += q * q; s2 += r * r; s3 += t * t;
    }
    for (; i < n; i++) {
      const p = x[i] - b[i];
      s0 += p * p;
    }
  }
  lanes[0] = s0; lanes[1] = s1; lanes[2] = s2; lanes[3] = s3;
};

let chosenLanes: DeltaSqLanes | undefined;

/** deltaSqLanesJs's sums, computed by the native addon when it is built (the loop behind deltaNorm). */
export const deltaSqLanes: DeltaSqLanes = (x, b, lanes) => {
  if (!chosenLanes) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<NormAddon> | undefined;
    chosenLanes = typeof addon?.deltaSqLanes === 'function' ? (xs, bs, l) => (addon as NormAddon).deltaSqLanes(xs, bs ?? null, l) : deltaSqLanesJs;
  }
  chosenLanes(x, b, lanes);
};

let chosenNorm: DeltaNorm | undefined;

/** deltaNormJs's result, computed by the native addon when it is built and has the loop (reads the arrays in place). */
export const deltaNorm: DeltaNorm = (update, isDelta, base, offsets) => {
  if (!chosenNorm) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<NormAddon> | undefined;
    chosenNorm = typeof addon?.deltaSqLanes === 'function' ? nativeDeltaNorm(addon as NormAddon) : deltaNormJs;
  }
  return chosenNorm(update, isDelta, base, offsets);
};

/** The refusal for a weight beyond ±maxValue, in one wording wherever it is found (events/reasons.ts matches it). */
export function valueBoundMessage(v: number, tensor: string, index: number, maxValue: number): string {
  return `update proposes weight ${v.toPrecision(4)} in tensor "${tensor}" at index ${index}, beyond the plan's bound ±${maxValue} (aggregation.validation.maxValue); no trained network holds such values`;
}

/**
 * The first weight beyond ±maxValue that `update` proposes (base + Δ for a delta upload), or undefined.
 * Callers skip this pass when a norm already bounds every value (see ComposedRound.check).
 */
export function valueBoundProblem(
  update: TensorBundle,
  maxValue: number,
  delta?: { base: BaseLike; offsets: ReadonlyMap<string, { off: number; n: number }> },
): string | undefined {
  const base = asBaseBlocks(delta?.base);
  for (const t of update.values()) {
    const x = t.data;
    const off = delta ? delta.offsets.get(t.name)?.off : undefined;
    for (let at = 0; at < x.length; at += BASE_BLOCK_FLOATS) {
      const end = Math.min(x.length, at + BASE_BLOCK_FLOATS);
      const b = off !== undefined ? base!.block(off + at, end - at) : undefined;
      for (let i = at; i < end; i++) {
        const v = b ? b[i - at] + x[i] : x[i];
        if (v > maxValue || v < -maxValue) {
          return valueBoundMessage(v, t.name, i, maxValue);
        }
      }
    }
  }
  return undefined;
}

/**
 * Why a finished aggregate must not become a model version (a non-finite value, or one beyond ±maxValue), or
 * undefined. The last line of defence: whatever a strategy, optimiser or noise did, this is what sites would train from.
 */
export function aggregateProblem(result: TensorBundle, maxValue?: number): string | undefined {
  for (const t of result.values()) {
    const x = t.data;
    for (let i = 0; i < x.length; i++) {
      const v = x[i];
      if (v - v !== 0) return `the aggregate holds ${Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf'} in tensor "${t.name}" at index ${i}`;
      if (maxValue !== undefined && (v > maxValue || v < -maxValue)) {
        return `the aggregate holds ${v.toPrecision(4)} in tensor "${t.name}" at index ${i}, beyond ±${maxValue} (aggregation.validation.maxValue)`;
      }
    }
  }
  return undefined;
}

export function nonFiniteProblem(update: TensorBundle): string | undefined {
  const nf = findNonFinite(update);
  return nf ? `update holds non-finite values: ${nf}` : undefined;
}

/** Refusal for a delta norm beyond the absolute bound or k × the reference median, or undefined. */
export function normProblem(norm: number, rules: ValidationRules, reference: readonly number[]): string | undefined {
  if (rules.maxNorm !== undefined && norm > rules.maxNorm) {
    return `update delta has L2 norm ${norm.toPrecision(4)}, above the plan's bound ${rules.maxNorm} (aggregation.validation.maxNorm); check the site's learning rate and data`;
  }
  if (rules.maxNormFactor !== undefined && reference.length >= rules.normReference) {
    const med = median(reference);
    if (norm > rules.maxNormFactor * med) {
      return `update delta has L2 norm ${norm.toPrecision(4)}, more than ${rules.maxNormFactor} × the median ${med.toPrecision(4)} of recently accepted updates (aggregation.validation.maxNormFactor)`;
    }
  }
  return undefined;
}

export function median(xs: readonly number[]): number {
  const a = [...xs].sort((p, q) => p - q);
  const m = a.length >> 1;
  return a.length % 2 ? a[m] : (a[m - 1] + a[m]) / 2;
}
