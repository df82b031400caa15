/**
 * A minimal reverse-mode tape over Float32Arrays: each op records a closure that, run in reverse order,
 * turns its output's gradient into its inputs' and parameters' gradients. Activations are plain
 * GC-managed arrays, so nothing needs disposing and nothing can leak past the step that made it.
 */

export interface Act {
  readonly data: Float32Array;
  /** NDHWC for volumes, [N, C] for vectors. */
  readonly shape: readonly number[];
  /** False for data (the input image): no gradient is computed for it or accumulated into it. */
  readonly needsGrad: boolean;
  /** Accumulated gradient, set during backward. */
  grad?: Float32Array;
}

export function act(data: Float32Array, shape: readonly number[], needsGrad: boolean): Act {
  const size = shape.reduce((a, b) => a * b, 1);
  if (size !== data.length) throw new Error(`activation of shape [${shape.join(',')}] needs ${size} values, got ${data.length}`);
  return { data, shape, needsGrad };
}

/**
 * Adds `g` into a.grad. With `owned` the array is taken over when a.grad is empty (no copy); otherwise
 * it is copied, because the caller hands the same array to another input too.
 */
export function accumulate(a: Act, g: Float32Array, owned: boolean): void {
  if (!a.needsGrad) return;
  if (!a.grad) {
    a.grad = owned ? g : g.slice();
    return;
  }
  const d = a.grad;
  for (let i = 0; i < d.length; i++) d[i] += g[i];
}

export function addInto(dst: Float32Array, src: Float32Array): void {
  for (let i = 0; i < dst.length; i++) dst[i] += src[i];
}

export class Tape {
  private steps: (() => void)[] = [];

  record(backward: () => void): void {
    this.steps.push(backward);
  }

  get length(): number {
    return this.steps.length;
  }

  /** Seeds `out` with `grad` and runs every recorded step in reverse; the tape is empty afterwards. */
  backward(out: Act, grad: Float32Array): void {
    if (grad.length !== out.data.length) throw new Error(`backward: gradient has ${grad.length} values for an output of ${out.data.length}`);
    out.grad = grad;
    const steps = this.steps;
    this.steps = [];
    for (let i = steps.length - 1; i >= 0; i--) steps[i]();
  }

  clear(): void {
    this.steps = [];
  }
}
