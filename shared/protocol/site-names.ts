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
