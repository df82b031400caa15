/**
 * Issue 14, item 2: identifiers from the coordinator that reach file names at the site are checked where they
 * are decoded (site-agent/transport/task-wire.ts), and outbox paths are built only from checked values. One test
 * per path: task id → outbox files, round → secure-aggregation files, model / teacher hashes → cache files,
 * outbox entries read back from disk, and the site name / federation id the coordinator answers at enrolment.
 */
import { describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BadTaskError, OutboxEntrySchema, outboxPath, parseWireTask } from '../../site-agent/transport/task-wire.ts';
import { ModelCache } from '../../site-agent/transport/model-cache.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { UpdateHeaderSchema } from '../../coordinator/server/upload-receiver.ts';

const HASH = 'a'.repeat(64);
const task = (o: Record<string, unknown> = {}) => ({
  taskId: 'r1-site-a',
  kind: 'TRAIN',
  round: 1,
  modelHash: HASH,
  modelSize: 1234,
  deadlineUnixMs: 0,
  settingsJson: '{}',
  signature: Buffer.alloc(64),
  ...o,
});

describe('task ids (outbox file names)', () => {
  it('accepts the ids coordinators make', () => {
    expect(parseWireTask(task()).taskId).toBe('r1-site-a');
    expect(parseWireTask(task({ taskId: 'finished-0b1c2d3e-0000-4000-8000-000000000000', kind: 'FINISHED', round: 0 })).kind).toBe('FINISHED');
  });

  for (const bad of ['../../../../x/PWNED', '..', '.', 'a/b', 'a\\b', '/etc/passwd', '', 'x'.repeat(91), 'r1\u0000', '.hidden']) {
    it(`refuses task_id ${JSON.stringify(bad.slice(0, 30))} with an error naming the field`, () => {
      expect(() => parseWireTask(task({ taskId: bad }))).toThrow(BadTaskError);
      expect(() => parseWireTask(task({ taskId: bad }))).toThrow(/refused: taskId: task_id must be 1–90 characters of \[A-Za-z0-9._-\]/);
    });
  }

  it('outbox paths are built only from checked ids and never leave the outbox', () => {
    const outbox = join(mkdtempSync(join(tmpdir(), 'medfl-outbox-')), 'outbox');
    expect(outboxPath(outbox, 'r3-site-b', 'json')).toBe(join(outbox, 'r3-site-b.json'));
    expect(() => outboxPath(outbox, '../../../../x/PWNED', 'safetensors')).toThrow(/cannot name an outbox file/);
    expect(() => outboxPath(outbox, '..', 'json')).toThrow(BadTaskError);
  });

  it('an outbox entry read back from disk is checked like input', () => {
    const good = { updateId: 'r1-site-a-0b1c2d3e', taskId: 'r1-site-a', round: 1, baseModelHash: HASH, numSamples: 4, metrics: {} };
    expect(OutboxEntrySchema.parse(good)).toEqual(good);
    expect(OutboxEntrySchema.safeParse({ ...good, taskId: '../x' }).success).toBe(false);
    expect(OutboxEntrySchema.safeParse({ ...good, updateId: 'a/b/c/d/e/f' }).success).toBe(false);
  });
});

describe('the other identifiers of a task', () => {
  it('round (secure-aggregation files round-N.*): a non-negative integer', () => {
    for (const round of [-1, 1.5, Number.NaN, 2 ** 31]) expect(() => parseWireTask(task({ round }))).toThrow(/round/);
  });

  it('model hash (cache files HASH.safetensors): 64 lowercase hex digits, at the edge and again at the cache', () => {
    expect(() => parseWireTask(task({ modelHash: '../../x' }))).toThrow(/modelHash: model_hash must be 64 lowercase hex digits/);
    expect(() => parseWireTask(task({ modelHash: HASH.toUpperCase() }))).toThrow(/modelHash/);
    expect(() => new ModelCache(mkdtempSync(join(tmpdir(), 'medfl-cache-'))).pathFor('../x')).toThrow(/not a model hash/);
  });

  it('hashes inside the settings (encoded model file, teacher) and malformed fields', () => {
    const settings = (o: Record<string, unknown>) => ({
      federation: 'fed-1',
      model: { architecture: 'tiny3d', patch: [16, 16, 16], numClasses: 2, width: 4, seed: 1, init: 'scratch', depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: 'segmentation', dropout: 0 },
      local: { batchSize: 2, learningRate: 0.01, proximalMu: 0 },
      share: { parts: ['encoder'], keepLocal: [] },
      sharedTensors: [],
      ...o,
    });
    expect(TaskSettingsSchema.safeParse(settings({ modelFile: { hash: '../x', size: 1, encoding: 'int8' } })).success).toBe(false);
    expect(TaskSettingsSchema.safeParse(settings({ teacher: { modelHash: '../x', modelSize: 1, generation: 1 } })).success).toBe(false);
    expect(() => parseWireTask(task({ signature: Buffer.alloc(3) }))).toThrow(/signature must be 64 bytes/);
    expect(() => parseWireTask(task({ kind: 'EXPLODE' }))).toThrow(/kind/);
  });
});

describe('identifiers the coordinator decodes (its file names)', () => {
  it('update ids and rounds in an upload header (updates/round-N/SITE-UPDATEID.safetensors)', () => {
    const header = { updateId: 'r1-site-a-0b1c2d3e', round: 1, taskId: 'r1-site-a', baseModelHash: HASH, totalSize: 10, sha256: '', numSamples: 4 };
    expect(UpdateHeaderSchema.safeParse(header).success).toBe(true);
    expect(UpdateHeaderSchema.safeParse({ ...header, updateId: '../../../../../tmp/x' }).success).toBe(false);
    expect(UpdateHeaderSchema.safeParse({ ...header, round: -1 }).success).toBe(false);
  });
});
