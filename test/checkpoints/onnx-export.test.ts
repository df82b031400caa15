/**
 * `medfl model export --format onnx`: the written graph runs in onnxruntime-node (the ONNX Runtime CPU build in
 * the npm package) and gives MedFL's own forward (the trainer's eval graph on the selected convolution kernels)
 * within 1e-4 relative — R10-B and R18-A at full width with MedicalNet's segmentation head, the encoder alone,
 * and the other graph parts (U-Net head, classification head, group norm, 4 input channels) at small width.
 */
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runExport } from '../../cli/model-export.ts';
import { onnxModelType } from '../../shared/checkpoints/onnx-write.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { act } from '../../shared/model/graph/tape.ts';
import { createMed3d, med3dMetadata, type Med3dArchitecture, type Med3dOptions } from '../../shared/model/med3d.ts';
import { med3dEncoderForward, med3dForward } from '../../shared/model/med3d-forward.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { weightsWithDrawnNorms } from '../helpers/drawn-norm-weights.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

let dir: string;
let kernels: ConvKernels;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-onnx-'));
  kernels = (await selectConvKernels()).kernels;
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));


/** MedFL's eval forward (NDHWC in, NDHWC or [N, K] out). */
function medflForward(arch: Med3dArchitecture, w: TensorBundle, x: Float32Array, shape: number[], withHead: boolean): { data: Float32Array; shape: readonly number[] } {
  const store: ParamStore = { value: (n) => w.get(n)!.data, shape: (n) => w.get(n)!.shape, grad: () => undefined };
  const ops = createMed3dTrainOps({ kernels, store, training: false });
  const params = new Map(arch.params().map((p) => [p.name, p.name]));
  const input = act(x, shape, false);
  const out = withHead ? med3dForward(arch, params, input, ops) : med3dEncoderForward(arch, params, input, ops);
  return { data: out.data, shape: out.shape };
}

/** NDHWC → NCDHW (what ONNX gives), rank 2 passed through. */
function toChannelsFirst(data: Float32Array, shape: readonly number[]): Float32Array {
  if (shape.length !== 5) return data;
  const [n, d, h, w, c] = shape;
  const out = new Float32Array(data.length);
  const v = d * h * w;
  for (let b = 0; b < n; b++) for (let i = 0; i < v; i++) for (let k = 0; k < c; k++) out[(b * c + k) * v + i] = data[(b * v + i) * c + k];
  return out;
}

function relError(got: Float32Array, want: Float32Array): number {
  let m = 0;
  let ref = 0;
  for (let i = 0; i < want.length; i++) {
    m = Math.max(m, Math.abs(got[i] - want[i]));
    ref = Math.max(ref, Math.abs(want[i]));
  }
  return m / ref;
}

async function roundTrip(name: string, o: Med3dOptions, size: number, withHead: boolean): Promise<{ err: number; outName: string; dims: readonly number[] }> {
  const arch = createMed3d(o);
  const w = weightsWithDrawnNorms(arch, 7);
  const model = join(dir, `${name}.safetensors`);
  const bundle = withHead ? w : makeBundle([...w.values()].filter((t) => t.name.startsWith('encoder.')));
  writeFileSync(model, encodeSafetensors(bundle, med3dMetadata(arch)));
  const out = join(dir, `${name}.onnx`);
  const r = await runExport({ model, format: 'onnx', out });
  expect(r.format).toBe('onnx');
  expect(r.head).toBe(withHead ? o.head.kind : 'none');
  expect(statSync(out).size).toBe(r.bytes);

  const C = arch.config.inChannels;
  const rng = mulberry32(3);
  const nd = Float32Array.from({ length: 2 * size ** 3 * C }, () => gaussian(rng));
  const want = medflForward(arch, w, nd, [2, size, size, size, C], withHead);
  const session = await ort.InferenceSession.create(out);
  try {
    const nc = toChannelsFirst(nd, [2, size, size, size, C]);
    const outName = session.outputNames[0];
    const res = await session.run({ input: new ort.Tensor('float32', nc, [2, C, size, size, size]) });
    const got = res[outName];
    return { err: relError(got.data as Float32Array, toChannelsFirst(want.data, want.shape)), outName, dims: got.dims };
  } finally {
    await session.release();
  }
}

describe('medfl model export --format onnx (onnxruntime-node against MedFL forward)', () => {
  it('R10-B full width with MedicalNet segmentation head: logits within 1e-4 relative', async () => {
    const r = await roundTrip('r10b', { depth: 10, shortcut: 'B', widthMultiplier: 1, head: { kind: 'segmentation', numClasses: 3 }, patch: [32, 32, 32] }, 32, true);
    expect(r.outName).toBe('logits');
    expect(r.dims).toEqual([2, 3, 8, 8, 8]);
    expect(r.err).toBeLessThan(1e-4);
  }, 240_000);

  it('R18-A full width (shortcut A: subsample + zero channels) with segmentation head: within 1e-4 relative', async () => {
    const r = await roundTrip('r18a', { depth: 18, shortcut: 'A', widthMultiplier: 1, head: { kind: 'segmentation', numClasses: 2 }, patch: [32, 32, 32] }, 32, true);
    expect(r.dims).toEqual([2, 2, 8, 8, 8]);
    expect(r.err).toBeLessThan(1e-4);
  }, 240_000);

  it('encoder only: layer4 features', async () => {
    const r = await roundTrip('r18a-enc', { depth: 18, shortcut: 'A', widthMultiplier: 0.25, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] }, 16, false);
    expect(r.outName).toBe('features');
    expect(r.dims).toEqual([2, 128, 2, 2, 2]);
    expect(r.err).toBeLessThan(1e-4);
  }, 120_000);

  it('U-Net head with group norm, 4 input channels; classification head with instance norm; R50 bottlenecks', async () => {
    const unet = await roundTrip('unet-gn', { depth: 10, shortcut: 'B', widthMultiplier: 0.125, head: { kind: 'unet', numClasses: 3 }, patch: [16, 16, 16], norm: 'group', normGroups: 4, inChannels: 4 }, 16, true);
    expect(unet.dims).toEqual([2, 3, 16, 16, 16]);
    expect(unet.err).toBeLessThan(1e-4);
    const cls = await roundTrip('cls-in', { depth: 18, shortcut: 'A', widthMultiplier: 0.125, head: { kind: 'classification', numClasses: 4 }, patch: [16, 16, 16], norm: 'instance' }, 16, true);
    expect(cls.dims).toEqual([2, 4]);
    expect(cls.err).toBeLessThan(1e-4);
    const r50 = await roundTrip('r50', { depth: 50, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] }, 16, true);
    expect(r50.err).toBeLessThan(1e-4);
  }, 240_000);

  it('the file is a plain ONNX ModelProto: opset 17, named input and output, weights as initializers in PyTorch layout', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] });
    const w = weightsWithDrawnNorms(arch, 1);
    const model = join(dir, 'plain.safetensors');
    writeFileSync(model, encodeSafetensors(w, med3dMetadata(arch)));
    const out = join(dir, 'plain.onnx');
    await runExport({ model, format: 'onnx', out });
    const { readFileSync } = await import('node:fs');
    const m = onnxModelType().toObject(onnxModelType().decode(readFileSync(out)), { longs: Number }) as {
      ir_version: number;
      opset_import: { version: number }[];
      graph: { input: { name: string }[]; output: { name: string }[]; initializer: { name: string; dims: number[] }[]; node: { op_type: string }[] };
    };
    expect(m.ir_version).toBe(8);
    expect(m.opset_import[0].version).toBe(17);
    expect(m.graph.input.map((i) => i.name)).toEqual(['input']);
    expect(m.graph.output.map((i) => i.name)).toEqual(['logits']);
    expect(m.graph.initializer.find((i) => i.name === 'conv1.weight')!.dims).toEqual([4, 1, 7, 7, 7]);
    expect(m.graph.initializer.find((i) => i.name === 'conv_seg.0.weight')!.dims).toEqual([32, 2, 2, 2, 2]);
    expect(new Set(m.graph.node.map((n) => n.op_type))).toEqual(new Set(['Conv', 'BatchNormalization', 'Relu', 'MaxPool', 'Add', 'ConvTranspose']));
  });
});
