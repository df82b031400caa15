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
 */
import { makeBundle, type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';

export type ServerOptimizerType = 'none' | 'fedavgm' | 'fedadam' | 'fedyogi' | 'fedadagrad';

export interface ServerOptimizerConfig {
  readonly type: ServerOptimizerType;
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly tau: number;
}

export class ServerOptimizer {
  private m: Float32Array | undefined;
  private v: Float32Array | undefined;
  step = 0;

  constructor(readonly cfg: ServerOptimizerConfig) {}

  /** In place: y holds base + Δ on entry and the optimiser's new weights on return. */
  apply(base: Float32Array, y: Float32Array): void {
    const { type, lr, beta1, beta2, tau } = this.cfg;
    if (type === 'none') return;
    const n = y.length;
    if (!this.m || this.m.length !== n) {
      this.m = new Float32Array(n);
      // FedAvgM keeps no second moment: one model less in memory and on disk.
      this.v = type === 'fedavgm' ? undefined : new Float32Array(n).fill(tau * tau);
    }
    const m = this.m;
    const b1 = 1 - beta1;
    const b2 = 1 - beta2;
    // One loop per optimiser: no branch on the type per element.
    if (type === 'fedavgm') {
      for (let i = 0; i < n; i++) {
        const mi = beta1 * m[i] + (y[i] - base[i]);
        m[i] = mi;
        y[i] = base[i] + lr * mi;
      }
    } else if (type === 'fedadagrad') {
      const v = this.v!;
      for (let i = 0; i < n; i++) {
        const d = y[i] - base[i];
        const mi = beta1 * m[i] + b1 * d;
        const vi = v[i] + d * d;
        m[i] = mi;
        v[i] = vi;
        y[i] = base[i] + (lr * mi) / (Math.sqrt(vi) + tau);
      }
    } else if (type === 'fedadam') {
      const v = this.v!;
      for (let i = 0; i < n; i++) {
        const d = y[i] - base[i];
        const mi = beta1 * m[i] + b1 * d;
        const vi = beta2 * v[i] + b2 * d * d;
        m[i] = mi;
        v[i] = vi;
        y[i] = base[i] + (lr * mi) / (Math.sqrt(vi) + tau);
      }
    } else {
      const v = this.v!;
      for (let i = 0; i < n; i++) {
        const d = y[i] - base[i];
        const mi = beta1 * m[i] + b1 * d;
        const d2 = d * d;
        const vo = v[i];
        const vi = vo > d2 ? vo - b2 * d2 : vo < d2 ? vo + b2 * d2 : vo; // v − (1−β₂)Δ²·sign(v − Δ²)
        m[i] = mi;
        v[i] = vi;
        y[i] = base[i] + (lr * mi) / (Math.sqrt(vi) + tau);
      }
    }
    this.step++;
  }

  /** m and v as tensors named `m/<name>`, `v/<name>` (views, no copy; m only for FedAvgM), or undefined before the first step. */
  exportTensors(specs: readonly TensorSpec[], offsets: ReadonlyMap<string, { off: number; n: number }>): TensorBundle | undefined {
    if (!this.m) return undefined;
    const out: NamedTensor[] = [];
    for (const s of specs) {
      const { off, n } = offsets.get(s.name)!;
      out.push({ name: `m/${s.name}`, dtype: 'F32', shape: [...s.shape], data: this.m.subarray(off, off + n) });
      if (this.v) out.push({ name: `v/${s.name}`, dtype: 'F32', shape: [...s.shape], data: this.v.subarray(off, off + n) });
    }
    return makeBundle(out);
  }

  restoreTensors(t: TensorBundle, specs: readonly TensorSpec[], offsets: ReadonlyMap<string, { off: number; n: number }>, total: number): void {
    const withV = this.cfg.type !== 'fedavgm';
    const m = new Float32Array(total);
    const v = withV ? new Float32Array(total) : undefined;
    for (const s of specs) {
      const { off, n } = offsets.get(s.name)!;
      const mt = t.get(`m/${s.name}`);
      const vt = t.get(`v/${s.name}`);
      if (!mt || mt.data.length !== n || (v && (!vt || vt.data.length !== n))) {
        throw new Error(`stored server-optimiser state lacks m/v for tensor ${s.name} or has the wrong size: the plan's shared tensors changed since it was written; start a new federation directory`);
      }
      m.set(mt.data, off);
      if (v && vt) v.set(vt.data, off);
    }
    this.m = m;
    this.v = v;
  }
}
