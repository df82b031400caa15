/**
 * Secure aggregation's part of a round (plan aggregation.secureAggregation): the round collects its input through a
 * session (coordinator/secagg/session.ts) instead of uploads, so the coordinator sees masked inputs and their sum
 * only. This feature opens the session, tells each site what it needs to take part, folds the unmasked sum once and
 * closes the round, or fails it when the session ends without a sum. A session lives in memory only: a round that
 * was open when the coordinator stopped is not resumed.
 */
import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { ParamInfo } from '../../../shared/model/types.ts';
import { sharedParams } from '../../../shared/model/sharing.ts';
import { decodeRoundSum } from '../../../shared/privacy/secagg/wire.ts';
import type { TaskSettings } from '../../../shared/protocol/task.ts';
import { makeBundle, type NamedTensor } from '../../../shared/tensors/bundle.ts';
import { writeFileAtomic } from '../../../shared/util/fs-atomic.ts';
import { SecAggRound, type SecAggResult } from '../../secagg/session.ts';
import type { RoundRow } from '../../store/store.ts';
import type { CloseContribution, RoundFeature, RoundFeatureContext, RoundInput, RoundInputControl, RoundView, SummedInput } from '../round-feature.ts';

/** The open round's session, and the engine's control of that round. */
interface CurrentSession {
  readonly round: number;
  readonly session: SecAggRound;
  readonly control: RoundInputControl;
}

export class SecureAggregation implements RoundFeature {
  readonly name = 'secure-aggregation';
  /** Shared values plus one slot for the weight. */
  readonly vectorLength: number;
  /** The plan's shared tensors, in the order of the masked vector. */
  private readonly shared: readonly ParamInfo[];
  private current: CurrentSession | undefined;

  /** `maskedDir`: where the masked vectors received are kept (round-N/masked-SITE.u32), for audit; none when absent. */
  constructor(
    private readonly c: RoundFeatureContext,
    private readonly maskedDir?: string,
  ) {
    this.shared = sharedParams(c.architecture, c.plan.share);
    this.vectorLength = this.shared.reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0) + 1;
  }

  get enabled(): boolean {
    return this.c.plan.aggregation.secureAggregation.enabled;
  }

  /** Under DP every site puts in weight 1 (uniform DP-FedAvg), so no resolution is spent on larger weights. */
  get maxWeight(): number {
    return this.c.plan.aggregation.dp ? 1 : this.c.plan.aggregation.secureAggregation.maxWeight;
  }

  /** The session of the open round `round` while it takes input (for the SecureAggregation service), if it has one. */
  sessionFor(round: number): SecAggRound | undefined {
    const c = this.current;
    return c && c.round === round && c.control.isAccepting() ? c.session : undefined;
  }

  collectInput(round: RoundView, control: RoundInputControl): RoundInput | undefined {
    if (!this.enabled) return undefined;
    const { row } = round;
    const session = this.session(row, {
      onResult: (r) => this.foldResult(row, r, control),
      onFailure: (reason) => control.fail(`secure aggregation failed: ${reason}`),
    });
    this.current = { round: row.round, session, control };
    return {
      uploadRefusal: () => `round ${row.round} uses secure aggregation: send the masked input through SecureAggregation, not an update upload`,
      siteSettings: (site) => this.siteSettings(row, session, site),
      // Closes only through the session; still running at the deadline means it cannot finish in time.
      deadlineReached: () => session.abort(`round deadline reached in phase '${session.phase}'`),
      abort: (reason) => session.abort(reason),
      lostResultNote: (error) => `secure aggregation finished but storing its result failed (${error}); its sum cannot be rebuilt`,
    };
  }

  resumeRefusal(): string | undefined {
    // The session's state (keys, shares forwarded, the masked sum) lives in memory only: start over.
    return this.enabled ? 'the coordinator restarted during a secure-aggregation round; its session is not kept across restarts, so the round failed and a new one starts' : undefined;
  }

  /** The session's phase timeline goes into the round.closed event. */
  beforeCommit(round: RoundView): CloseContribution | undefined {
    const c = this.current;
    return c && c.round === round.row.round ? { closedFields: { secureAggregation: { timeline: c.session.timeline } } } : undefined;
  }

  onRoundClosed(round: RoundView): void {
    this.forget(round.row.round);
  }

  onRoundFailed(round: RoundView): void {
    this.forget(round.row.round);
  }

  /** The round is over: its session (and the masked sum it holds) can go. */
  private forget(round: number): void {
    if (this.current?.round === round) this.current = undefined;
  }

  /** The unmasked sum is folded once and the round closes; a sum that cannot be folded fails the round. */
  private foldResult(row: RoundRow, r: SecAggResult, control: RoundInputControl): void {
    void control.foldSum(() => this.decodeSum(row, r)).then(
      (folded) => {
        if (!folded) return;
        // No update.accepted (and so no ledger entry) per site: the coordinator never saw a single update.
        return control.close(`secure aggregation unmasked the sum of ${r.survivors.length} of ${row.selected.length} sites${r.dropped.length ? ` (${r.dropped.join(', ')} dropped before masking)` : ''}`);
      },
      (e: Error) => control.fail(`secure aggregation failed: folding the unmasked sum failed: ${e.message}`),
    );
  }

  /** A session for the round `row`: `onResult` gets the unmasked sum, `onFailure` why the session ended without one. */
  private session(row: RoundRow, handlers: { onResult(r: SecAggResult): void; onFailure(reason: string): void }): SecAggRound {
    const sa = this.c.plan.aggregation.secureAggregation;
    const dir = this.maskedDir ? join(this.maskedDir, `round-${row.round}`) : undefined;
    return new SecAggRound({
      round: row.round,
      sites: row.selected,
      threshold: sa.threshold,
      neighbours: sa.neighbours,
      vectorLength: this.vectorLength,
      phaseMs: sa.phaseSeconds * 1000,
      session: `${this.c.federationId}/round-${row.round}/${randomUUID()}`,
      log: this.c.log,
      onMasked: dir
        ? (site, y) => {
            mkdirSync(dir, { recursive: true });
            writeFileAtomic(join(dir, `masked-${site}.u32`), Buffer.from(y.buffer, y.byteOffset, y.byteLength));
          }
        : undefined,
      onResult: handlers.onResult,
      onFailure: handlers.onFailure,
    });
  }

  /** The unmasked Σ wᵢΔᵢ as the shared tensors, Σ wᵢ, and the sites in it. */
  private decodeSum(row: RoundRow, r: SecAggResult): SummedInput {
    const sa = this.c.plan.aggregation.secureAggregation;
    const { weightedDelta, weight } = decodeRoundSum(r.sum, { clip: sa.clip, sites: row.selected.length, maxWeight: this.maxWeight });
    const tensors: NamedTensor[] = [];
    let off = 0;
    for (const p of this.shared) {
      const n = p.shape.reduce((a, b) => a * b, 1);
      tensors.push({ name: p.name, dtype: 'F32', shape: [...p.shape], data: weightedDelta.subarray(off, off + n) });
      off += n;
    }
    return { sum: makeBundle(tensors), weight, sites: r.survivors };
  }

  /** What `site` needs to take part in `row`'s session: its id, t, k, the quantiser and the vector length. */
  private siteSettings(row: RoundRow, session: SecAggRound, site: string): Pick<TaskSettings, 'secureAggregation'> {
    const id = session.ids.get(site);
    if (id === undefined) return {};
    const sa = this.c.plan.aggregation.secureAggregation;
    const neighbours = sa.neighbours !== undefined && sa.neighbours < row.selected.length ? { neighbours: sa.neighbours } : {};
    return { secureAggregation: { id, threshold: sa.threshold, ...neighbours, clip: sa.clip, maxWeight: this.maxWeight, sites: row.selected.length, vectorLength: this.vectorLength } };
  }
}
