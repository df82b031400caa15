/**
 * Training batches from preprocessed cases: random patches with random flips, one-hot targets.
 * Deterministic in the caller's rng. Shared by the trainers so every engine sees the same data.
 */
import { randomInt, type Rng } from '../util/random.ts';
import type { PatchSource, TrainRequest, VolumeCase } from './types.ts';

export interface Batch {
  /** [batch·D·H·W·C], channels last. */
  readonly image: Float32Array;
  /** [batch·D·H·W, numClasses]; empty when sampled without labels. Soft rows where a case has `target`. */
  readonly oneHot: Float32Array;
  /**
   * Per-voxel loss weights [batch·D·H·W]; only present when some sampled case carries `weight` or `target`
   * (pseudo-labels), so plain labelled batches are exactly what they were.
   */
  readonly weight?: Float32Array;
  /** The case each batch entry came from. */
  readonly cases: readonly VolumeCase[];
}

/**
 * Random patch of each sampled case with random flips on every axis. Dimensions smaller than the
 * patch are zero-padded (image 0 = the normalised mean, label background).
 */
export function sampleBatch(
  cases: readonly VolumeCase[],
  batchSize: number,
  patch: readonly [number, number, number],
  numClasses: number,
  rng: Rng,
  opts: { withLabels?: boolean; inOrder?: boolean; flip?: boolean; channels?: number } = {},
): Batch {
  const withLabels = opts.withLabels ?? true;
  // Every case must have the channels the network takes (default one): a mismatch is a data/plan error, never padded.
  const C = opts.channels ?? 1;
  const flip = opts.flip ?? true;
  const [pd, ph, pw] = patch;
  const pv = pd * ph * pw;
  const image = new Float32Array(batchSize * pv * C);
  const oneHot = new Float32Array(withLabels ? batchSize * pv * numClasses : 0);
  const picked: VolumeCase[] = [];
  let weight: Float32Array | undefined;
  for (let b = 0; b < batchSize; b++) {
    const vc = opts.inOrder ? cases[b % cases.length] : cases[randomInt(rng, cases.length)];
    picked.push(vc);
    if ((vc.channels ?? 1) !== C) throw new Error(`case ${vc.id} has ${vc.channels ?? 1} input channel(s); the model takes ${C}`);
    const [D, H, W] = vc.shape;
    const label = vc.label;
    const target = vc.target;
    if (withLabels && (vc.weight || target) && !weight) weight = new Float32Array(batchSize * pv).fill(1);
    if (withLabels && target && target.length !== D * H * W * numClasses) throw new Error(`case ${vc.id}: soft target holds ${target.length} values, expected ${D * H * W * numClasses}`);
    if (withLabels && !target && !label) throw new Error(`case ${vc.id}: no label and no soft target`);
    const oz = D > pd ? randomInt(rng, D - pd + 1) : 0;
    const oy = H > ph ? randomInt(rng, H - ph + 1) : 0;
    const ox = W > pw ? randomInt(rng, W - pw + 1) : 0;
    const fz = flip && rng() < 0.5;
    const fy = flip && rng() < 0.5;
    const fx = flip && rng() < 0.5;
    const base = b * pv;
    for (let z = 0; z < pd; z++) {
      const sz = oz + (fz ? pd - 1 - z : z);
      for (let y = 0; y < ph; y++) {
        const sy = oy + (fy ? ph - 1 - y : y);
        for (let x = 0; x < pw; x++) {
          const sx = ox + (fx ? pw - 1 - x : x);
          const dst = base + (z * ph + y) * pw + x;
          if (sz < D && sy < H && sx < W) {
            const src = (sz * H + sy) * W + sx;
            if (C === 1) image[dst] = vc.image[src];
            else for (let c = 0; c < C; c++) image[dst * C + c] = vc.image[src * C + c];
            if (withLabels && target) {
              for (let c = 0; c < numClasses; c++) oneHot[dst * numClasses + c] = target[src * numClasses + c];
              if (vc.weight) weight![dst] = vc.weight[src];
            } else if (withLabels) {
              if (vc.weight) weight![dst] = vc.weight[src];
              const cls = label![src];
              if (cls >= numClasses) throw new Error(`case ${vc.id}: label ${cls} ≥ numClasses ${numClasses}`);
              oneHot[dst * numClasses + cls] = 1;
            }
          } else if (withLabels) {
            oneHot[dst * numClasses] = 1;
          }
        }
      }
    }
  }
  // Entries without weights that share a batch with weighted ones keep weight 1 (the array starts filled with 1).
  return { image, oneHot, cases: picked, ...(weight ? { weight } : {}) };
}


/**
 * The next training batch: from the request's patch source (already cropped and augmented: taken in order,
 * no further flips) or sampled from in-memory cases.
 */
export async function nextBatch(
  source: PatchSource | undefined,
  cases: readonly VolumeCase[],
  batchSize: number,
  patch: readonly [number, number, number],
  numClasses: number,
  rng: Rng,
  opts: { withLabels?: boolean; channels?: number } = {},
): Promise<Batch> {
  if (!source) return sampleBatch(cases, batchSize, patch, numClasses, rng, opts);
  const patches = await source.sample(batchSize, rng);
  if (patches.length !== batchSize) throw new Error(`patch source returned ${patches.length} patches for a batch of ${batchSize}`);
  return sampleBatch(patches, batchSize, patch, numClasses, rng, { ...opts, inOrder: true, flip: false });
}

/** The checks every trainer makes on a request's numbers, with the value that was wrong. */
export function checkTrainRequest(req: Pick<TrainRequest, 'steps' | 'batchSize' | 'learningRate'>): void {
  if (!Number.isInteger(req.steps) || req.steps < 1) throw new Error(`train: steps must be a positive integer, got ${req.steps}`);
  if (!Number.isInteger(req.batchSize) || req.batchSize < 1) throw new Error(`train: batchSize must be a positive integer, got ${req.batchSize}`);
  if (!(req.learningRate > 0)) throw new Error(`train: learningRate must be > 0, got ${req.learningRate}`);
}

/** A run's reported loss: the mean of its last quarter of steps (one step's loss is too noisy), and its first. */
export function lossSummary(losses: readonly number[]): { loss: number; firstLoss: number } {
  const quarter = Math.max(1, Math.floor(losses.length / 4));
  const tail = losses.slice(-quarter);
  return { loss: tail.reduce((a, v) => a + v, 0) / tail.length, firstLoss: losses[0] };
}
