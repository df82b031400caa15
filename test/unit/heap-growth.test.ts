/**
 * The coordinator lets V8's old generation grow further between full collections (shared/util/heap-growth.ts):
 * V8 says nothing but an "unrecognized flag" line on stderr when it does not know a flag, so this checks that this
 * Node's V8 still knows it — and that an unknown one is reported, so the check can fail.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { STREAMING_HEAP_FLAG } from '../../shared/util/heap-growth.ts';

const MODULE = join(import.meta.dirname, '../../shared/util/heap-growth.ts');

function runModule(code: string): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

describe('heap growth for processes that stream Buffers', () => {
  it("this Node's V8 knows the flag the coordinator sets", () => {
    expect(STREAMING_HEAP_FLAG).toBe('--heap-growing-percent=300');
    const applied = runModule(`import { growHeapForStreaming } from ${JSON.stringify(MODULE)}; growHeapForStreaming(); process.stdout.write('applied');`);
    expect(applied.status).toBe(0);
    expect(applied.stderr).not.toMatch(/unrecognized flag/i);
  });

  it('a flag V8 does not know is reported on stderr (what the check above looks for)', () => {
    const unknown = runModule(`import { setFlagsFromString } from 'node:v8'; setFlagsFromString('--heap-growing-percentage=300');`);
    expect(unknown.stderr).toMatch(/unrecognized flag --heap-growing-percentage/i);
  });
});
