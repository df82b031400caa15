/**
 * Pseudo-label confidence calibrated on the site's own validation cases.
 *
 * A fixed confidence threshold means different things for different teachers: a young teacher is over-confident
 * on the lesion boundary, so 0.9 can still keep a pseudo-foreground of which half is background (the students then
 * learn to over-segment). Here the site runs the teacher on its held-back labelled cases and picks the lowest
 * threshold at which the teacher's confident foreground voxels are right often enough (`targetPrecision`), per
 * foreground class — so the threshold follows the teacher's actual reliability on this site's data. Only the
 * chosen threshold and the precisions (aggregates over whole volumes) leave this module; nothing per case.
 */

/** Candidate thresholds, lowest first: the lowest one that reaches the target keeps the most pseudo-labelled voxels. */
export const CONFIDENCE_GRID: readonly number[] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99];

export interface ConfidenceCalibration {
  /** The threshold to use for this generation's pseudo-labels. */
  readonly confidence: number;
  /** Whether every foreground class reached the target at `confidence` (false: the grid's top value is used). */
  readonly reached: boolean;
  /** Precision of the confident predictions of each foreground class at `confidence` (NaN where the teacher predicted none). */
  readonly precision: readonly number[];
  /** Share of validation voxels at or above `confidence` (how much the pseudo-label loss keeps). */
  readonly keptFraction: number;
}

/** One validation case: teacher probabilities [voxels × C] and the true labels. */
export interface CalibrationCase {
  readonly probs: Float32Array;
  readonly label: Uint8Array;
}

/**
 * The lowest grid threshold τ at which, for every foreground class c, the voxels the teacher labels c with max
 * probability ≥ τ are truly c in at least `targetPrecision` of cases. A class the teacher never predicts at τ
 * constrains nothing (it contributes no pseudo-foreground). Throws without cases: calibration needs validation.
 */
export function calibrateConfidence(cases: readonly CalibrationCase[], numClasses: number, targetPrecision: number): ConfidenceCalibration {
  if (cases.length === 0) throw new Error('confidence calibration needs at least one validation case');
  const G = CONFIDENCE_GRID.length;
  const C = numClasses;
  // predicted[g][c] / correct[g][c]: voxels with argmax c and max-probability ≥ grid[g], and those truly c.
  const predicted = Array.from({ length: G }, () => new Float64Array(C));
  const correct = Array.from({ length: G }, () => new Float64Array(C));
  let voxels = 0;
  for (const { probs, label } of cases) {
    const nv = label.length;
    if (probs.length !== nv * C) throw new Error(`calibration case: ${probs.length} probabilities for ${nv} voxels × ${C} classes`);
    voxels += nv;
    for (let v = 0; v < nv; v++) {
      const o = v * C;
      let best = 0;
      for (let c = 1; c < C; c++) if (probs[o + c] > probs[o + best]) best = c;
      const p = probs[o + best];
      const hit = label[v] === best ? 1 : 0;
      // The grid is ascending: every threshold up to p counts this voxel.
      for (let g = 0; g < G && CONFIDENCE_GRID[g] <= p; g++) {
        predicted[g][best]++;
        correct[g][best] += hit;
      }
    }
  }
  const precisionAt = (g: number) => Array.from({ length: C - 1 }, (_, k) => (predicted[g][k + 1] > 0 ? correct[g][k + 1] / predicted[g][k + 1] : Number.NaN));
  const keptAt = (g: number) => predicted[g].reduce((a, b) => a + b, 0) / voxels;
  for (let g = 0; g < G; g++) {
    const precision = precisionAt(g);
    if (precision.every((p) => Number.isNaN(p) || p >= targetPrecision)) return { confidence: CONFIDENCE_GRID[g], reached: true, precision, keptFraction: keptAt(g) };
  }
  const top = G - 1;
  return { confidence: CONFIDENCE_GRID[top], reached: false, precision: precisionAt(top), keptFraction: keptAt(top) };
}
