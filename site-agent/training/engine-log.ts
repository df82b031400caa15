/**
 * The engines a site tried, as its start-up log line shows them. The Med3D kernel choice probes the native tfjs
 * packages by forcing each in turn, and a forced engine that fails to load says it "was requested (MEDFL_ENGINE or
 * --engine)". Nobody requested it when the choice was automatic, and a site admin reading that line goes looking
 * for a setting that is not there; so unless the admin named that engine, the log keeps only the reason it failed.
 */
import type { EngineAttempt } from '../../shared/engine/select.ts';

const REQUESTED = /^engine "[^"]*" was requested \(MEDFL_ENGINE or --engine\), but /;

/**
 * `tried` with the "was requested" wording dropped from every attempt the admin did not name. `requested` holds what
 * was named (--engine, MEDFL_ENGINE, --kernels / MEDFL_KERNELS); "auto" or nothing names no engine.
 */
export function attemptsForLog(tried: readonly EngineAttempt[], requested: readonly (string | undefined)[]): EngineAttempt[] {
  const named = new Set(requested.map((r) => r?.trim()).filter((r): r is string => !!r && r !== 'auto'));
  return tried.map((a) => (a.reason && !named.has(a.name) && REQUESTED.test(a.reason) ? { ...a, reason: `not available: ${a.reason.replace(REQUESTED, '')}` } : a));
}
