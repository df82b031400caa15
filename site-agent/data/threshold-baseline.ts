/**
 * The classical baseline the synthetic brain benchmark reports: "a global intensity threshold inside the
 * brain mask". On a site's labelled training cases it picks, over a grid, the threshold on normalised
 * intensity (and optionally a minimum connected-component size, 6-connectivity) with the best mean Dice,
 * then applies that rule to test cases (already loaded and normalised by SiteData) and reports their mean
 * Dice (shared/metrics/dice.ts). Brain mask = nonzero voxels, as the MRI normalisation defines it.
 */
import { diceScores } from '../../shared/metrics/dice.ts';
import { SiteData, type SiteDataOptions } from './site-data.ts';
import type { Shape3 } from './types.ts';

export interface BaselineCase {
  readonly shape: Shape3;
  /** channels[0] is used: normalised intensity, 0 outside the brain. */
  readonly channels: readonly Float32Array[];
  readonly label?: Uint8Array;
}

export interface ThresholdBaselineOptions {
  /** Candidate thresholds on normalised intensity; default 0, 0.1, …, 5. */
  readonly thresholds?: readonly number[];
  /** Candidate minimum component sizes in voxels; default 0 (none), 8, 32, 64, 128, 256, 512. */
  readonly minComponentVoxels?: readonly number[];
  /** Plan spacing [D, H, W] mm the training cases are loaded at; use the one the test cases were loaded with. */
  readonly spacing?: Shape3;
  /** Patch shape for SiteData.open (unused here beyond validation); default 16³. */
  readonly patch?: Shape3;
  /** The plan's intensity normalisation, which the test cases were loaded with too; default auto. */
  readonly normalization?: SiteDataOptions['normalization'];
  /** The plan's bias-field correction, which the test cases were loaded with too; default none. */
  readonly biasCorrection?: SiteDataOptions['biasCorrection'];
}

export interface ThresholdBaselineResult {
  readonly threshold: number;
  readonly minComponentVoxels: number;
  /** Mean Dice of the chosen rule on the training cases. */
  readonly trainDice: number;
  readonly trainCases: number;
  /** Mean Dice over the test cases (NaN when none has a label). */
  readonly testDice: number;
  readonly testDicePerCase: readonly number[];
}

const DEFAULT_THRESHOLDS = Array.from({ length: 51 }, (_, i) => Math.round(i * 10) / 100);
const DEFAULT_MIN_SIZES = [0, 8, 32, 64, 128, 256, 512];

interface Components {
  /** Component id per voxel (-1 = not above threshold). */
  readonly id: Int32Array;
  readonly sizes: number[];
}

/**
 * 6-connected components of {v !== 0 and v > threshold}, visiting only `candidates` (indices of voxels that can
 * pass any threshold of the grid) and using `stamp` as the visited marker so one buffer serves every threshold.
 */
function components(img: Float32Array, shape: Shape3, threshold: number, candidates: Uint32Array, id: Int32Array, visitStamp: Int32Array, stamp: number, stack: Int32Array): Components {
  const [D, H, W] = shape;
  const HW = H * W;
  const sizes: number[] = [];
  for (const start of candidates) {
    if (visitStamp[start] === stamp || !(img[start] > threshold)) continue;
    const comp = sizes.length;
    let top = 0;
    stack[top++] = start;
    visitStamp[start] = stamp;
    let size = 0;
    while (top > 0) {
      const k = stack[--top];
      id[k] = comp;
      size++;
      const z = (k / HW) | 0;
      const r = k - z * HW;
      const y = (r / W) | 0;
      const x = r - y * W;
      const push = (q: number): void => {
        if (visitStamp[q] !== stamp && img[q] !== 0 && img[q] > threshold) {
          visitStamp[q] = stamp;
          stack[top++] = q;
        }
      };
      if (x > 0) push(k - 1);
      if (x < W - 1) push(k + 1);
      if (y > 0) push(k - W);
      if (y < H - 1) push(k + W);
      if (z > 0) push(k - HW);
      if (z < D - 1) push(k + HW);
    }
    sizes.push(size);
  }
  return { id, sizes };
}

/** The rule as a mask: voxels inside the brain above `threshold`, in components of at least `minComponentVoxels`. */
export function applyThresholdRule(img: Float32Array, shape: Shape3, threshold: number, minComponentVoxels: number): Uint8Array {
  const n = img.length;
  const candidates: number[] = [];
  for (let k = 0; k < n; k++) if (img[k] !== 0 && img[k] > threshold) candidates.push(k);
  const out = new Uint8Array(n);
  if (minComponentVoxels <= 1) {
    for (const k of candidates) out[k] = 1;
    return out;
  }
  const id = new Int32Array(n);
  const c = components(img, shape, threshold, Uint32Array.from(candidates), id, new Int32Array(n), 1, new Int32Array(n));
  for (const k of candidates) if (c.sizes[id[k]] >= minComponentVoxels) out[k] = 1;
  return out;
}

/** Fit the rule on `siteDir`'s labelled training cases, score it on `testCases`. */
export async function thresholdBaseline(siteDir: string, testCases: readonly BaselineCase[], opts: ThresholdBaselineOptions = {}): Promise<ThresholdBaselineResult> {
  const thresholds = [...(opts.thresholds ?? DEFAULT_THRESHOLDS)].sort((a, b) => a - b);
  const minSizes = opts.minComponentVoxels ?? DEFAULT_MIN_SIZES;
  if (thresholds.length === 0 || minSizes.length === 0) throw new RangeError('thresholdBaseline: need at least one threshold and one minimum component size');
  const data = await SiteData.open(siteDir, { patch: opts.patch ?? [16, 16, 16], ...(opts.spacing ? { spacing: opts.spacing } : {}), ...(opts.normalization ? { normalization: opts.normalization } : {}), ...(opts.biasCorrection ? { biasCorrection: opts.biasCorrection } : {}) });

  // diceSum[t][m]: summed training Dice of (threshold t, min size m).
  const diceSum = thresholds.map(() => new Float64Array(minSizes.length));
  let trainCases = 0;
  for (const ref of data.train) {
    const c = await data.load(ref);
    if (!c?.label) continue;
    trainCases++;
    const img = c.channels[0];
    const label = c.label;
    const n = img.length;
    let truth = 0;
    const cand: number[] = [];
    for (let k = 0; k < n; k++) {
      if (label[k] > 0) truth++;
      if (img[k] !== 0 && img[k] > thresholds[0]) cand.push(k);
    }
    const candidates = Uint32Array.from(cand);
    const id = new Int32Array(n);
    const visit = new Int32Array(n);
    const stack = new Int32Array(n);
    thresholds.forEach((t, ti) => {
      const comp = components(img, c.shape, t, candidates, id, visit, ti + 1, stack);
      const overlap = new Float64Array(comp.sizes.length);
      for (const k of candidates) if (visit[k] === ti + 1 && label[k] > 0) overlap[id[k]]++;
      minSizes.forEach((m, mi) => {
        let pred = 0;
        let inter = 0;
        comp.sizes.forEach((s, j) => {
          if (s >= m) {
            pred += s;
            inter += overlap[j];
          }
        });
        // Same convention as diceScores: nothing predicted and nothing there scores 1.
        diceSum[ti][mi] += pred + truth === 0 ? 1 : (2 * inter) / (pred + truth);
      });
    });
  }
  if (trainCases === 0) throw new Error(`thresholdBaseline: no usable labelled training case in ${siteDir}`);

  let best = { ti: 0, mi: 0, dice: -1 };
  thresholds.forEach((_, ti) => minSizes.forEach((__, mi) => {
    if (diceSum[ti][mi] > best.dice) best = { ti, mi, dice: diceSum[ti][mi] };
  }));
  const threshold = thresholds[best.ti];
  const minComponentVoxels = minSizes[best.mi];

  const testDicePerCase: number[] = [];
  for (const c of testCases) {
    if (!c.label) continue;
    const pred = applyThresholdRule(c.channels[0], c.shape, threshold, minComponentVoxels);
    testDicePerCase.push(diceScores(pred, c.label, 2)[0]);
  }
  const testDice = testDicePerCase.length === 0 ? Number.NaN : testDicePerCase.reduce((s, d) => s + d, 0) / testDicePerCase.length;
  return { threshold, minComponentVoxels, trainDice: best.dice / trainCases, trainCases, testDice, testDicePerCase };
}
