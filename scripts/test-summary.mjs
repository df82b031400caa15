// Prints the plain closing line CI reads ("N passed, N failed") from vitest's JSON report.
// The typecheck and the lint count as one more check each, so neither can hide behind green tests.
import { readFileSync, existsSync } from 'node:fs';

const [file, typecheckExit = '0', lintExit = '0'] = process.argv.slice(2);
if (!existsSync(file)) {
  console.log(`0 passed, ${1 + (Number(typecheckExit) !== 0 ? 1 : 0) + (Number(lintExit) !== 0 ? 1 : 0)} failed`);
  console.error(`no test report at ${file}: vitest did not run`);
  process.exit(1);
}
const r = JSON.parse(readFileSync(file, 'utf8'));
const tcFailed = Number(typecheckExit) !== 0 ? 1 : 0;
const lintFailed = Number(lintExit) !== 0 ? 1 : 0;
const passed = r.numPassedTests + (tcFailed ? 0 : 1) + (lintFailed ? 0 : 1);
const failed = r.numFailedTests + tcFailed + lintFailed + filesFailedWithoutFailedTests(r);
const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(failed > 0 || r.numTotalTests === 0 ? 1 : 0);

// A file that fails to load has no failed tests but is a failure; one with failed tests is already counted. (Counted
// from the files themselves: vitest's numFailedTestSuites also counts describe blocks, which double-counted a failure.)
function filesFailedWithoutFailedTests(report) {
  return (report.testResults ?? []).filter((s) => s.status === 'failed' && !(s.assertionResults ?? []).some((a) => a.status === 'failed')).length;
}
