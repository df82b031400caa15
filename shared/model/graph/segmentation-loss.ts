/**
 * The segmentation training loss on Float32Arrays: ½·(cross-entropy + 1 − mean soft Dice of the foreground
 * classes) of logits [voxels, C] against soft one-hot targets, soft Dice per class over the whole batch (nnU-Net's
 * "batch Dice"), and its gradient with respect to the logits. This JS pass is the reference; the native addon
 * has the same loop in C++ (ElementwiseKernels.segmentationLoss), which the Med3D trainer uses when it is built.
 */

/** Soft-Dice smoothing in voxels: negligible against real counts, keeps empty-foreground batches finite. */
export const DICE_SMOOTH = 1;

/**
 * The loss and its gradient with respect to the logits in one JS pass (the tf-ops version in the tfjs trainer
 * costs ~20% of a cpu training step). `alloc` gives the gradient's array (a training step's buffer pool). Rows of `oneHot` must sum to 1 (soft rows are fine). `weight` (one value per
 * voxel) scales each voxel's share of the cross-entropy and of the Dice sums; 0 masks a voxel out. Without it
 * the result is bit for bit the unweighted loss.
 */
export function segmentationLossJs(
  z: Float32Array,
  oneHot: Float32Array,
  numClasses: number,
  weight?: Float32Array,
  alloc: (n: number) => Float32Array = (n) => new Float32Array(n),
): { loss: number; grad: Float32Array } {
  const C = numClasses;
  const nv = z.length / C;
  const p = new Float32Array(z.length);
  const inter = new Float64Array(C);
  const psum = new Float64Array(C);
  const gsum = new Float64Array(C);
  let ce = 0;
  if (weight && weight.length !== nv) throw new Error(`segmentation loss: ${weight.length} voxel weights for ${nv} voxels`);
  for (let v = 0, o = 0; v < nv; v++, o += C) {
    const wv = weight ? weight[v] : 1;
    let max = z[o];
    for (let c = 1; c < C; c++) if (z[o + c] > max) max = z[o + c];
    let se = 0;
    for (let c = 0; c < C; c++) se += Math.exp(z[o + c] - max);
    const lse = max + Math.log(se);
    for (let c = 0; c < C; c++) {
      const g = oneHot[o + c];
      const pc = Math.exp(z[o + c] - lse);
      p[o + c] = pc;
      if (weight) {
        if (g !== 0) ce -= wv * g * (z[o + c] - lse);
        inter[c] += wv * pc * g;
        psum[c] += wv * pc;
        gsum[c] += wv * g;
        continue;
      }
      if (g !== 0) ce -= g * (z[o + c] - lse);
      inter[c] += pc * g;
      psum[c] += pc;
      gsum[c] += g;
    }
  }
  ce /= nv;
  let diceMean = 0;
  // dL/dp for foreground class c at a voxel is coefA[c]·g + coefB[c] (Dice is linear in g there).
  const coefA = new Float64Array(C);
  const coefB = new Float64Array(C);
  const w = -0.5 / (C - 1);
  for (let c = 1; c < C; c++) {
    const den = psum[c] + gsum[c] + DICE_SMOOTH;
    const num = 2 * inter[c] + DICE_SMOOTH;
    diceMean += num / den / (C - 1);
    coefA[c] = (w * 2) / den;
    coefB[c] = (-w * num) / (den * den);
  }
  const loss = 0.5 * (ce + 1 - diceMean);
  const grad = alloc(z.length);
  const a = new Float64Array(C);
  const ceScale = 0.5 / nv;
  for (let v = 0, o = 0; v < nv; v++, o += C) {
    // Back through softmax: dz_j = p_j·(a_j − Σ_k p_k·a_k), plus the cross-entropy term (p − g)/NV.
    let dot = 0;
    for (let c = 0; c < C; c++) {
      a[c] = coefA[c] * oneHot[o + c] + coefB[c];
      dot += p[o + c] * a[c];
    }
    if (weight) {
      const wv = weight[v];
      for (let c = 0; c < C; c++) grad[o + c] = wv * (p[o + c] * (a[c] - dot) + ceScale * (p[o + c] - oneHot[o + c]));
      continue;
    }
    for (let c = 0; c < C; c++) grad[o + c] = p[o + c] * (a[c] - dot) + ceScale * (p[o + c] - oneHot[o + c]);
  }
  return { loss, grad };
}
