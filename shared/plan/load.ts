/**
 * Reads a plan from YAML or JSON text and reports every problem with its path and line,
 * e.g. "plan.yaml:7: rounds: Too small: expected number to be >0".
 */
import { readFileSync } from 'node:fs';
import { readYaml, zodProblems } from '../util/yaml-config.ts';
import { modelDefinition } from '../model/registry.ts';
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
 * Defaults that depend on other fields, applied only where the plan leaves the field out: the layer types the
 * architecture keeps at each site by default (a Med3D encoder with BatchNorm keeps its norm layers: FedBN; sites'
 * scanners differ, and an average of their batch statistics describes no site); a plan that says `share.keepLocal`
 * (even `[]`) keeps what it says.
 */
export function withDependentDefaults(raw: unknown, plan: Plan): Plan {
  const share = (raw as { share?: { keepLocal?: unknown } } | null | undefined)?.share;
  if (share?.keepLocal !== undefined || plan.share.keepLocal.length > 0) return plan;
  const keepLocal = modelDefinition(plan.model.architecture).defaultKeepLocal(plan.model);
  return keepLocal.length > 0 ? { ...plan, share: { ...plan.share, keepLocal: [...keepLocal] } } : plan;
}

function crossSectionProblems(plan: Plan): { path: string[]; message: string }[] {
  return modelDefinition(plan.model.architecture).planProblems(plan).map((p) => ({ path: p.path.map(String), message: p.message }));
}

export function loadPlanFile(path: string): Plan {
  return parsePlan(readFileSync(path, 'utf8'), path);
}

export function defaultPlan(overrides: Record<string, unknown> = {}): Plan {
  return withDependentDefaults(overrides, PlanSchema.parse(overrides));
}
