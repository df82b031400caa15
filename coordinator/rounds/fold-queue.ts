/**
 * The engine's fold queue: the heavy part of taking input (decoding and folding a model-sized update, or a feature's
 * sum) runs one job at a time, so memory stays at about one model whatever the number of sites uploading at once.
 */
export class FoldQueue {
  private chain: Promise<unknown> = Promise.resolve();

  /** Runs `fn` after every earlier job (whether that one failed or not); resolves or rejects with `fn`'s result. */
  run<T>(fn: () => T | Promise<T>): Promise<T> {
    const next = this.chain.then(fn, fn);
    this.chain = next.catch(() => undefined);
    return next;
  }

  /** Resolves once every job queued so far has ended (never rejects). */
  drained(): Promise<unknown> {
    return this.chain;
  }
}
