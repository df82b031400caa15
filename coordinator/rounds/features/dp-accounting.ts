/**
 * Client-level differential privacy (plan aggregation.dp): the sites' DP settings in every task, and one release of
 * the RDP accountant per closed round, stored with the close so a restarted coordinator continues it.
 */
import { samplingRate } from '../privacy-budget.ts';
import { RdpAccountant, type RdpAccountantState } from '../../../shared/privacy/rdp-accountant.ts';
import type { TaskSettings } from '../../../shared/protocol/task.ts';
import type { CloseContribution, RoundFeature, RoundFeatureContext, RoundView } from '../round-feature.ts';

/** Store meta key of the privacy spent (written in the round-close transaction). */
export const PRIVACY_KEY = 'privacy';

/** What `medfl status` shows of the privacy spent (store meta PRIVACY_KEY). */
export interface PrivacySpent {
  /** ε after the last closed round at the plan's δ; null when the noise multiplier is 0 (no DP guarantee). */
  epsilon: number | null;
  delta: number;
  order: number | null;
  rounds: number;
  noiseMultiplier: number;
  clipNorm: number;
  accountant: RdpAccountantState | null;
}

export class DpAccounting implements RoundFeature {
  readonly name = 'dp-accounting';
  /** As committed in the store; a close moves it only once its transaction is written. */
  private accountant: RdpAccountant | undefined;
  /** The accountant after the round being closed, until its commit. */
  private next: RdpAccountant | undefined;

  constructor(private readonly c: RoundFeatureContext) {}

  start(): void {
    this.reload();
  }

  reload(): void {
    this.next = undefined;
    if (!this.c.plan.aggregation.dp) return;
    const p = this.c.store.getMeta(PRIVACY_KEY);
    const saved = p ? (JSON.parse(p) as PrivacySpent).accountant : null;
    this.accountant = saved ? RdpAccountant.fromJSON(saved) : new RdpAccountant();
  }

  taskSettings(): Partial<TaskSettings> {
    const dp = this.c.plan.aggregation.dp;
    return dp ? { dp: { ...dp } } : {};
  }

  /**
   * One DP release per closed round: the sampled Gaussian with q = sites asked / sites enrolled and the plan's
   * noise multiplier.
   */
  beforeCommit(round: RoundView): CloseContribution | undefined {
    const dp = this.c.plan.aggregation.dp;
    if (!dp || !this.accountant) return undefined;
    const { store } = this.c;
    const enrolled = store.listSites().filter((s) => s.state === 'enrolled').length;
    const selected = round.row.selected.length;
    const q = samplingRate(selected, enrolled);
    const prev = store.getMeta(PRIVACY_KEY);
    const rounds = (prev ? (JSON.parse(prev) as PrivacySpent).rounds : 0) + 1;
    let spent: PrivacySpent;
    if (dp.noiseMultiplier === 0) {
      spent = { epsilon: null, delta: dp.delta, order: null, rounds, noiseMultiplier: 0, clipNorm: dp.clipNorm, accountant: null };
    } else {
      // Step a copy: the live accountant only moves once the round-close transaction is written.
      const next = RdpAccountant.fromJSON(this.accountant.toJSON());
      next.step(q, dp.noiseMultiplier);
      const { epsilon, order } = next.epsilon(dp.delta);
      this.next = next;
      spent = { epsilon, delta: dp.delta, order, rounds, noiseMultiplier: dp.noiseMultiplier, clipNorm: dp.clipNorm, accountant: next.toJSON() };
    }
    return { meta: { [PRIVACY_KEY]: JSON.stringify(spent) }, closedFields: { dp: { epsilon: spent.epsilon, delta: spent.delta } }, logFields: { epsilon: spent.epsilon } };
  }

  onRoundClosed(): void {
    if (this.next) this.accountant = this.next;
    this.next = undefined;
  }
}
