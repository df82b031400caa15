/**
 * The closing line CI reads ("N passed, N failed") from vitest's JSON report: one failed test counts once, however
 * many describe blocks around it vitest also reports as failed suites; a file that fails to load counts once; the
 * typecheck and the lint count as one check each.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const dir = mkdtempSync(join(tmpdir(), 'medfl-summary-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

type File = { status: 'passed' | 'failed'; assertionResults: { status: 'passed' | 'failed' }[] };
function summary(files: File[], suitesFailed: number, typecheck = 0, lint = 0): { line: string; code: number | null } {
  const tests = files.flatMap((f) => f.assertionResults);
  const report = {
    numTotalTests: tests.length,
    numPassedTests: tests.filter((t) => t.status === 'passed').length,
    numFailedTests: tests.filter((t) => t.status === 'failed').length,
    numFailedTestSuites: suitesFailed,
    testResults: files,
  };
  const file = join(dir, `r${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(file, JSON.stringify(report));
  const r = spawnSync(process.execPath, ['scripts/test-summary.mjs', file, String(typecheck), String(lint)], { encoding: 'utf8' });
  return { line: r.stdout.trim(), code: r.status };
}

const ok = (n: number): File => ({ status: 'passed', assertionResults: Array.from({ length: n }, () => ({ status: 'passed' as const })) });

describe('the CI summary line', () => {
  it('counts every test plus the typecheck and the lint when all pass', () => {
    expect(summary([ok(3), ok(2)], 0)).toEqual({ line: '7 passed, 0 failed', code: 0 });
  });

  it('counts one failed test once, though vitest reports its file and two describe blocks as failed suites', () => {
    const failing: File = { status: 'failed', assertionResults: [{ status: 'passed' }, { status: 'failed' }] };
    expect(summary([ok(2), failing], 3)).toEqual({ line: '5 passed, 1 failed', code: 1 });
  });

  it('counts a file that failed to load, and a failed typecheck or lint', () => {
    const unloadable: File = { status: 'failed', assertionResults: [] };
    expect(summary([ok(2), unloadable], 1)).toEqual({ line: '4 passed, 1 failed', code: 1 });
    expect(summary([ok(2)], 0, 2, 1)).toEqual({ line: '2 passed, 2 failed', code: 1 });
  });
});
