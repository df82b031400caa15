/**
 * Bounded metric labels for the coordinator's free-text reasons. The reasons are written for people (they name
 * values, tensors, hashes), so used as labels they would make a new time series per refusal; these map them onto
 * a small fixed set. Anything not recognised is 'other' (the log line keeps the full text).
 */

export const UPDATE_REJECTION_REASONS = ['not_admitted', 'non_finite', 'value_bound', 'norm', 'samples', 'layout', 'integrity', 'too_large', 'protocol', 'storage', 'other'] as const;
export type UpdateRejectionReason = (typeof UPDATE_REJECTION_REASONS)[number];

/** Ordered: the first rule whose pattern matches decides (e.g. a storage failure mentioning a chunk is 'storage'). */
const UPDATE_RULES: [RegExp, UpdateRejectionReason][] = [
  [/storing it failed/, 'storage'],
  // Any other unexpected error while receiving: not the site's doing, so no site-facing category.
  [/^upload failed: /, 'other'],
  [/no round is open|is not the open round|is not open any more|was not selected|already reported|was trained from model|is closing|uses secure aggregation/, 'not_admitted'],
  [/non-finite|overflows float64/, 'non_finite'],
  [/beyond the plan's bound/, 'value_bound'],
  [/L2 norm/, 'norm'],
  [/training samples/, 'samples'],
  [/does not match the plan's shared tensors|not a valid update|delta-encoded update/, 'layout'],
  [/hash mismatch|UpdateTrailer|ended after|ended without|ended before|shorter than/, 'integrity'],
  [/exceeds the \d+-byte limit|larger than the \d+-byte maximum/, 'too_large'],
  [/header|chunk|update id belongs/, 'protocol'],
];

export function updateRejectionReason(reason: string): UpdateRejectionReason {
  for (const [re, label] of UPDATE_RULES) if (re.test(reason)) return label;
  return 'other';
}

export const AUTH_FAILURE_REASONS = ['missing_token', 'malformed_token', 'unknown_site', 'bad_signature', 'expired', 'replayed', 'revoked', 'client_certificate', 'wrong_federation', 'invalid_claims', 'coordinator_error', 'other'] as const;
export type AuthFailureReason = (typeof AUTH_FAILURE_REASONS)[number];

const AUTH_RULES: [RegExp, AuthFailureReason][] = [
  [/client certificate/, 'client_certificate'],
  [/^missing '/, 'missing_token'],
  [/malformed token|is not of the form|more than one '|token alg/, 'malformed_token'],
  [/^unknown site|unusable registered key/, 'unknown_site'],
  [/signature does not verify/, 'bad_signature'],
  [/expired at/, 'expired'],
  [/replayed/, 'replayed'],
  [/is revoked/, 'revoked'],
  [/audience/, 'wrong_federation'],
  [/claim|issued in the future|lifetime|differs from 'iss'/, 'invalid_claims'],
];

/** The reason label of an authentication failure, from the AuthError message (coordinator/auth/interceptor.ts). */
export function authFailureReason(message: string): AuthFailureReason {
  for (const [re, label] of AUTH_RULES) if (re.test(message)) return label;
  return 'other';
}

export const ROUND_FAILURE_CAUSES = ['deadline', 'aggregate', 'secure_aggregation', 'restart', 'other'] as const;
export type RoundFailureCause = (typeof ROUND_FAILURE_CAUSES)[number];

/** From a round.failed event: its `cause` field where the engine sets one, else its reason text. */
export function roundFailureCause(event: Readonly<Record<string, unknown>>): RoundFailureCause {
  if (event.cause === 'aggregate') return 'aggregate';
  const reason = typeof event.reason === 'string' ? event.reason : '';
  if (/^deadline reached/.test(reason)) return 'deadline';
  if (/restarted during a secure-aggregation round/.test(reason)) return 'restart';
  if (/^secure aggregation failed/.test(reason)) return 'secure_aggregation';
  return 'other';
}
