/**
 * FedAvg (McMahan et al.): the new shared weights are the sample-weighted mean of the sites' weights.
 * One float32 accumulator per tensor, reused across the round: memory is one model, whatever the site count.
 */
import { makeBundle, type NamedTensor, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import type { AggregationStrategy, RoundAggregator, UpdateInfo } from './strategy.ts';

export class FedAvg implements AggregationStrategy {
  readonly name = 'fedavg';

  begin(_current: TensorBundle, specs: readonly TensorSpec[]): RoundAggregator {
    return new WeightedMeanAggregator(specs);
  }
}

export class WeightedMeanAggregator implements RoundAggregator {
  private readonly sums = new Map<string, Float32Array>();
  private totalWeight = 0;
  count = 0;

  constructor(private readonly specs: readonly TensorSpec[]) {
    for (const s of specs) {
      let n = 1;
      for (const d of s.shape) n *= d;
      this.sums.set(s.name, new Float32Array(n));
    }
  }

  add(update: TensorBundle, info: UpdateInfo): void {
    if (!(info.numSamples > 0)) throw new Error(`update from ${info.site} has no samples; it cannot carry FedAvg weight`);
    const w = info.numSamples;
    for (const [name, acc] of this.sums) {
      const t = update.get(name);
      if (!t || t.data.length !== acc.length) throw new Error(`update from ${info.site} lacks tensor ${name} or has the wrong size`);
      axpy(acc, t.data, w);
    }
    this.totalWeight += w;
    this.count++;
  }

  finish(): TensorBundle {
    if (this.count === 0) throw new Error('no updates to aggregate');
    const inv = 1 / this.totalWeight;
    const out: NamedTensor[] = [];
    for (const s of this.specs) {
      const acc = this.sums.get(s.name)!;
      for (let i = 0; i < acc.length; i++) acc[i] *= inv;
      out.push({ name: s.name, dtype: 'F32', shape: [...s.shape], data: acc });
    }
    return makeBundle(out);
  }
}

/** acc += w·x, unrolled by 4: the simple loop shape V8 compiles best (see baselines.md, 1–12 GB/s by loop shape). */
export function axpy(acc: Float32Array, x: Float32Array, w: number): void {
  const n = x.length;
  const n4 = n - (n % 4);
  let i = 0;
  for (; i < n4; i += 4) {
    acc[i] += w * x[i];
    acc[i + 1] += w * x[i + 1];
    acc[i + 2] += w * x[i + 2];
    acc[i + 3] += w * x[i + 3];
  }
  for (; i < n; i++) acc[i] += w * x[i];
}
