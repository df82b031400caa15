// The Node versions MedFL runs on (package.json "engines": 20 to 22), checked before anything else loads, so an
// old distribution Node (Debian 12 ships 18) gets one line with the fix instead of a syntax or loader error.
// Plain JavaScript without imports: it must run on any Node, however old.

/** The problem with running on Node `version` (e.g. "v18.19.0"), or undefined when it is supported. */
export function nodeVersionProblem(version) {
  const major = Number(/^v?(\d+)\./.exec(version)?.[1] ?? Number.NaN);
  if (major >= 20 && major <= 22) return undefined;
  return (
    `medfl needs Node.js 20, 21 or 22; this is Node ${version}. ` +
    'fix: install Node 20 (Debian/Ubuntu: NodeSource\'s nodesource_setup 20.x or the official tarball from nodejs.org; ' +
    'RHEL-like: dnf module enable nodejs:20) as deploy/README.md "Node.js 20" describes, then run medfl with it'
  );
}
