/**
 * MedFL's version, as package.json says: read at run time so the CLI, `medfl status --json` and the dashboard can
 * never disagree with the installed package.
 */
import { readFileSync } from 'node:fs';

let cached: string | undefined;

export function medflVersion(): string {
  cached ??= (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  return cached;
}
