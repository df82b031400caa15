/**
 * Reads a plan from YAML or JSON text and reports every problem with its path and line,
 * e.g. "plan.yaml:7: rounds: Too small: expected number to be >0".
 */
import { readFileSync } from 'node:fs';
import { readYaml, zodProblems } from '../util/yaml-config.ts';
import { PlanSchema, type Plan } from './schema.ts';

export class PlanError extends Error {
  override name = 'PlanError';
  constructor(readonly source: string, readonly problems: string[]) {
    super(`plan ${source} is invalid:\n  ${problems.join('\n  ')}\nFix the plan and start again (see docs/plan.md).`);
  }
}

export function parsePlan(text: string, source = 'plan'): Plan {
  // YAML is a superset of JSON, so one parser (with positions) serves both.
  const doc = readYaml(text, source);
  if ('problems' in doc) throw new PlanError(source, doc.problems);
  const result = PlanSchema.safeParse(doc.raw);
  if (!result.success) throw new PlanError(source, zodProblems(result.error.issues, source, doc));
  // Rules across sections, checked here so the schema stays a plain object others can pick parts from.
  const cross = crossSectionProblems(result.data).map((c) => `${source}:${doc.line(c.path) ?? '?'}: ${c.path.join('.')}: ${c.message}`);
  if (cross.length > 0) throw new PlanError(source, cross);
  return withDependentDefaults(doc.raw, result.data);
}

/**
 * Defaults that depend on other fields, applied only where the plan leaves the field out: a Med3D encoder with
 * BatchNorm keeps its norm layers at each site (FedBN). Sites' scanners differ, and an average of their batch
 * statistics describes no site; a plan that says `share.keepLocal` (even `[]`) keeps what it says.
 */
export function withDependentDefaults(raw: unknown, plan: Plan): Plan {
  const share = (raw as { share?: { keepLocal?: unknown } } | null | undefined)?.share;
  if (share?.keepLocal === undefined && plan.model.architecture === 'med3d' && plan.model.norm === 'batch' && plan.share.keepLocal.length === 0) {
    return { ...plan, share: { ...plan.share, keepLocal: ['norm'] } };
  }
  return plan;
}

function crossSectionProblems(plan: Plan): { path: string[]; message: string }[] {
  const out: { path: string[]; message: string }[] = [];
  if (plan.model.architecture === 'tiny3d' && plan.local.optimizer) {
    out.push({ path: ['local', 'optimizer'], message: 'applies to model.architecture med3d; the tiny3d demo net always trains with Adam at local.learningRate (remove local.optimizer or use med3d)' });
  }
  if (plan.model.architecture === 'med3d' && plan.model.head !== 'classification' && plan.model.patch.some((d) => d % 8 !== 0)) {
    out.push({ path: ['model', 'patch'], message: `med3d ${plan.model.head} heads need patch sides that are multiples of 8 (the encoder's ⅛ grid), got [${plan.model.patch.join(', ')}]` });
  }
  return out;
}

export function loadPlanFile(path: string): Plan {
  return parsePlan(readFileSync(path, 'utf8'), path);
}

export function defaultPlan(overrides: Record<string, unknown> = {}): Plan {
  return withDependentDefaults(overrides, PlanSchema.parse(overrides));
}
