/**
 * Reads a plan from YAML or JSON text and reports every problem with its path and line,
 * e.g. "plan.yaml:7: rounds: Too small: expected number to be >0".
 */
import { readFileSync } from 'node:fs';
import { LineCounter, parseDocument, isMap, isSeq, isScalar, type Node } from 'yaml';
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
  if (result.success) {
    // Rules across sections, checked here so the schema stays a plain object others can pick parts from.
    const cross = crossSectionProblems(result.data).map((c) => `${source}:${lineOf(doc.contents, c.path, lineCounter) ?? '?'}: ${c.path.join('.')}: ${c.message}`);
    if (cross.length === 0) return result.data;
    throw new PlanError(source, cross);
  }
  const problems = result.error.issues.map((issue) => {
    const path = issue.path.map(String);
    // An unknown key is best pointed at by its own line.
    const probe = issue.code === 'unrecognized_keys' ? [...path, (issue as { keys: string[] }).keys[0]] : path;
    const line = lineOf(doc.contents, probe, lineCounter);
    const where = path.length > 0 ? path.join('.') : '(top level)';
    return `${source}:${line ?? '?'}: ${where}: ${issue.message}`;
  });
  throw new PlanError(source, problems);
}

function crossSectionProblems(plan: Plan): { path: string[]; message: string }[] {
  const out: { path: string[]; message: string }[] = [];
  if (plan.model.architecture === 'tiny3d' && plan.local.optimizer) {
    out.push({ path: ['local', 'optimizer'], message: 'applies to model.architecture med3d; the tiny3d demo net always trains with Adam at local.learningRate (remove local.optimizer or use med3d)' });
  }
  if (plan.model.architecture === 'med3d' && plan.model.head === 'segmentation' && plan.model.patch.some((d) => d % 8 !== 0)) {
    out.push({ path: ['model', 'patch'], message: `med3d segmentation predicts on a ¼ grid and needs patch sides that are multiples of 8, got [${plan.model.patch.join(', ')}]` });
  }
  return out;
}

export function loadPlanFile(path: string): Plan {
  return parsePlan(readFileSync(path, 'utf8'), path);
}

export function defaultPlan(overrides: Record<string, unknown> = {}): Plan {
  return PlanSchema.parse(overrides);
}

/**
 * Line of the deepest part of `path` that exists in the document: the key's own line for a map entry
 * (so an error about `local` points at `local:`, not at its first child), the item's line in a list.
 */
function lineOf(root: unknown, path: readonly string[], lc: LineCounter): number | undefined {
  let node = root as Node | null | undefined;
  let line = node && 'range' in node && node.range ? lc.linePos(node.range[0]).line : undefined;
  for (const seg of path) {
    if (isMap(node)) {
      const pair = node.items.find((p) => (isScalar(p.key) ? String(p.key.value) : String(p.key)) === seg);
      if (!pair) break;
      const key = pair.key as Node | null;
      if (key?.range) line = lc.linePos(key.range[0]).line;
      node = pair.value as Node | null;
    } else if (isSeq(node)) {
      const item = node.items[Number(seg)] as Node | undefined;
      if (!item) break;
      if (item.range) line = lc.linePos(item.range[0]).line;
      node = item;
    } else break;
  }
  return line;
}
