/**
 * The wire edge of the task stream: every field of a Task from the coordinator is checked here, before the
 * signature or anything else looks at it. Identifiers that end up in file names (the task id names the outbox
 * files, the round names secure-aggregation files, hashes name cache files) must match strict patterns, so a
 * compromised or buggy coordinator cannot make the site write outside its folder (`../../../../x/PWNED`).
 *
 * Outbox paths are built only by outboxPath(), from a checked task id.
 */
import { join, resolve, sep } from 'node:path';
import { z } from 'zod';
import { SHA256_HEX } from '../../shared/util/hash.ts';
import type { WireTask } from './client.ts';

/**
 * Task ids as coordinators make them (`r12-site-a`, `finished-<uuid>`): a letter or digit first (never `.` or
 * `..`), then letters, digits, `.`, `_`, `-`; no path separators. At most 90 characters, so the update id
 * (`<task id>-<uuid>`) stays within the coordinator's 128.
 */
export const TASK_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,89}$/;
/** Update ids as the coordinator accepts them (coordinator/server/upload-receiver.ts). */
export const UPDATE_ID_PATTERN = /^[A-Za-z0-9._-]{8,128}$/;

const taskId = z.string().regex(TASK_ID_PATTERN, 'task_id must be 1–90 characters of [A-Za-z0-9._-], starting with a letter or digit (no path separators)');

export const WireTaskSchema = z.object({
  taskId,
  kind: z.enum(['TRAIN', 'FINISHED', 'KIND_UNSPECIFIED']),
  round: z.number().int().min(0).max(2 ** 31 - 1),
  modelHash: z.string().regex(SHA256_HEX, 'model_hash must be 64 lowercase hex digits'),
  modelSize: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  deadlineUnixMs: z.number().int().min(0),
  settingsJson: z.string().max(4 * 1024 * 1024),
  signature: z.instanceof(Uint8Array).refine((b) => b.length === 64, 'signature must be 64 bytes (Ed25519)'),
});

/** What the outbox keeps per update (outbox/<task id>.json), checked again when read back from disk. */
export const OutboxEntrySchema = z
  .object({
    updateId: z.string().regex(UPDATE_ID_PATTERN),
    taskId,
    round: z.number().int().positive(),
    baseModelHash: z.string().regex(SHA256_HEX),
    numSamples: z.number().int().positive(),
    metrics: z.record(z.string(), z.number()),
  })
  .strict();
export type OutboxEntry = z.infer<typeof OutboxEntrySchema>;

export class BadTaskError extends Error {
  override name = 'BadTaskError';
}

/** A task as decoded from the wire, checked; throws BadTaskError naming every bad field. */
export function parseWireTask(raw: unknown): WireTask {
  const r = WireTaskSchema.safeParse(raw);
  if (!r.success) {
    const taskIdText = typeof (raw as { taskId?: unknown } | null)?.taskId === 'string' ? JSON.stringify((raw as { taskId: string }).taskId.slice(0, 100)) : '(none)';
    throw new BadTaskError(`task ${taskIdText} refused: ${r.error.issues.map((i) => `${i.path.join('.') || '(top)'}: ${i.message}`).join('; ')}`);
  }
  return { ...r.data, signature: Buffer.from(r.data.signature) };
}

/** outbox/<task id>.<ext>, from a checked task id only; refuses anything that would resolve outside `outboxDir`. */
export function outboxPath(outboxDir: string, id: string, ext: 'json' | 'safetensors'): string {
  if (!TASK_ID_PATTERN.test(id)) throw new BadTaskError(`task id ${JSON.stringify(id.slice(0, 100))} cannot name an outbox file`);
  const path = join(outboxDir, `${id}.${ext}`);
  if (!resolve(path).startsWith(resolve(outboxDir) + sep)) throw new BadTaskError(`outbox file for task ${JSON.stringify(id)} would leave the outbox`);
  return path;
}
