/**
 * An upload round's aggregate rebuilt from the store, and the resume of a round found open at start-up: accepted
 * updates were stored before their ack, so re-folding them reproduces the running sum exactly; the round gets extra
 * time for sites to notice the restart and come back. A feature whose input lived in memory may refuse the resume:
 * the round then fails, durably and announced.
 */
import { readFileSync } from 'node:fs';
import { SITE_MAX_RECONNECT_BACKOFF_MS } from '../../shared/protocol/reconnect.ts';
import { pick } from '../../shared/model/sharing.ts';
import { decodeUpdate } from '../../shared/tensors/update-codec.ts';
import { describeStorageFault } from '../../shared/util/storage-fault.ts';
import type { RoundAggregator } from '../aggregation/strategy.ts';
import { outboxRows } from '../events/outbox.ts';
import type { RoundRow } from '../store/store.ts';
import { aggregatorContext, type OpenRound } from './open-round.ts';
import { stageAfter } from './pretraining-stage.ts';
import type { RoundView } from './round-feature.ts';
import type { RoundParts } from './round-parts.ts';

/** Time a resumed round gives sites beyond their longest reconnect backoff: to connect, and to resend or retrain. */
export const RESUME_GRACE_MARGIN_MS = 30_000;

/**
 * Extra time for an open round found at start-up: half the round deadline, at most 60 s, but never less than a site
 * needs to notice the restart and come back (its longest reconnect backoff plus a margin).
 */
export function resumeGraceMs(roundDeadlineSeconds: number): number {
  return Math.max(Math.min(60_000, roundDeadlineSeconds * 500), SITE_MAX_RECONNECT_BACKOFF_MS + RESUME_GRACE_MARGIN_MS);
}

export interface RoundRecoveryOptions extends RoundParts {
  /** Extra time for a resumed round (default resumeGraceMs of the plan's deadline). */
  graceMs?: number;
}

/** A round's aggregator rebuilt from its stored updates, and the sites they came from. */
export interface Refolded {
  aggregator: RoundAggregator;
  reported: Set<string>;
}

/** What start-up made of the round it found open: resumed (maybe with every update already in), or failed. */
export type Recovery = { resumed: OpenRound; allReported: boolean } | { failed: string };

export class RoundRecovery {
  constructor(private readonly o: RoundRecoveryOptions) {}

  /** The round's aggregator rebuilt from its accepted updates in the store (at start-up, before any call is served). */
  refold(row: RoundRow): Refolded {
    const steps = this.refoldSteps(row);
    for (;;) {
      const step = steps.next();
      if (step.done) return step.value;
    }
  }

  /**
   * The same in a running coordinator (a close that failed, an aggregate a failed fold left stale): it gives the event
   * loop a turn after each update, so heartbeats and transfers go on while a round of large updates is read again.
   */
  async refoldYielding(row: RoundRow): Promise<Refolded> {
    const steps = this.refoldSteps(row);
    for (;;) {
      const step = steps.next();
      if (step.done) return step.value;
      await new Promise((r) => setImmediate(r));
    }
  }

  /** Folds one stored update per step. */
  private *refoldSteps(row: RoundRow): Generator<void, Refolded> {
    const { store, models, strategy, shared } = this.o;
    // The base model is handed to the strategy and not kept here: a strategy that needs it keeps it.
    const aggregator = strategy.begin(models.reader(row.baseModelHash), shared, aggregatorContext(row, this.o.plan.compression.delta));
    const reported = new Set<string>();
    try {
      for (const u of store.updatesForRound(row.round)) {
        const d = decodeUpdate(readFileSync(u.path), { views: true });
        aggregator.add(pick(d.bundle, shared), { site: u.site, numSamples: u.numSamples, isDelta: d.isDelta });
        reported.add(u.site);
        yield;
      }
    } catch (e) {
      aggregator.discard?.();
      throw e;
    }
    return { aggregator, reported };
  }

  /** Resumes the round `row` found open at start-up, or fails it (stored, announced, features told) if a feature refuses. */
  recover(row: RoundRow): Recovery {
    const { store, plan, log } = this.o;
    const refusal = this.o.features.resumeRefusal(row);
    if (refusal) {
      const failed = this.o.events.event('round.failed', { round: row.round, reason: refusal.note });
      store.failRound(row.round, refusal.note, Date.now(), outboxRows(failed));
      this.o.events.publish(failed);
      log.warn({ round: row.round }, refusal.note);
      const view: RoundView = { row, stage: stageAfter(plan, store.closedRoundCount()), reported: new Set(), inputCollectedBy: refusal.feature };
      this.o.features.notify('onRoundFailed', (g) => g.onRoundFailed?.(view, refusal.note));
      return { failed: refusal.note };
    }
    const { aggregator, reported } = this.refold(row);
    const grace = this.o.graceMs ?? resumeGraceMs(plan.roundDeadlineSeconds);
    const deadlineAt = Math.max(row.deadlineAt, Date.now() + grace);
    try {
      if (deadlineAt !== row.deadlineAt) store.extendDeadline(row.round, deadlineAt);
    } catch (e) {
      // The later deadline holds in memory; only a second restart would fall back to the stored one.
      log.warn({ round: row.round, err: describeStorageFault(e) }, "could not store the resumed round's extended deadline");
    }
    const resumed: OpenRound = { row: { ...row, deadlineAt }, aggregator, reported, closing: false, stage: stageAfter(plan, store.closedRoundCount()) };
    log.info({ round: row.round, reported: reported.size, selected: row.selected.length }, 'resumed open round after restart');
    return { resumed, allReported: row.selected.every((s) => reported.has(s)) };
  }
}
