/**
 * Dice on hard label maps (after argmax), shared by the trainer's evaluate(), the data side and the
 * experiment command so every report uses the same definition.
 */

/**
 * Dice 2|A∩B| / (|A|+|B|) per foreground class (result index 0 is class 1). A class absent from both
 * prediction and truth scores 1: the model correctly predicted nothing, and 0/0 must not become NaN.
 * Labels ≥ numClasses are counted for no class.
 */
export function diceScores(pred: Uint8Array, truth: Uint8Array, numClasses: number): number[] {
  if (pred.length !== truth.length) {
    throw new Error(`diceScores: prediction has ${pred.length} voxels, truth has ${truth.length}`);
  }
  if (!Number.isInteger(numClasses) || numClasses < 2) throw new Error(`diceScores: numClasses must be an integer ≥ 2, got ${numClasses}`);
  const predCount = new Float64Array(numClasses + 1);
  const truthCount = new Float64Array(numClasses + 1);
  const inter = new Float64Array(numClasses + 1);
  for (let i = 0; i < pred.length; i++) {
    // Out-of-range labels land in the spare slot instead of being silently mixed into a class.
    const p = pred[i] < numClasses ? pred[i] : numClasses;
    const t = truth[i] < numClasses ? truth[i] : numClasses;
    predCount[p]++;
    truthCount[t]++;
    if (p === t) inter[p]++;
  }
  const out: number[] = [];
  for (let c = 1; c < numClasses; c++) {
    const denom = predCount[c] + truthCount[c];
    out.push(denom === 0 ? 1 : (2 * inter[c]) / denom);
  }
  return out;
}

/** Mean of per-case Dice vectors, class by class. */
export function meanDicePerClass(perCase: readonly (readonly number[])[], numForeground: number): number[] {
  const sums = new Array<number>(numForeground).fill(0);
  for (const d of perCase) for (let c = 0; c < numForeground; c++) sums[c] += d[c];
  return sums.map((s) => (perCase.length === 0 ? Number.NaN : s / perCase.length));
}
