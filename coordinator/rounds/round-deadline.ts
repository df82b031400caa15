/**
 * When an upload round ends: as soon as every selected site reported, or every one reported or declined with the
 * quorum (plan minSites) met; at the deadline, it closes on a quorum and fails without one. Pure decisions: the engine
 * carries them out. (A round whose input a feature collects hands its deadline to that feature instead.)
 */
import type { OpenRound } from './open-round.ts';
import { allAccountedFor } from './open-round.ts';

/** What the round's deadline does to it. */
export type DeadlineVerdict = { close: string } | { fail: string };

/** Why the round may close now that a site reported or declined (before its deadline), or undefined to keep waiting. */
export function earlyCloseReason(open: OpenRound, minSites: number): string | undefined {
  if (open.row.selected.every((s) => open.reported.has(s))) return 'all selected sites reported';
  if (allAccountedFor(open) && open.reported.size >= minSites) return 'every selected site reported or declined';
  return undefined;
}

/** At the deadline: close on what was folded if the quorum reported, else fail the round saying how far it got. */
export function deadlineVerdict(open: OpenRound, minSites: number): DeadlineVerdict {
  const { reported, row } = open;
  if (reported.size >= minSites) return { close: `deadline reached with quorum (${reported.size} of ${row.selected.length} sites)` };
  return { fail: `deadline reached without quorum: ${reported.size} of ${row.selected.length} selected sites reported, ${minSites} needed` };
}
