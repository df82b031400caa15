/**
 * Warn lines for refused uploads, collapsed per (site, reason category). A hostile or broken site that sends the
 * same refused upload over and over would otherwise write one warn line per call and bury everything else in the
 * log. The first refusal of a (site, reason) in a window is logged in full; the rest of that window is counted and
 * comes out as one summary line when the window ends (or when the coordinator stops). Counting for metrics is not
 * done here: every refusal still publishes its event, and the Prometheus counter follows the events.
 */
import type { Logger } from '../../shared/util/log.ts';

export interface RefusalWarningOptions {
  /** Length of a window in which repeated refusals of one (site, reason) are collapsed (default 60 s). */
  windowMs: number;
  /** The clock (injected so tests can move it). */
  now: () => number;
}

export const DEFAULT_REFUSAL_WINDOW_MS = 60_000;

interface Window {
  site: string;
  reason: string;
  startedAt: number;
  /** Refusals in this window after the one logged in full. */
  more: number;
  /** The full text of the latest collapsed refusal (one example for the summary). */
  lastDetail: string | undefined;
}

export class RefusalWarnings {
  private readonly windows = new Map<string, Window>();
  private timer: NodeJS.Timeout | undefined;
  private readonly o: RefusalWarningOptions;

  constructor(
    private readonly log: Logger,
    options: Partial<RefusalWarningOptions> = {},
  ) {
    this.o = { windowMs: options.windowMs ?? DEFAULT_REFUSAL_WINDOW_MS, now: options.now ?? Date.now };
  }

  /**
   * One refused upload of `site`, in reason category `reason` (a small fixed set: it keys the collapsing), with
   * its full text `detail` and the fields and message of its warn line.
   */
  refused(site: string, reason: string, detail: string, fields: Record<string, unknown>, message: string): void {
    const key = `${site}\u0000${reason}`;
    const t = this.o.now();
    const w = this.windows.get(key);
    if (w && t - w.startedAt < this.o.windowMs) {
      w.more++;
      w.lastDetail = detail;
      return;
    }
    if (w) this.summarise(w);
    this.windows.set(key, { site, reason, startedAt: t, more: 0, lastDetail: undefined });
    this.log.warn(fields, message);
    this.schedule();
  }

  /** Writes the summary of every window that has ended (all of them with `all`), and forgets those windows. */
  flush(all = false): void {
    const t = this.o.now();
    for (const [key, w] of this.windows) {
      if (!all && t - w.startedAt < this.o.windowMs) continue;
      this.summarise(w);
      this.windows.delete(key);
    }
    if (this.windows.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  /** The coordinator is stopping: the counts so far come out now. */
  close(): void {
    this.flush(true);
  }

  private summarise(w: Window): void {
    if (w.more === 0) return;
    const seconds = Math.max(1, Math.round((this.o.now() - w.startedAt) / 1000));
    this.log.warn(
      { site: w.site, reason: w.reason, refused: w.more, seconds, lastReason: w.lastDetail },
      `${w.more} more refused upload${w.more === 1 ? '' : 's'} from site ${w.site} for reason ${w.reason} in the last ${seconds} s (collapsed into one line)`,
    );
  }

  private schedule(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.flush(), Math.max(250, this.o.windowMs / 4));
    this.timer.unref();
  }
}
