/**
 * The start-up check of bin/medfl.js: on a Node outside 20–22 the CLI stops with one line naming the fix (where
 * Node 20 comes from) before tsx or any MedFL module loads.
 */
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { nodeVersionProblem } from '../../bin/node-version.js';

const BIN = join(fileURLToPath(import.meta.url), '..', '..', '..', 'bin', 'medfl.js');

describe('Node version check at start-up', () => {
  it('accepts 20, 21 and 22 and names the fix for anything else', () => {
    for (const v of ['v20.0.0', 'v20.20.2', 'v21.7.3', 'v22.11.0']) expect(nodeVersionProblem(v)).toBeUndefined();
    for (const v of ['v18.19.0', 'v12.22.9', 'v23.1.0', 'nonsense']) {
      expect(nodeVersionProblem(v)).toMatch(/needs Node\.js 20, 21 or 22.*fix: install Node 20.*NodeSource.*nodejs:20.*deploy\/README\.md/);
    }
  });

  it('stops medfl on Debian 12\'s Node 18 with that line, before anything else loads', () => {
    // A Node reporting 18 (the version is all the check reads).
    const pretend18 = `data:text/javascript,Object.defineProperty(process, 'version', { value: 'v18.19.0' })`;
    const r = spawnSync(process.execPath, ['--import', pretend18, BIN, '--version'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^medfl needs Node\.js 20, 21 or 22; this is Node v18\.19\.0\. fix: /)]);
    const ok = spawnSync(process.execPath, [BIN, '--version'], { encoding: 'utf8', timeout: 60_000 });
    expect(ok.status).toBe(0);
  });
});
