/**
 * Property-based fuzzing (fast-check) of every decoder that reads bytes from the network or from disk (issue 14,
 * item 6): the protobuf messages of model transfers and the task stream, safetensors headers, the update
 * codec, task settings and wire tasks, NIfTI headers, dataset.json, .npy and PyTorch checkpoints.
 *
 * Each property feeds arbitrary bytes and valid encodings with bytes flipped, cut or inserted, and requires
 * either a valid decode or the decoder's own error type — never a TypeError/RangeError from deep inside, never a
 * hang (each call must finish quickly) and never an output larger than its input accounts for (no allocation
 * driven by a declared size alone). Runs are kept modest so the file stays well under 30 s.
 */
import fc from 'fast-check';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { ZodError } from 'zod';
import { loadProto } from '../../shared/protocol/grpc.ts';
import { modelChunkTail, writeModelChunkHead, MODEL_CHUNK_HEAD_ROOM } from '../../shared/protocol/chunk-codec.ts';
import { decodeSafetensors, encodeSafetensors, SafetensorsError } from '../../shared/tensors/safetensors.ts';
import { decodeUpdate, encodeUpdate } from '../../shared/tensors/update-codec.ts';
import { makeBundle, elementCount, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { TaskSettingsSchema, taskSettingsForPlan } from '../../shared/protocol/task.ts';
import { defaultPlan } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { BadTaskError, parseWireTask } from '../../site-agent/transport/task-wire.ts';
import { decodeNifti, encodeNifti, NiftiError, readNifti } from '../../site-agent/data/nifti.ts';
import { DatasetError, classNames, parseDatasetJson } from '../../site-agent/data/dataset-json.ts';
import { decodeNpy, encodeNpy, NpyError } from '../../shared/io/npy.ts';
import { readCheckpoint } from '../../shared/checkpoints/pth.ts';

const RUNS = 300;
/** Far above what any of these inputs (≤ a few KiB) needs; a call slower than this is treated as a hang. */
const MAX_CALL_MS = 2000;

type ErrorClass = abstract new (...args: never[]) => Error;

/** Runs `decode`; an exception must be one of `allowed`; a result goes to `check`. */
function decodesCleanly<T>(decode: () => T, allowed: readonly ErrorClass[], check?: (v: T) => void): void {
  const t0 = performance.now();
  let outcome: { value: T } | { error: unknown };
  try {
    outcome = { value: decode() };
  } catch (e) {
    outcome = { error: e };
  }
  // A hang is reported first, whether the call ended in a result or an exception.
  const ms = performance.now() - t0;
  if (ms > MAX_CALL_MS) throw new Error(`decoding took ${ms.toFixed(0)} ms`);
  if ('error' in outcome) {
    const e = outcome.error;
    if (!allowed.some((C) => e instanceof C)) throw new Error(`threw ${(e as Error)?.constructor?.name ?? typeof e} instead of ${allowed.map((C) => C.name).join('/')}: ${(e as Error)?.stack ?? String(e)}`);
    return;
  }
  check?.(outcome.value);
}

/** Valid encodings with a few bytes overwritten, a piece cut out or garbage inserted, or cut short. */
function mutated(seeds: readonly Uint8Array[]): fc.Arbitrary<Uint8Array> {
  return fc
    .record({
      seed: fc.integer({ min: 0, max: seeds.length - 1 }),
      flips: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
      insert: fc.option(fc.tuple(fc.nat(), fc.uint8Array({ minLength: 1, maxLength: 24 }))),
      remove: fc.option(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 64 }))),
      cut: fc.option(fc.nat()),
    })
    .map(({ seed, flips, insert, remove, cut }) => {
      let b = Buffer.from(seeds[seed]!);
      for (const [at, v] of flips) if (b.length > 0) b[at % b.length] = v;
      if (insert) {
        const at = insert[0] % (b.length + 1);
        b = Buffer.concat([b.subarray(0, at), insert[1], b.subarray(at)]);
      }
      if (remove && b.length > 0) {
        const at = remove[0] % b.length;
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + remove[1])]);
      }
      if (cut !== null) b = b.subarray(0, cut % (b.length + 1));
      return new Uint8Array(b);
    });
}

/** Bytes: arbitrary, or mutations of valid seeds (which reach far deeper into a decoder). */
const bytesFrom = (seeds: readonly Uint8Array[]) => fc.oneof({ arbitrary: fc.uint8Array({ maxLength: 1024 }), weight: 1 }, { arbitrary: mutated(seeds), weight: 4 });

/** Text: arbitrary, or a valid document with characters overwritten, cut or duplicated. */
function textFrom(seeds: readonly string[]): fc.Arbitrary<string> {
  const edited = fc
    .record({
      seed: fc.integer({ min: 0, max: seeds.length - 1 }),
      edits: fc.array(fc.tuple(fc.nat(), fc.string({ maxLength: 4 })), { maxLength: 4 }),
      cut: fc.option(fc.nat()),
    })
    .map(({ seed, edits, cut }) => {
      let s = seeds[seed]!;
      for (const [at, piece] of edits) {
        const i = at % (s.length + 1);
        s = s.slice(0, i) + piece + s.slice(i + 1);
      }
      return cut === null ? s : s.slice(0, cut % (s.length + 1));
    });
  return fc.oneof(fc.string({ maxLength: 300 }), fc.json({ maxDepth: 3 }), edited, edited);
}

/** Structured values: JSON-ish anything, or a valid object with one field replaced by anything. */
function objectsFrom(seeds: readonly Record<string, unknown>[], o: { json?: boolean } = {}): fc.Arbitrary<unknown> {
  const anything = o.json ? fc.jsonValue({ maxDepth: 2 }) : fc.anything({ maxDepth: 2, withBigInt: true, withTypedArray: true, withNullPrototype: true });
  const replaced = fc
    .record({ seed: fc.integer({ min: 0, max: seeds.length - 1 }), key: fc.nat(), value: anything, drop: fc.boolean() })
    .map(({ seed, key, value, drop }) => {
      const o = { ...seeds[seed]! };
      const keys = Object.keys(o);
      const k = keys[key % keys.length]!;
      if (drop) delete o[k];
      else o[k] = value;
      return o;
    });
  return fc.oneof(anything, replaced, replaced);
}

const bundle = (seed: number): TensorBundle =>
  makeBundle([
    { name: 'encoder.conv1.weight', dtype: 'F32', shape: [2, 1, 3], data: Float32Array.from({ length: 6 }, (_, i) => Math.sin(seed + i)) },
    { name: 'encoder.bn1.bias', dtype: 'F32', shape: [2], data: Float32Array.from([seed, -seed]) },
    { name: 'scalar', dtype: 'F32', shape: [], data: Float32Array.from([0.5]) },
  ]);

describe('decoders under arbitrary and mutated input', () => {
  it('protobuf messages of model transfers and the task stream decode or fail with an Error', () => {
    const svc = loadProto().Federation.service as grpc.ServiceDefinition;
    const upload = svc.UploadUpdate!;
    const download = svc.DownloadModel!;
    const task = svc.SubscribeTasks!;
    const data = Buffer.alloc(64 + MODEL_CHUNK_HEAD_ROOM, 3);
    const start = writeModelChunkHead(data, MODEL_CHUNK_HEAD_ROOM, 1024, 64);
    const chunk = Buffer.concat([data.subarray(start), modelChunkTail(4096, 'a'.repeat(64))]);
    const seeds = [
      chunk,
      upload.requestSerialize({ data: new Uint8Array(40).fill(9), offset: 2048 }),
      upload.requestSerialize({ header: { updateId: 'update-0001', round: 3, taskId: 'r3-site-a', baseModelHash: 'b'.repeat(64), totalSize: 100, sha256: '', numSamples: 4 } }),
      upload.requestSerialize({ trailer: { sha256: 'c'.repeat(64) } }),
      task.responseSerialize({ taskId: 'r1-site-a', kind: 'TRAIN', round: 1, modelHash: 'd'.repeat(64), modelSize: 10, deadlineUnixMs: 5, settingsJson: '{}', signature: Buffer.alloc(64) }),
    ];
    fc.assert(
      fc.property(bytesFrom(seeds), (bytes) => {
        const b = Buffer.from(bytes);
        decodesCleanly(() => upload.requestDeserialize(b), [Error]);
        decodesCleanly(() => download.responseDeserialize(b), [Error], (c) => {
          const d = (c as { data?: Buffer }).data;
          if (d) expect(d.length).toBeLessThanOrEqual(b.length);
        });
        decodesCleanly(() => parseWireTask(task.responseDeserialize(b)), [Error]);
      }),
      { numRuns: RUNS },
    );
  });

  it('safetensors: a valid decode covers its input exactly, anything else is a SafetensorsError', () => {
    const seeds = [encodeSafetensors(bundle(1)), encodeSafetensors(bundle(2), { note: 'x', 'medfl.encoding': '{"v":1}' }), encodeSafetensors(makeBundle([]))];
    fc.assert(
      fc.property(bytesFrom(seeds), fc.boolean(), (bytes, views) => {
        decodesCleanly(() => decodeSafetensors(bytes, { views }), [SafetensorsError], (d) => {
          let floats = 0;
          for (const t of d.bundle.values()) {
            expect(t.data.length).toBe(elementCount(t.shape));
            floats += t.data.length;
          }
          expect(floats * 4).toBeLessThanOrEqual(bytes.length);
        });
      }),
      { numRuns: RUNS },
    );
  });

  it('update codec (float32 / float16 / int8, weights or delta): decodes or fails with a SafetensorsError', () => {
    const b = bundle(3);
    const base = () => bundle(0);
    const seeds = [
      encodeUpdate(b, { update: 'float32', delta: false }),
      encodeUpdate(b, { update: 'float32', delta: true }, base),
      encodeUpdate(b, { update: 'float16', delta: false }),
      encodeUpdate(b, { update: 'int8', delta: true }, base),
      encodeUpdate(b, { update: 'int8', delta: false }),
    ];
    // Encoding metadata an attacker controls: JSON values that are not objects, inherited property names.
    const metas = ['null', '5', '"float16"', '[]', '{"v":1,"dtype":"toString","delta":false}', '{"v":1,"dtype":"int8","delta":false,"affine":null}', '{"v":1,"dtype":"int8","delta":false,"affine":{"scalar":"ab"}}'];
    // One int8 tensor under each: every one of these must be refused.
    const withMeta = metas.map((m) => {
      const header = Buffer.from(JSON.stringify({ __metadata__: { 'medfl.encoding': m }, scalar: { dtype: 'I8', shape: [], data_offsets: [0, 1] } }));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(header.length));
      return new Uint8Array(Buffer.concat([len, header, Buffer.from([5])]));
    });
    fc.assert(
      fc.property(bytesFrom([...seeds, ...withMeta]), fc.boolean(), (bytes, views) => {
        decodesCleanly(() => decodeUpdate(bytes, { views }), [SafetensorsError], (d) => {
          expect(['float32', 'float16', 'int8']).toContain(d.encoding.update);
          let floats = 0;
          for (const t of d.bundle.values()) floats += t.data.length;
          expect(floats).toBeLessThanOrEqual(bytes.length);
        });
      }),
      { numRuns: RUNS },
    );
    // The metadata seeds themselves, unmutated: each is refused (fast-check may not pick them all).
    for (const m of withMeta) expect(() => decodeUpdate(m)).toThrow(SafetensorsError);
  });

  it('task settings (JSON text) and wire tasks (decoded objects) parse or fail with ZodError / SyntaxError / BadTaskError', () => {
    const plan = defaultPlan();
    const shared = architectureFor(plan.model).params().filter((p) => p.part === 'encoder').map((p) => p.name);
    const settings = taskSettingsForPlan(plan, 'fed-1', shared.slice(0, 4));
    const seeds = [JSON.stringify(settings), JSON.stringify({ ...settings, compression: { update: 'int8', delta: true } })];
    fc.assert(
      fc.property(textFrom(seeds), (text) => {
        decodesCleanly(() => TaskSettingsSchema.parse(JSON.parse(text)), [SyntaxError, ZodError]);
      }),
      { numRuns: RUNS },
    );
    const wire = { taskId: 'r1-site-a', kind: 'TRAIN', round: 1, modelHash: 'e'.repeat(64), modelSize: 100, deadlineUnixMs: 0, settingsJson: seeds[0], signature: new Uint8Array(64) };
    fc.assert(
      fc.property(objectsFrom([wire]), (raw) => {
        decodesCleanly(() => parseWireTask(raw), [BadTaskError]);
      }),
      { numRuns: RUNS },
    );
  });

  it('NIfTI: a decoded volume never holds more voxels than its bytes, anything else is a NiftiError', () => {
    const dims: [number, number, number] = [4, 3, 2];
    const seeds = [
      encodeNifti({ data: Float32Array.from({ length: 24 }, (_, i) => i - 5), dims, spacing: [1, 2, 3] }),
      encodeNifti({ data: new Uint8Array(24).fill(1), dims, spacing: [1, 1, 1] }),
      encodeNifti({ data: new Int16Array(24).fill(-3), dims, spacing: [0.5, 0.5, 2], affine: [[-0.5, 0, 0, 10], [0, 0.5, 0, -4], [0, 0, 2, 1]] }),
    ];
    // Header fields that size or place the data (dim, datatype, bitpix, vox_offset, scaling), flipped more often.
    const hot = [0, 1, 40, 41, 42, 43, 44, 46, 48, 70, 72, 108, 109, 110, 111, 112, 116, 252, 254];
    const targeted = fc
      .record({ seed: fc.integer({ min: 0, max: seeds.length - 1 }), edits: fc.array(fc.tuple(fc.constantFrom(...hot), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }) })
      .map(({ seed, edits }) => {
        const b = Buffer.from(seeds[seed]!);
        for (const [at, v] of edits) b[at] = v;
        return new Uint8Array(b);
      });
    fc.assert(
      fc.property(fc.oneof(bytesFrom(seeds), targeted), fc.option(fc.integer({ min: -1, max: 3 })), (bytes, frame) => {
        decodesCleanly(() => decodeNifti(bytes, 'fuzz.nii', frame === null ? {} : { frame }), [NiftiError], (v) => {
          expect(v.data.length).toBe(v.dims[0] * v.dims[1] * v.dims[2]);
          expect(v.data.length).toBeLessThanOrEqual(bytes.length);
          expect(v.affine).toHaveLength(4);
        });
      }),
      { numRuns: RUNS },
    );
  });

  it('NIfTI, gzipped: inflating is bounded by the header, and any stream decodes or fails with a NiftiError', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-fuzz-nii-'));
    try {
      const raw = encodeNifti({ data: Float32Array.from({ length: 24 }, (_, i) => i), dims: [4, 3, 2], spacing: [1, 1, 1] });
      const seeds = [gzipSync(raw), gzipSync(Buffer.concat([raw, Buffer.alloc(200_000)])), Buffer.concat([gzipSync(raw), gzipSync(Buffer.alloc(1 << 20))])];
      let n = 0;
      await fc.assert(
        fc.asyncProperty(bytesFrom(seeds), async (bytes) => {
          const path = join(dir, `f${n++ % 4}.nii.gz`);
          writeFileSync(path, bytes);
          const t0 = performance.now();
          const v = await readNifti(path, { maxBytes: 1 << 20 }).catch((e: unknown) => {
            if (!(e instanceof NiftiError)) throw new Error(`threw ${(e as Error)?.constructor?.name}: ${(e as Error)?.stack ?? String(e)}`);
            return undefined;
          });
          expect(performance.now() - t0).toBeLessThan(MAX_CALL_MS);
          if (v) expect(v.data.length).toBe(v.dims[0] * v.dims[1] * v.dims[2]);
        }),
        { numRuns: 100 },
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('dataset.json: parses (and its labels give class names or a DatasetError) or fails with a DatasetError', () => {
    const msd = { name: 'Task01', modality: { 0: 'FLAIR', 1: 'T1w' }, labels: { 0: 'background', 1: 'tumour' }, numTraining: 2, training: [{ image: './imagesTr/a.nii.gz', label: './labelsTr/a.nii.gz' }], test: ['./imagesTs/b.nii.gz'] };
    const v2 = { channel_names: { 0: 'CT' }, labels: { background: 0, liver: 1, tumour: 2 }, numTraining: 1, file_ending: '.nii.gz' };
    fc.assert(
      fc.property(fc.oneof(textFrom([JSON.stringify(msd), JSON.stringify(v2)]), objectsFrom([msd, v2], { json: true }).map((o) => JSON.stringify(o))), (text) => {
        decodesCleanly(() => classNames(parseDatasetJson(text).labels), [DatasetError]);
      }),
      { numRuns: RUNS },
    );
  });

  it('.npy and PyTorch checkpoints (read from disk by model import / embed) decode or fail with an Error of their own', () => {
    const npy = [encodeNpy({ shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6]) }), encodeNpy({ shape: [], data: Float32Array.from([7]) })];
    fc.assert(
      fc.property(bytesFrom(npy), (bytes) => {
        decodesCleanly(() => decodeNpy(bytes, 'fuzz.npy'), [NpyError], (a) => {
          expect(a.data.length).toBe(elementCount(a.shape));
          expect(a.data.length * 4).toBeLessThanOrEqual(bytes.length);
        });
      }),
      { numRuns: RUNS },
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2048 }), (bytes) => {
        decodesCleanly(() => readCheckpoint(bytes, 'fuzz.pth'), [Error]);
      }),
      { numRuns: 100 },
    );
  });
});
