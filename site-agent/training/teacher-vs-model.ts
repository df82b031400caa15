/**
 * Whether this round's student should learn from the teacher's pseudo-labels at all. The adoption gate
 * (teacher-choice.ts) compares a teacher with the previous generation; late in training both can trail the model
 * the site has just received, and then an older model's pseudo-labels drag the student back towards it. So each
 * round the site also compares the teacher it would use with the received model (the global shared tensors with its
 * own head), both on its own validation cases, and uses pseudo-labels only while the teacher is at least as good,
 * less the plan's margin. Unmeasured means no: without validation cases neither score exists (fails closed).
 */

export type PseudoLabelUse = { readonly use: true } | { readonly use: false; readonly why: 'model ahead' | 'unmeasured' };

/**
 * `teacherDice` and `modelDice` are mean validation Dice at this site (NaN = unmeasured); `margin` is how far the
 * teacher may trail the model and still be used (plan teacherStudent.modelMargin, default −0.005; below 0, how far it
 * must lead).
 */
export function pseudoLabelUse(teacherDice: number, modelDice: number, margin: number): PseudoLabelUse {
  if (!Number.isFinite(teacherDice) || !Number.isFinite(modelDice)) return { use: false, why: 'unmeasured' };
  return teacherDice >= modelDice - margin ? { use: true } : { use: false, why: 'model ahead' };
}
