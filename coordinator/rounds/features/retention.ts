/**
 * plan.retention.updateRounds: once a close is committed, deletes the update files (and masked inputs) of closed
 * rounds older than the most recent N. Only the open round's updates are read again (re-fold after a restart), so
 * nothing needed is lost; store rows stay, naming what was accepted and its SHA-256.
 */
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { RoundFeature, RoundFeatureContext, RoundView } from '../round-feature.ts';

export class Retention implements RoundFeature {
  readonly name = 'retention';

  constructor(
    private readonly c: RoundFeatureContext,
    /** Folders holding round-N/ subfolders (accepted updates, masked inputs); absent ones are skipped. */
    private readonly dirs: ReadonlyArray<string | undefined>,
  ) {}

  onRoundClosed(round: RoundView): void {
    const keep = this.c.plan.retention.updateRounds;
    if (keep === 'all') return;
    const oldestKept = round.row.round - keep + 1;
    const pruned: number[] = [];
    for (const dir of this.dirs) {
      if (!dir || !existsSync(dir)) continue;
      for (const name of readdirSync(dir)) {
        const m = /^round-(\d+)$/.exec(name);
        if (!m || Number(m[1]) >= oldestKept) continue;
        rmSync(join(dir, name), { recursive: true, force: true });
        pruned.push(Number(m[1]));
      }
    }
    if (pruned.length > 0) this.c.log.info({ rounds: [...new Set(pruned)].sort((a, b) => a - b), keep }, 'deleted the update files of older closed rounds (plan.retention)');
  }
}
