/**
 * A training step's activation and gradient buffers, kept from one step to the next. Every step of a training
 * run asks for the same sizes in the same order, so after the first step every request is served from memory
 * that is already mapped and warm in the caches: a freshly allocated 16 MiB array costs ~4,000 page faults (the
 * kernel zeroes each page) before a kernel can write it, which at ¼ width cost as much as the convolutions, and
 * the garbage collector no longer sees hundreds of megabytes of short-lived external memory per step.
 *
 * Ownership is per step: every buffer handed out since the last recycle() belongs to the current step, and
 * recycle() makes all of them free again at once. The owner (the trainer) calls it only when nothing from the
 * previous step is read any more (between steps); arrays that escape a step must be copied.
 *
 * Inference uses one too (a forward pass per window batch or volume instead of a step), with `maxBytes`: the
 * pool then holds at most that much, and past it hands out ordinary arrays that it does not keep, so a pass
 * over an unexpectedly large volume needs no more memory than it would without a pool.
 */
import { uninitF32 } from '../../engine/elementwise-kernels.ts';

export interface BufferPoolOptions {
  /** Most bytes the pool allocates and keeps; requests past it get unpooled arrays. Default: no bound. */
  readonly maxBytes?: number;
}

export class BufferPool {
  private readonly free = new Map<number, Float32Array[]>();
  private inUse: Float32Array[] = [];
  private allocatedBytes = 0;
  private readonly maxBytes: number;
  private readonly unpooled = new WeakSet<Float32Array>();

  constructor(options: BufferPoolOptions = {}) {
    this.maxBytes = options.maxBytes ?? Number.POSITIVE_INFINITY;
    if (!(this.maxBytes >= 0)) throw new Error(`BufferPool: maxBytes must be ≥ 0, got ${options.maxBytes}`);
  }

  /** A Float32Array of n values with unspecified contents (stale values of an earlier step). */
  take(n: number): Float32Array {
    const b = this.free.get(n)?.pop() ?? (this.allocatedBytes + 4 * n <= this.maxBytes ? this.fresh(n) : undefined);
    // Past the bound: an array the pool does not track, which the garbage collector frees like any other.
    if (!b) {
      const loose = uninitF32(n);
      this.unpooled.add(loose);
      return loose;
    }
    this.inUse.push(b);
    return b;
  }

  /** Returns a buffer taken in this step that its taker ended up not using (e.g. a kernel that ignores `out`). */
  untake(b: Float32Array): void {
    const i = this.inUse.lastIndexOf(b);
    if (i < 0) {
      if (this.unpooled.has(b)) return;
      throw new Error('BufferPool.untake: that buffer is not in use');
    }
    this.inUse.splice(i, 1);
    this.release(b);
  }

  /** Every buffer handed out since the last call is free again. */
  recycle(): void {
    for (const b of this.inUse) this.release(b);
    this.inUse = [];
  }

  /** Bytes of all buffers this pool has allocated (in use and free). */
  get bytes(): number {
    return this.allocatedBytes;
  }

  private fresh(n: number): Float32Array {
    this.allocatedBytes += 4 * n;
    return uninitF32(n);
  }

  private release(b: Float32Array): void {
    const list = this.free.get(b.length);
    if (list) list.push(b);
    else this.free.set(b.length, [b]);
  }
}
