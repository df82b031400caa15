/**
 * Noisy Student's own test, applied at each site: a generation's students must end up better than their teacher.
 * After a round in which the site trained with a generation's pseudo-labels, the model it receives next (the
 * aggregate those students made) is scored against that teacher on the site's validation cases. If it does not
 * beat the teacher, the generation is retired at this site: its pseudo-labels are not used again, however far the
 * federation later falls behind it. Without this rule the per-round teacher-versus-model check (teacher-vs-model.ts)
 * cannot see harm it takes part in: pseudo-labels that pull the students below their teacher make the teacher look
 * better than the model, and the check then keeps them on.
 */

export type StudentVerdict = { readonly retire: false } | { readonly retire: true; readonly why: 'student not better' | 'unmeasured' };

/** `teacherDice`: the generation's validation Dice at this site; `modelDice`: the received model's (NaN = unmeasured). */
export function studentVerdict(teacherDice: number, modelDice: number): StudentVerdict {
  if (!Number.isFinite(teacherDice) || !Number.isFinite(modelDice)) return { retire: true, why: 'unmeasured' };
  return modelDice > teacherDice ? { retire: false } : { retire: true, why: 'student not better' };
}
