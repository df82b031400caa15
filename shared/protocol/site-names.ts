/** Site names and enrolment tokens, as both sides parse them. */
export const SITE_NAME_PATTERN = /^[a-z][a-z0-9-]{0,63}$/;

/** The site an enrolment token was made for: tokens are SITE.SECRET, as printed by `medfl coordinator site add`. */
export function siteOfToken(token: string): string {
  const dot = token.indexOf('.');
  const name = dot > 0 ? token.slice(0, dot) : '';
  if (!SITE_NAME_PATTERN.test(name) || token.length - dot < 17) {
    throw new Error('this is not a MedFL enrolment token (expected SITE.SECRET as printed by `medfl coordinator site add`)');
  }
  return name;
}

/** Letters for the i-th generated site (from 0): a … z, then aa, ab, … az, ba, … (bijective base 26; never past z). */
export function siteLetters(i: number): string {
  if (!Number.isSafeInteger(i) || i < 0) throw new RangeError(`site index must be a whole number ≥ 0, got ${i}`);
  let out = '';
  for (let n = i + 1; n > 0; n = Math.floor((n - 1) / 26)) out = String.fromCharCode(97 + ((n - 1) % 26)) + out;
  return out;
}

/** The name the demo, experiments and benchmarks give their i-th site: site-a … site-z, site-aa, site-ab, … */
export function generatedSiteName(i: number): string {
  return `site-${siteLetters(i)}`;
}
