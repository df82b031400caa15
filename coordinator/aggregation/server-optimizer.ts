/**
 * Server optimisers (Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295). The combined
 * delta Δ (the combine rule's output minus the base) is treated as a pseudo-gradient:
 *   m = β₁m + (1−β₁)Δ
 *   FedAdagrad v = v + Δ²;  FedAdam v = β₂v + (1−β₂)Δ²;  FedYogi v = v − (1−β₂)Δ²·sign(v − Δ²)
 *   x = x_base + η·m / (√v + τ)
 * m starts at 0 and v at τ² (the paper's v₋₁ ≥ τ²); no bias correction, as in the paper.
 * FedAvgM (Hsu et al. 2019, server momentum): m = β₁m + Δ; x = x_base + η·m (v unused) — it carries the
 * direction of earlier rounds on, which helps when each round's mean delta is small or sites pull apart.
 * The state (m, v: two models, kept across rounds) is exported after each round and stored with the round's model.
 * Between rounds they live where the injected Moments put them (moments.ts: in memory, or a file updated block by
 * block so that they cost no RSS).
 */
import { type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { asBaseBlocks, BASE_BLOCK_FLOATS, type BaseLike } from './base-blocks.ts';
import { memoryMoments, type Moments, type MomentsFactory } from './moments.ts';

export type ServerOptimizerType = 'none' | 'fedavgm' | 'fedadam' | 'fedyogi' | 'fedadagrad';

export interface ServerOptimizerConfig {
  readonly type: ServerOptimizerType;
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly tau: number;
}

export class ServerOptimizer {
  private moments: Moments | undefined;
  step = 0;

  /** `moments`: where m and v live between rounds (moments.ts); the default keeps them in memory. */
  constructor(readonly cfg: ServerOptimizerConfig, private readonly makeMoments: MomentsFactory = memoryMoments) {}

  /**
   * In place: y holds base + Δ on entry and the optimiser's new weights on return. Block by block over the moments,
   * and within those over the base (`base` flat in spec order, or read in blocks).
   */
  apply(baseLike: BaseLike, y: Float32Array): void {
    const { type, lr, beta1, beta2, tau } = this.cfg;
    if (type === 'none') return;
    const base = asBaseBlocks(baseLike)!;
    const n = y.length;
    if (!this.moments || this.moments.total !== n) {
      this.moments?.dispose();
      // FedAvgM keeps no second moment: one model less in memory and on disk.
      this.moments = this.makeMoments(n, type !== 'fedavgm', tau * tau);
    }
    const b1 = 1 - beta1;
    const b2 = 1 - beta2;
    this.moments.forEachBlock((off, mAll, vAll) => {
      for (let at = 0; at < mAll.length; at += BASE_BLOCK_FLOATS) {
        const len = Math.min(BASE_BLOCK_FLOATS, mAll.length - at);
        const m = mAll.subarray(at, at + len);
        const v = vAll?.subarray(at, at + len);
        const bb = base.block(off + at, len);
        const yy = y.subarray(off + at, off + at + len);
        // One loop per optimiser: no branch on the type per element. i indexes the block (m, v, bb and yy alike).
        if (type === 'fedavgm') {
          for (let i = 0; i < len; i++) {
            const mi = beta1 * m[i] + (yy[i] - bb[i]);
            m[i] = mi;
            yy[i] = bb[i] + lr * mi;
          }
        } else if (type === 'fedadagrad') {
          for (let i = 0; i < len; i++) {
            const d = yy[i] - bb[i];
            const mi = beta1 * m[i] + b1 * d;
            const vi = v![i] + d * d;
            m[i] = mi;
            v![i] = vi;
            yy[i] = bb[i] + (lr * mi) / (Math.sqrt(vi) + tau);
          }
        } else if (type === 'fedadam') {
          for (let i = 0; i < len; i++) {
            const d = yy[i] - bb[i];
            const mi = beta1 * m[i] + b1 * d;
            const vi = beta2 * v![i] + b2 * d * d;
            m[i] = mi;
            v![i] = vi;
            yy[i] = bb[i] + (lr * mi) / (Math.sqrt(vi) + tau);
          }
        } else {
          for (let i = 0; i < len; i++) {
            const d = yy[i] - bb[i];
            const mi = beta1 * m[i] + b1 * d;
            const d2 = d * d;
            const vo = v![i];
            const vi = vo > d2 ? vo - b2 * d2 : vo < d2 ? vo + b2 * d2 : vo; // v − (1−β₂)Δ²·sign(v − Δ²)
            m[i] = mi;
            v![i] = vi;
            yy[i] = bb[i] + (lr * mi) / (Math.sqrt(vi) + tau);
          }
        }
      }
    });
    this.step++;
  }

  /**
   * m and v as tensors named `m/<name>`, `v/<name>` (m only for FedAvgM), or undefined before the first step. Each
   * tensor's data is read when asked for and only the last one is held (file-backed moments: one tensor at a time,
   * as the model store writes them), so exporting costs no model-sized copy.
   */
  exportTensors(specs: readonly TensorSpec[], offsets: ReadonlyMap<string, { off: number; n: number }>): TensorBundle | undefined {
    const moments = this.moments;
    if (!moments) return undefined;
    let held: { key: string; data: Float32Array } | undefined;
    const load = (which: 'm' | 'v', off: number, n: number, key: string): Float32Array => {
      if (held?.key !== key) held = { key, data: moments.read(which, off, n) };
      return held.data;
    };
    const out: NamedTensor[] = [];
    for (const s of specs) {
      const { off, n } = offsets.get(s.name)!;
      for (const which of moments.withV ? (['m', 'v'] as const) : (['m'] as const)) {
        const name = `${which}/${s.name}`;
        out.push({
          name,
          dtype: 'F32',
          shape: [...s.shape],
          get data() {
            return load(which, off, n, name);
          },
        });
      }
    }
    // Not makeBundle: it would read every tensor to check its length. Sorted by name, as makeBundle sorts.
    return new Map(out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)).map((t) => [t.name, t]));
  }

  restoreTensors(t: TensorBundle, specs: readonly TensorSpec[], offsets: ReadonlyMap<string, { off: number; n: number }>, total: number): void {
    const withV = this.cfg.type !== 'fedavgm';
    for (const s of specs) {
      const { n } = offsets.get(s.name)!;
      const mt = t.get(`m/${s.name}`);
      const vt = t.get(`v/${s.name}`);
      if (!mt || mt.data.length !== n || (withV && (!vt || vt.data.length !== n))) {
        throw new Error(`stored server-optimiser state lacks m/v for tensor ${s.name} or has the wrong size: the plan's shared tensors changed since it was written; start a new federation directory`);
      }
    }
    this.moments?.dispose();
    const moments = this.makeMoments(total, withV, 0);
    for (const s of specs) {
      const { off } = offsets.get(s.name)!;
      moments.write('m', off, t.get(`m/${s.name}`)!.data);
      if (withV) moments.write('v', off, t.get(`v/${s.name}`)!.data);
    }
    this.moments = moments;
  }

  /** Frees the moments (memory or file); the optimiser starts from zero moments if applied again. */
  dispose(): void {
    this.moments?.dispose();
    this.moments = undefined;
  }
}
