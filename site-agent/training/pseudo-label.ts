/**
 * Noisy student at a site: the un-noised teacher labels the unlabelled pool, and the student draws
 * pseudo-labelled patches next to its labelled ones.
 *
 * Bounded memory: cases are labelled one at a time (image read through the site's byte-bounded cache,
 * probabilities computed, written to the site's own directory, dropped); training later reads the pseudo-labels
 * back through a small LRU of a few cases. Pseudo-labels never leave the site: they live in
 * `<site dir>/local/pseudo/`, are never logged per case and never put in an update or a metric.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Trainer, VolumeCase } from '../../shared/model/types.ts';
import type { TeacherStudentSettings } from '../../shared/plan/schema.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import { randomInt, type Rng } from '../../shared/util/random.ts';
import type { Logger } from '../../shared/util/log.ts';
import { augmentPatch, type AugmentOptions } from '../data/augment.ts';
import { preparedToVolumeCase, type CaseRef, type SiteData } from '../data/site-data.ts';
import { flipVolume, type InferenceSettings } from '../../shared/model/sliding-window.ts';

export { flipVolume };

/** What labelling the pool produced (kept as meta.json next to the per-case files). */
export interface PseudoPool {
  readonly generation: number;
  /** The teacher model version that made these labels. */
  readonly teacherHash: string;
  readonly numClasses: number;
  readonly cases: readonly { readonly id: string; readonly shape: readonly [number, number, number] }[];
  /** Share of each class (teacher argmax) among the pool's confident voxels. */
  readonly classFrequencies: readonly number[];
  /** Class-balanced sampling: pseudo-labelled patches are centred on a class drawn uniformly (not by frequency). */
  readonly classBalance: boolean;
  /** The confidence threshold these labels were masked with (fixed, or calibrated on validation); absent in older pools. */
  readonly confidence?: number;
  /** Aggregate numbers only (they may become metrics). */
  readonly stats: { readonly cases: number; readonly voxels: number; readonly confidentFraction: number; readonly foregroundFraction: number; readonly skippedByPrior?: number };
}

/** The site's labelled prior: the share of foreground voxels over its labelled training cases. */
export interface ForegroundPrior {
  readonly foregroundFraction: number;
  /** A pseudo-labelled case whose predicted foreground share is off from the prior by more than this factor is skipped; 0 = no check. */
  readonly maxFactor: number;
}

/**
 * Whether a pseudo-label's foreground share is plausible against the labelled prior: a teacher that paints 3–13 %
 * of a volume as lesion where the labelled cases hold ~0.5 % teaches the student to over-segment.
 */
export function plausibleForeground(fraction: number, prior: ForegroundPrior | undefined): boolean {
  if (!prior || prior.maxFactor <= 0 || !(prior.foregroundFraction > 0)) return true;
  return fraction <= prior.foregroundFraction * prior.maxFactor && fraction >= prior.foregroundFraction / prior.maxFactor;
}

/** Probabilities [D·H·W, C] from the teacher, optionally averaged over the 8 axis flips (test-time augmentation). */
export async function teacherProbs(trainer: Trainer, weights: TensorBundle, vc: VolumeCase, flipTTA: boolean): Promise<Float32Array> {
  // A model whose plan already flips (model.inference.flipTTA) gives the flip mean itself: averaging it again changes nothing, at 8× the cost.
  const flipsItself = (trainer.architecture as { inference?: InferenceSettings }).inference?.flipTTA === true;
  if (!flipTTA || flipsItself) return trainer.predictProbs(weights, vc);
  const C = trainer.architecture.numClasses;
  const [D, H, W] = vc.shape;
  const sum = new Float32Array(D * H * W * C);
  for (let f = 0; f < 8; f++) {
    const flip: [boolean, boolean, boolean] = [(f & 4) !== 0, (f & 2) !== 0, (f & 1) !== 0];
    const image = flipVolume(vc.image, vc.shape, flip, vc.channels ?? 1);
    const p = await trainer.predictProbs(weights, { ...vc, image });
    const back = flipVolume(p, vc.shape, flip, C);
    for (let i = 0; i < sum.length; i++) sum[i] += back[i] / 8;
  }
  return sum;
}

/**
 * Turns teacher probabilities into a training target and a per-voxel weight: soft (the probabilities) or hard
 * (one-hot argmax) targets; weight 0 where the teacher's max probability is below `confidence`, else 1
 * (class balancing multiplies in later, once the whole pool's frequencies are known).
 */
export function pseudoTarget(probs: Float32Array, C: number, ts: Pick<TeacherStudentSettings, 'labels' | 'confidence'>): { target: Float32Array; mask: Float32Array; argmax: Uint8Array } {
  const nv = probs.length / C;
  const target = ts.labels === 'soft' ? probs : new Float32Array(probs.length);
  const mask = new Float32Array(nv);
  const argmax = new Uint8Array(nv);
  for (let v = 0; v < nv; v++) {
    const o = v * C;
    let best = 0;
    for (let c = 1; c < C; c++) if (probs[o + c] > probs[o + best]) best = c;
    argmax[v] = best;
    mask[v] = probs[o + best] >= ts.confidence ? 1 : 0;
    if (ts.labels === 'hard') target[o + best] = 1;
  }
  return { target, mask, argmax };
}

/**
 * Class balancing is done by sampling, not by loss weights: with it, each pseudo-labelled patch is centred on a
 * confident voxel of a class drawn uniformly from the classes the case has, so rare classes are seen as often as
 * frequent ones. (Inverse-frequency loss weights were tried first: inside the soft Dice they make a false negative
 * cost ~10× a false positive and pushed students to over-segment — test Dice 0.56 against 0.75 unweighted on the
 * phantom federation.)
 */
export function pickBalancedClass(perClass: readonly Uint32Array[], rng: Rng): number | undefined {
  const present = perClass.map((v, c) => (v.length > 0 ? c : -1)).filter((c) => c >= 0);
  return present.length ? present[randomInt(rng, present.length)] : undefined;
}

const META = 'meta.json';

/** A complete labelling of `teacherId` already in `dir` (meta.json is written last), or undefined. */
export function existingPool(dir: string, teacherId: { generation: number; teacherHash: string }): PseudoPool | undefined {
  const metaPath = join(dir, META);
  if (!existsSync(metaPath)) return undefined;
  try {
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as PseudoPool;
    return meta.generation === teacherId.generation && meta.teacherHash === teacherId.teacherHash ? meta : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Labels every usable case of `pool` with the teacher, one case at a time, into `dir` (made afresh unless a
 * complete labelling of the same generation is there already). Returns the pool description.
 */
export async function labelPool(
  trainer: Trainer,
  teacher: TensorBundle,
  data: SiteData,
  pool: readonly CaseRef[],
  dir: string,
  teacherId: { generation: number; teacherHash: string },
  ts: TeacherStudentSettings,
  log: Logger,
  prior?: ForegroundPrior,
): Promise<PseudoPool> {
  const done = existingPool(dir, teacherId);
  if (done) return done;
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const C = trainer.architecture.numClasses;
  const counts = new Array<number>(C).fill(0);
  let voxels = 0;
  let confident = 0;
  const cases: { id: string; shape: [number, number, number] }[] = [];
  let skippedByPrior = 0;
  for (const ref of pool) {
    const c = await data.load(ref);
    if (!c) continue;
    const shape: [number, number, number] = [c.shape[0], c.shape[1], c.shape[2]];
    // Every input channel, interleaved as the encoder reads them (a one-channel case is passed without a copy).
    const probs = await teacherProbs(trainer, teacher, preparedToVolumeCase(c, ref.id), ts.flipTTA);
    const { target, mask, argmax } = pseudoTarget(probs, C, ts);
    let predictedForeground = 0;
    for (let v = 0; v < argmax.length; v++) if (argmax[v] > 0) predictedForeground++;
    if (!plausibleForeground(predictedForeground / argmax.length, prior)) {
      skippedByPrior++;
      continue;
    }
    for (let v = 0; v < mask.length; v++) if (mask[v] > 0) { counts[argmax[v]]++; confident++; }
    voxels += mask.length;
    const nv = mask.length;
    writeFileAtomic(
      join(dir, `${ref.id}.safetensors`),
      encodeSafetensors(makeBundle([
        { name: 'target', dtype: 'F32', shape: [nv, C], data: target },
        { name: 'mask', dtype: 'F32', shape: [nv], data: mask },
      ])),
      0o600,
    );
    cases.push({ id: ref.id, shape });
  }
  const fg = counts.slice(1).reduce((a, b) => a + b, 0);
  const { generation } = teacherId;
  const meta: PseudoPool = {
    generation,
    teacherHash: teacherId.teacherHash,
    numClasses: C,
    cases,
    classFrequencies: counts.map((n) => (confident ? n / confident : 0)),
    classBalance: ts.classBalance,
    confidence: ts.confidence,
    stats: { cases: cases.length, voxels, confidentFraction: voxels ? confident / voxels : 0, foregroundFraction: confident ? fg / confident : 0, skippedByPrior },
  };
  // Written last: a site stopped half-way labels the pool again next time.
  writeFileAtomic(join(dir, META), JSON.stringify(meta), 0o600);
  if (skippedByPrior > 0) log.info({ generation, skippedByPrior, priorForegroundFraction: prior ? round3(prior.foregroundFraction) : null, maxFactor: prior?.maxFactor }, 'pseudo-labels whose foreground share is implausible against the labelled cases were skipped');
  log.info({ generation, cases: cases.length, confidentFraction: round3(meta.stats.confidentFraction), foregroundFraction: round3(meta.stats.foregroundFraction) }, 'teacher labelled the unlabelled pool');
  return meta;
}

/** Removes pseudo-label folders of other generations under `parent` except `keep`. */
export function prunePseudoDirs(parent: string, keep: string): void {
  if (!existsSync(parent)) return;
  for (const d of readdirSync(parent)) if (join(parent, d) !== keep) rmSync(join(parent, d), { recursive: true, force: true });
}

interface LoadedPseudo {
  readonly target: Float32Array;
  /** The confidence mask: 1 where the teacher was sure enough, else 0. */
  readonly weight: Float32Array;
  /** Confident voxels of each class (teacher argmax), for crop centres. */
  readonly perClass: readonly Uint32Array[];
}

/**
 * Pseudo-labelled training patches: random crops (foreground-oversampled on the teacher's confident
 * foreground), mirrored on every axis together with target and weight, intensity-augmented.
 */
export class PseudoPatches {
  private readonly lru = new Map<string, LoadedPseudo>();

  constructor(
    private readonly pool: PseudoPool,
    private readonly dir: string,
    private readonly data: SiteData,
    private readonly refs: ReadonlyMap<string, CaseRef>,
    private readonly patch: readonly [number, number, number],
    private readonly o: { foregroundFraction: number; augment: AugmentOptions | false; maxCached?: number },
  ) {}

  get size(): number {
    return this.pool.cases.length;
  }

  async sample(count: number, rng: Rng): Promise<VolumeCase[]> {
    const out: VolumeCase[] = [];
    const C = this.pool.numClasses;
    const [pd, ph, pw] = this.patch;
    while (out.length < count) {
      const entry = this.pool.cases[randomInt(rng, this.pool.cases.length)];
      const ref = this.refs.get(entry.id);
      const c = ref ? await this.data.load(ref) : undefined;
      if (!c) {
        if (this.pool.cases.every((e) => { const r = this.refs.get(e.id); return !r || this.data.isBad(r); })) throw new Error('no usable pseudo-labelled case');
        continue;
      }
      const p = this.load(entry.id);
      const [D, H, W] = entry.shape;
      // Crop centre: a confident voxel of a uniformly drawn class (class balance), else — like the labelled
      // sampler — a confident foreground voxel with probability foregroundFraction or a uniform origin.
      let oz: number, oy: number, ox: number;
      const fg = p.perClass.slice(1).filter((v) => v.length > 0);
      const centreClass = this.pool.classBalance ? pickBalancedClass(p.perClass, rng) : fg.length > 0 && rng() < this.o.foregroundFraction ? -1 : undefined;
      const from = centreClass === undefined ? undefined : centreClass >= 0 ? p.perClass[centreClass] : fg[randomInt(rng, fg.length)];
      if (from && from.length > 0) {
        const v = from[randomInt(rng, from.length)];
        const z = Math.floor(v / (H * W)), y = Math.floor(v / W) % H, x = v % W;
        oz = clampOrigin(z - randomInt(rng, pd), D, pd);
        oy = clampOrigin(y - randomInt(rng, ph), H, ph);
        ox = clampOrigin(x - randomInt(rng, pw), W, pw);
      } else {
        oz = D > pd ? randomInt(rng, D - pd + 1) : 0;
        oy = H > ph ? randomInt(rng, H - ph + 1) : 0;
        ox = W > pw ? randomInt(rng, W - pw + 1) : 0;
      }
      const fp = this.o.augment === false ? 0 : typeof this.o.augment.flipProbability === 'number' ? this.o.augment.flipProbability : 0.5;
      const flip = [0, 1, 2].map(() => fp > 0 && rng() < fp);
      const pv = pd * ph * pw;
      const Cin = c.channels.length;
      const image = new Float32Array(pv * Cin);
      const target = new Float32Array(pv * C);
      const weight = new Float32Array(pv);
      for (let z = 0; z < pd; z++) {
        const sz = oz + (flip[0] ? pd - 1 - z : z);
        for (let y = 0; y < ph; y++) {
          const sy = oy + (flip[1] ? ph - 1 - y : y);
          for (let x = 0; x < pw; x++) {
            const sx = ox + (flip[2] ? pw - 1 - x : x);
            const d = (z * ph + y) * pw + x;
            if (sz < D && sy < H && sx < W) {
              const s = (sz * H + sy) * W + sx;
              for (let ch = 0; ch < Cin; ch++) image[d * Cin + ch] = c.channels[ch][s];
              for (let k = 0; k < C; k++) target[d * C + k] = p.target[s * C + k];
              weight[d] = p.weight[s];
            } else {
              target[d * C] = 1; // padding: background, and weight 0 (nothing to learn there)
            }
          }
        }
      }
      // Intensity noise only (mirroring was done above, on target and weight too).
      const aug = this.o.augment === false ? image : augmentPatch({ shape: [pd, ph, pw], channels: Cin, image }, rng, { ...this.o.augment, flipProbability: 0 }).image;
      out.push({ id: `pseudo-${out.length}`, shape: [pd, ph, pw], image: aug, ...(Cin !== 1 ? { channels: Cin } : {}), target, weight });
    }
    return out;
  }

  private load(id: string): LoadedPseudo {
    const hit = this.lru.get(id);
    if (hit) {
      this.lru.delete(id);
      this.lru.set(id, hit);
      return hit;
    }
    const b = decodeSafetensors(readFileSync(join(this.dir, `${id}.safetensors`))).bundle;
    const target = b.get('target')!.data as Float32Array;
    const mask = b.get('mask')!.data as Float32Array;
    const C = this.pool.numClasses;
    const lists: number[][] = Array.from({ length: C }, () => []);
    for (let v = 0; v < mask.length; v++) {
      if (mask[v] === 0) continue;
      let best = 0;
      for (let k = 1; k < C; k++) if (target[v * C + k] > target[v * C + best]) best = k;
      lists[best].push(v);
    }
    const loaded = { target, weight: mask, perClass: lists.map((l) => Uint32Array.from(l)) };
    this.lru.set(id, loaded);
    while (this.lru.size > (this.o.maxCached ?? 4)) this.lru.delete(this.lru.keys().next().value!);
    return loaded;
  }
}

function clampOrigin(o: number, n: number, p: number): number {
  return n > p ? Math.max(0, Math.min(n - p, o)) : 0;
}

const round3 = (x: number) => Math.round(x * 1e3) / 1e3;
