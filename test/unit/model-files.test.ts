/**
 * A coordinator killed while writing a model version (the chaos test's kill at the round close) leaves a
 * `.incoming-*` file; the coordinator's next start removes it and keeps every real version.
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';

const dir = mkdtempSync(join(tmpdir(), 'medfl-models-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('model files', () => {
  it('removes half-written versions and nothing else', () => {
    const models = new ModelFiles(dir);
    const saved = models.save(makeBundle([{ name: 'w', dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) }]), { round: '1' });
    writeFileSync(join(dir, '.incoming-0a1b2c3d4e5f.tmp'), Buffer.alloc(100));
    expect(models.cleanIncoming()).toBe(1);
    expect(readdirSync(dir)).toEqual([`${saved.hash}.safetensors`]);
    expect(models.cleanIncoming()).toBe(0);
  });
});
