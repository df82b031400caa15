/**
 * Reads a plan from YAML or JSON text and reports every problem with its path and line,
 * e.g. "plan.yaml:7: rounds: Too small: expected number to be >0".
 */
import { readFileSync } from 'node:fs';
import { LineCounter, parseDocument, isNode } from 'yaml';
import { PlanSchema, type Plan } from './schema.ts';

export class PlanError extends Error {
  override name = 'PlanError';
  constructor(readonly source: string, readonly problems: string[]) {
    super(`plan ${source} is invalid:\n  ${problems.join('\n  ')}\nFix the plan and start again (see docs/plan.md).`);
  }
}

export function parsePlan(text: string, source = 'plan'): Plan {
  // YAML is a superset of JSON, so one parser (with positions) serves both.
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: true });
  if (doc.errors.length > 0) {
    throw new PlanError(source, doc.errors.map((e) => `${source}:${e.linePos?.[0]?.line ?? '?'}: ${e.message.split('\n')[0]}`));
  }
  const raw = doc.toJS() ?? {};
  const result = PlanSchema.safeParse(raw);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const path = issue.path.map(String);
    // An unknown key is best pointed at by its own line.
    const probe = issue.code === 'unrecognized_keys' ? [...path, (issue as { keys: string[] }).keys[0]] : path;
    // Walk up to the deepest node that exists so "unknown key" and "missing key" errors still get a line.
    let line: number | undefined;
    for (let n = probe.length; n >= 0 && line === undefined; n--) {
      const node = n === 0 ? doc.contents : doc.getIn(probe.slice(0, n), true);
      if (isNode(node) && node.range) line = lineCounter.linePos(node.range[0]).line;
    }
    const where = path.length > 0 ? path.join('.') : '(top level)';
    return `${source}:${line ?? '?'}: ${where}: ${issue.message}`;
  });
  throw new PlanError(source, problems);
}

export function loadPlanFile(path: string): Plan {
  return parsePlan(readFileSync(path, 'utf8'), path);
}

export function defaultPlan(overrides: Record<string, unknown> = {}): Plan {
  return PlanSchema.parse(overrides);
}
