/**
 * plan aggregation.maxWeightShare: no site's declared sample count may give it more than `share` of a round's
 * FedAvg weight. A site claiming 1,000,000 samples otherwise replaces the global model with its own update.
 *
 * Water-filling: weights above a cap c are lowered to c, where c is chosen so that c / Σ min(w, c) = share.
 * When share < 1/n no cap can satisfy it (n equal weights already give 1/n each): every site then gets the
 * smallest weight, i.e. an unweighted mean, the closest to the bound there is.
 */

/** The weights after the cap, in the order given. Weights that need no change are returned as they are. */
export function cappedWeights(weights: readonly number[], share: number): number[] {
  const n = weights.length;
  if (n === 0 || share >= 1) return [...weights];
  const total = weights.reduce((a, b) => a + b, 0);
  if (Math.max(...weights) <= share * total) return [...weights];
  const desc = [...weights].sort((a, b) => b - a);
  // Cap the k largest: c = share · (sum of the other n − k) / (1 − k · share), valid when it lies between them.
  let rest = total;
  for (let k = 1; k < n && k * share < 1; k++) {
    rest -= desc[k - 1];
    const c = (share * rest) / (1 - k * share);
    if (c <= desc[k - 1] * (1 + 1e-12) && c >= desc[k]) return weights.map((w) => Math.min(w, c));
  }
  const smallest = desc[n - 1];
  return weights.map(() => smallest);
}
