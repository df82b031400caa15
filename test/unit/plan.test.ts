import { describe, expect, it } from 'vitest';
import { parsePlan, PlanError, defaultPlan } from '../../shared/plan/load.ts';
import { localSteps } from '../../shared/plan/schema.ts';
import { DEFAULT_PLAN_YAML } from '../../coordinator/home.ts';

describe('plan', () => {
  it('the default plan written by `coordinator init` parses to the schema defaults', () => {
    const p = parsePlan(DEFAULT_PLAN_YAML);
    expect(p.share.parts).toEqual(['encoder']);
    expect(p.minSites).toBe(defaultPlan().minSites);
    expect(p.local.steps).toBe(12);
  });

  it('reads JSON as well as YAML', () => {
    expect(parsePlan('{"rounds": 7, "minSites": 1}').rounds).toBe(7);
  });

  it('names the file, line and path of every problem', () => {
    const text = ['rounds: 3', 'minSites: 0', 'local:', '  steps: 2', '  epochs: 1', 'model:', '  patch: [16, 16]', 'colour: blue'].join('\n');
    let err: PlanError | undefined;
    try {
      parsePlan(text, 'plan.yaml');
    } catch (e) {
      err = e as PlanError;
    }
    expect(err).toBeInstanceOf(PlanError);
    const problems = err!.problems.join('\n');
    expect(problems).toMatch(/plan\.yaml:2: minSites: /);
    expect(problems).toMatch(/plan\.yaml:3: local: give local\.steps or local\.epochs, not both/);
    expect(problems).toMatch(/plan\.yaml:7: model\.patch: /);
    expect(problems).toMatch(/plan\.yaml:8: .*Unrecognized key: "colour"/);
  });

  it('reports YAML syntax errors with their line', () => {
    expect(() => parsePlan('rounds: 3\nshare: [encoder\n', 'p.yaml')).toThrow(/p\.yaml:\d+:/);
  });

  it('turns epochs into steps from the local case count', () => {
    expect(localSteps(parsePlan('local: { epochs: 2, batchSize: 4 }'), 10)).toBe(5);
    expect(localSteps(parsePlan('local: { steps: 9 }'), 10)).toBe(9);
  });
});
