/**
 * When the next round may open and with whom: once plan minSites enrolled sites are connected (a warning each
 * waitForSitesSeconds while fewer are), after a short gather (plan gatherSeconds) for the other enrolled sites, so one
 * late process start does not leave a site out of a whole round; then plan sitesPerRound of them drawn at random.
 */
import type { Plan } from '../../shared/plan/schema.ts';
import type { Logger } from '../../shared/util/log.ts';

export interface OpeningQuorumOptions {
  plan: Plan;
  log: Logger;
  /** How many sites are connected now (enrolled or not), for the waiting warning. */
  connectedCount(): number;
  /** Asks again whether a round may open (a timer fired). */
  retry(): void;
}

export class OpeningQuorum {
  private waitTimer: NodeJS.Timeout | undefined;
  private gatherUntil: number | undefined;
  private gatherTimer: NodeJS.Timeout | undefined;

  constructor(private readonly o: OpeningQuorumOptions) {}

  /**
   * True when a round may open now among `eligible` (the connected, enrolled sites); `missing` lists the enrolled
   * sites not connected. Otherwise a timer asks again later.
   */
  ready(eligible: readonly string[], missing: () => readonly string[]): boolean {
    const { plan, log } = this.o;
    if (eligible.length < plan.minSites) {
      if (!this.waitTimer) {
        log.info({ connected: eligible.length, needed: plan.minSites }, 'waiting for sites to connect');
        this.waitTimer = setTimeout(() => {
          this.waitTimer = undefined;
          log.warn({ connected: this.o.connectedCount(), needed: plan.minSites, waitedSeconds: plan.waitForSitesSeconds }, 'still waiting for a quorum of sites');
          this.o.retry();
        }, plan.waitForSitesSeconds * 1000);
      }
      return false;
    }
    if (this.waitTimer) {
      clearTimeout(this.waitTimer);
      this.waitTimer = undefined;
    }
    const absent = missing();
    if (absent.length > 0 && plan.gatherSeconds > 0) {
      const now = Date.now();
      if (this.gatherUntil === undefined) {
        this.gatherUntil = now + plan.gatherSeconds * 1000;
        this.gatherTimer = setTimeout(() => this.o.retry(), plan.gatherSeconds * 1000);
        log.info({ connected: eligible.length, missing: absent.length, seconds: plan.gatherSeconds }, 'quorum connected; waiting briefly for the other sites');
        return false;
      }
      if (now < this.gatherUntil) return false;
    }
    this.gatherUntil = undefined;
    if (this.gatherTimer) {
      clearTimeout(this.gatherTimer);
      this.gatherTimer = undefined;
    }
    return true;
  }

  /** The sites of the next round: plan sitesPerRound of `eligible` at random (sorted), or all of them. */
  select(eligible: readonly string[]): string[] {
    const { sitesPerRound } = this.o.plan;
    return sitesPerRound > 0 ? shuffle(eligible).slice(0, sitesPerRound).sort() : [...eligible];
  }

  stop(): void {
    if (this.waitTimer) clearTimeout(this.waitTimer);
    if (this.gatherTimer) clearTimeout(this.gatherTimer);
  }
}

function shuffle<T>(xs: readonly T[]): T[] {
  const a = [...xs];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}
