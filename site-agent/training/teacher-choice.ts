/**
 * Which teacher generation a site learns from. The coordinator promotes an aggregate every few rounds; each site
 * then measures the new teacher (with its own head) on its validation cases and adopts it only when it passes the
 * plan's floor (minTeacherDice) and beats the teacher the site already uses. Otherwise the site keeps the earlier
 * generation's pseudo-labels (still on its disk), so a worse teacher never replaces a better one — the decision
 * needs no round trip and no per-case value leaves the site. Without validation cases nothing is adopted.
 */
import { existsSync, readFileSync } from 'node:fs';
import { z } from 'zod';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';

const ChoiceSchema = z.object({
  generation: z.number().int().positive(),
  modelHash: z.string().regex(/^[0-9a-f]{64}$/),
  /** The teacher's mean validation Dice at this site when it was adopted. */
  dice: z.number(),
  /** The round in which this site last trained with the generation's pseudo-labels, while its verdict is pending (student-verdict.ts). */
  pendingRound: z.number().int().nonnegative().optional(),
  /** Its students did not beat it here: its pseudo-labels are not used again (student-verdict.ts). */
  retired: z.boolean().optional(),
});
export type TeacherChoice = z.infer<typeof ChoiceSchema>;

export function readTeacherChoice(path: string): TeacherChoice | undefined {
  if (!existsSync(path)) return undefined;
  try {
    return ChoiceSchema.parse(JSON.parse(readFileSync(path, 'utf8')));
  } catch {
    return undefined; // unreadable: the next generation that passes the floor is adopted afresh
  }
}

export function writeTeacherChoice(path: string, c: TeacherChoice): void {
  writeFileAtomic(path, JSON.stringify(c) + '\n', 0o600);
}

export type TeacherDecision =
  | { readonly use: 'new' }
  | { readonly use: 'previous'; readonly why: 'not better' | 'below floor' }
  | { readonly use: 'none' };

/**
 * `candidate` is the promoted teacher's measured validation Dice (NaN = unmeasured); `previous` the generation in
 * use, if its pseudo-labels are still complete on disk.
 */
export function chooseTeacher(candidate: { generation: number; dice: number }, previous: TeacherChoice | undefined, minTeacherDice: number): TeacherDecision {
  const passes = candidate.dice >= minTeacherDice; // false for NaN: fails closed
  if (!previous || previous.generation >= candidate.generation) return passes ? { use: 'new' } : { use: 'none' };
  if (!passes) return { use: 'previous', why: 'below floor' };
  return candidate.dice > previous.dice ? { use: 'new' } : { use: 'previous', why: 'not better' };
}
