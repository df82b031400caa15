/**
 * PyTorch → MedFL layout mapping: permutations checked numerically against PyTorch's own conv,
 * transposed conv and linear outputs (test/fixtures/pth/expected.json), the one-error-lists-all
 * behaviour, MedicalNet naming, and `medfl model import` end to end on a MedicalNet-shaped ResNet-10.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatImportResult, parseArch, runImport } from '../../cli/model-import.ts';
import { readTorchCheckpoint, type TorchTensor } from '../../shared/checkpoints/pth.ts';
import {
  CheckpointMappingError,
  mapMedicalNet,
  mapStateDict,
  medicalNetIsConvTranspose,
  medicalNetRename,
  permute,
  torchToTfjsPermutation,
} from '../../shared/checkpoints/torch-mapping.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { decodeNpy } from '../../shared/io/npy.ts';
import { createMed3d, med3dFromTorch } from '../../shared/model/med3d.ts';
import { med3dPredict } from '../../shared/model/med3d-forward.ts';
import type { LayerType, ModelPart, ParamInfo } from '../../shared/model/types.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';

const DIR = join(import.meta.dirname, '..', 'fixtures', 'pth');
const MED3D_DIR = join(import.meta.dirname, '..', 'fixtures', 'med3d');
const TINY = join(DIR, 'medicalnet_tiny.pth');

interface Arr {
  shape: number[];
  values: number[];
}
const expected = JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8')) as {
  medicalnet_tiny: Record<string, { dtype: string; shape: number[]; values: number[] }>;
  numerics: Record<'conv' | 'convTranspose' | 'linear', { key: string; x: Arr; y: Arr; stride?: number[] }>;
};

const p = (name: string, shape: number[], part: ModelPart, layerType: LayerType, trainable = true): ParamInfo => ({
  name,
  shape,
  dtype: 'F32',
  part,
  layerType,
  stage: part === 'head' ? 'head' : 'stem',
  trainable,
});
const bn = (prefix: string, c: number, part: ModelPart): ParamInfo[] => [
  p(`${prefix}.weight`, [c], part, 'norm'),
  p(`${prefix}.bias`, [c], part, 'norm'),
  p(`${prefix}.running_mean`, [c], part, 'norm', false),
  p(`${prefix}.running_var`, [c], part, 'norm', false),
];
/** The fixture's Tiny model (scripts/make_pth_fixtures.py) as MedFL would declare it: tfjs layouts. */
const TINY_PARAMS: readonly ParamInfo[] = [
  p('encoder.conv1.weight', [3, 3, 3, 2, 3], 'encoder', 'conv'), // Conv3d(2→3, k3)
  ...bn('encoder.bn1', 3, 'encoder'),
  p('encoder.layer1.0.conv1.weight', [1, 2, 3, 3, 4], 'encoder', 'conv'), // Conv3d(3→4, k(1,2,3))
  p('encoder.layer1.0.conv1.bias', [4], 'encoder', 'conv'),
  p('head.conv_seg.0.weight', [2, 3, 2, 2, 4], 'head', 'conv'), // ConvTranspose3d(4→2, k(2,3,2)): [kD,kH,kW,out,in]
  p('head.conv_seg.0.bias', [2], 'head', 'conv'),
  ...bn('head.conv_seg.1', 2, 'head'),
  p('head.conv_seg.3.weight', [1, 1, 1, 2, 5], 'head', 'conv'), // Conv3d(2→5, k1)
  p('head.fc.weight', [4, 3], 'head', 'dense'), // Linear(4→3): [in,out]
  p('head.fc.bias', [3], 'head', 'dense'),
];

let tf: typeof TfModule;
let torchTensors: Map<string, TorchTensor>;
let bundle: TensorBundle;
let tmp: string;

beforeAll(async () => {
  tf = (await selectEngine({ force: 'cpu' })).tf;
  torchTensors = readTorchCheckpoint(readFileSync(TINY), 'medicalnet_tiny.pth');
  bundle = mapMedicalNet(torchTensors, TINY_PARAMS);
  tmp = mkdtempSync(join(tmpdir(), 'medfl-import-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function ncdhwToNdhwc(a: Arr) {
  const t = tf.tensor(a.values, a.shape);
  const out = a.shape.length === 5 ? tf.transpose(t, [0, 2, 3, 4, 1]) : t;
  return out;
}
function maxAbsDiff(a: TfModule.Tensor, b: TfModule.Tensor): number {
  expect(a.shape).toEqual(b.shape);
  return tf.max(tf.abs(tf.sub(a, b))).dataSync()[0];
}
const weight = (name: string) => {
  const t = bundle.get(name)!;
  return tf.tensor(t.data, [...t.shape]);
};

describe('layout conversion', () => {
  it('maps every parameter, drops num_batches_tracked, converts float64/16/bf16 to float32', () => {
    expect([...bundle.keys()].sort()).toEqual(TINY_PARAMS.map((q) => q.name).sort());
    for (const q of TINY_PARAMS) expect(bundle.get(q.name)!.shape, q.name).toEqual(q.shape);
    expect([...bundle.get('encoder.bn1.running_var')!.data]).toEqual(expected.medicalnet_tiny['bn1.running_var'].values.map(Math.fround));
    expect([...bundle.get('head.conv_seg.1.running_mean')!.data]).toEqual(expected.medicalnet_tiny['conv_seg.1.running_mean'].values);
    expect([...bundle.get('head.conv_seg.1.running_var')!.data]).toEqual(expected.medicalnet_tiny['conv_seg.1.running_var'].values);
  });

  it('Conv3d [out,in,kD,kH,kW] → [kD,kH,kW,in,out], element by element', () => {
    const src = expected.medicalnet_tiny['conv1.weight']; // [3 out, 2 in, 3, 3, 3]
    const dst = bundle.get('encoder.conv1.weight')!.data;
    const [O, I, D, H, W] = src.shape;
    for (let o = 0; o < O; o++)
      for (let i = 0; i < I; i++)
        for (let d = 0; d < D; d++)
          for (let h = 0; h < H; h++)
            for (let w = 0; w < W; w++) {
              expect(dst[(((d * H + h) * W + w) * I + i) * O + o]).toBe(src.values[(((o * I + i) * D + d) * H + h) * W + w]);
            }
  });

  it('Conv3d: tf.conv3d with the mapped filter reproduces torch', () => {
    const n = expected.numerics.conv;
    const y = tf.add(tf.conv3d(ncdhwToNdhwc(n.x) as TfModule.Tensor5D, weight('encoder.layer1.0.conv1.weight') as TfModule.Tensor5D, 1, 'valid'), weight('encoder.layer1.0.conv1.bias'));
    expect(maxAbsDiff(y, ncdhwToNdhwc(n.y))).toBeLessThan(1e-5);
  });

  it('ConvTranspose3d [in,out,k…] → tf.conv3dTranspose [k…,out,in] reproduces torch (non-cubic kernel, stride 2)', () => {
    const n = expected.numerics.convTranspose;
    const x = ncdhwToNdhwc(n.x) as TfModule.Tensor5D;
    const want = ncdhwToNdhwc(n.y);
    const outShape = want.shape as [number, number, number, number, number];
    const y = tf.add(tf.conv3dTranspose(x, weight('head.conv_seg.0.weight') as TfModule.Tensor5D, outShape, 2, 'valid'), weight('head.conv_seg.0.bias'));
    expect(maxAbsDiff(y, want)).toBeLessThan(1e-5);
    // and the tempting wrong mapping (treating it like a Conv3d) does not
    const t = torchTensors.get('conv_seg.0.weight')!;
    const wrong = permute(t.data as Float32Array, t.shape, [2, 3, 4, 0, 1]);
    expect(() => tf.conv3dTranspose(x, tf.tensor5d(wrong.data, wrong.shape as [number, number, number, number, number]), outShape, 2, 'valid')).toThrow();
  });

  it('Linear [out,in] → [in,out]: x·W + b reproduces torch', () => {
    const n = expected.numerics.linear;
    const y = tf.add(tf.matMul(tf.tensor2d(n.x.values, n.x.shape as [number, number]), weight('head.fc.weight') as TfModule.Tensor2D), weight('head.fc.bias'));
    expect(maxAbsDiff(y, tf.tensor(n.y.values, n.y.shape))).toBeLessThan(1e-5);
  });

  it('permute agrees with a naive implementation; permutations by rank', () => {
    expect(torchToTfjsPermutation(5)).toEqual([2, 3, 4, 1, 0]);
    expect(torchToTfjsPermutation(4)).toEqual([2, 3, 1, 0]);
    expect(torchToTfjsPermutation(3)).toEqual([2, 1, 0]);
    expect(torchToTfjsPermutation(2)).toEqual([1, 0]);
    expect(torchToTfjsPermutation(1)).toEqual([0]);
    expect(torchToTfjsPermutation(0)).toEqual([]);
    const shape = [2, 3, 1, 4, 5];
    const data = Float32Array.from({ length: 120 }, (_, i) => i);
    for (const perm of [[2, 3, 4, 1, 0], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4], [1, 0, 3, 4, 2]]) {
      const out = permute(data, shape, perm);
      const inStr = [60, 20, 20, 5, 1];
      const naive: number[] = [];
      const os = perm.map((a) => shape[a]);
      for (let a = 0; a < os[0]; a++)
        for (let b = 0; b < os[1]; b++)
          for (let c = 0; c < os[2]; c++)
            for (let d = 0; d < os[3]; d++)
              for (let e = 0; e < os[4]; e++) {
                const idx = [a, b, c, d, e];
                naive.push(data[perm.reduce((s, ax, k) => s + idx[k] * inStr[ax], 0)]);
              }
      expect(out.shape).toEqual(os);
      expect([...out.data]).toEqual(naive);
    }
  });

  it('never aliases the reader’s arrays', () => {
    const b = mapMedicalNet(torchTensors, TINY_PARAMS);
    expect(b.get('head.fc.bias')!.data).not.toBe(torchTensors.get('fc.bias')!.data);
  });
});

describe('MedicalNet naming', () => {
  it('encoder./head. by prefix, num_batches_tracked dropped', () => {
    expect(medicalNetRename('conv1.weight')).toBe('encoder.conv1.weight');
    expect(medicalNetRename('layer2.0.downsample.1.running_var')).toBe('encoder.layer2.0.downsample.1.running_var');
    expect(medicalNetRename('conv_seg.0.weight')).toBe('head.conv_seg.0.weight');
    expect(medicalNetRename('fc.bias')).toBe('head.fc.bias');
    expect(medicalNetRename('bn1.num_batches_tracked')).toBeUndefined();
    expect(medicalNetRename('conv_segx.weight')).toBe('encoder.conv_segx.weight');
    expect(medicalNetIsConvTranspose('head.conv_seg.0.weight')).toBe(true);
    expect(medicalNetIsConvTranspose('head.conv_seg.3.weight')).toBe(false);
  });
});

describe('one error lists every problem', () => {
  it('missing + unexpected + mis-shaped + ambiguous + dtype + non-finite, together', () => {
    const t = new Map(torchTensors);
    t.delete('conv_seg.3.weight'); // → missing
    t.set('layer9.0.conv1.weight', t.get('conv1.weight')!); // → unexpected
    const nan = Float32Array.from(t.get('fc.bias')!.data as Float32Array);
    nan[1] = NaN;
    t.set('fc.bias', { ...t.get('fc.bias')!, data: nan }); // → non-finite
    t.set('layer1.0.conv1.bias', { dtype: 'int64', shape: [4], strides: [1], data: new BigInt64Array(4) }); // → dtype
    t.set('bn1.weight_alias', t.get('bn1.weight')!); // renamed onto bn1.weight below → ambiguous
    const params = TINY_PARAMS.map((q) => (q.name === 'encoder.conv1.weight' ? { ...q, shape: [3, 3, 3, 1, 3] } : q)); // → mis-shaped
    const rename = (k: string) => medicalNetRename(k === 'bn1.weight_alias' ? 'bn1.weight' : k);
    let err: CheckpointMappingError | undefined;
    try {
      mapStateDict(t, params, { rename, convTranspose: medicalNetIsConvTranspose });
    } catch (e) {
      err = e as CheckpointMappingError;
    }
    expect(err).toBeInstanceOf(CheckpointMappingError);
    const kinds = Object.fromEntries(['missing', 'unexpected', 'mis-shaped', 'ambiguous', 'dtype', 'non-finite'].map((k) => [k, err!.of(k as never).map((x) => x.name)]));
    expect(kinds).toEqual({
      missing: ['head.conv_seg.3.weight'],
      unexpected: ['encoder.layer9.0.conv1.weight'],
      'mis-shaped': ['encoder.conv1.weight'],
      ambiguous: ['encoder.bn1.weight'],
      dtype: ['encoder.layer1.0.conv1.bias'],
      'non-finite': ['head.fc.bias'],
    });
    const msg = err!.message;
    expect(msg).toMatch(/^checkpoint does not match the model: 6 problems/);
    expect(msg).toContain('"head.conv_seg.3.weight" [1,1,1,2,5]');
    expect(msg).toContain('"layer9.0.conv1.weight" (as "encoder.layer9.0.conv1.weight") float32 [3,2,3,3,3]');
    expect(msg).toContain('checkpoint [3,2,3,3,3] Conv3d [out,in,kD,kH,kW] → [3,3,3,2,3], model expects [3,3,3,1,3] (= PyTorch [3,1,3,3,3])');
    expect(msg).toContain('"encoder.bn1.weight" ← "bn1.weight", "bn1.weight_alias"');
    expect(msg).toContain('int64 tensor for a float32 parameter');
    expect(msg).toContain('1 of 3 values are NaN/Inf, first NaN at flat index 1');
  });

  it('a prefix mismatch (what MedicalNet’s loader silently ignores) lists everything and says why', () => {
    const kept = readTorchCheckpoint(readFileSync(TINY), 'x', { stripModulePrefix: false });
    let err: CheckpointMappingError | undefined;
    try {
      mapMedicalNet(kept, TINY_PARAMS);
    } catch (e) {
      err = e as CheckpointMappingError;
    }
    expect(err!.of('missing')).toHaveLength(TINY_PARAMS.length);
    expect(err!.of('unexpected')).toHaveLength(16); // 18 keys − 2 num_batches_tracked
    expect(err!.message).toContain('hint: no checkpoint key matched any model parameter');
    expect(err!.message).toContain('"module.conv1.weight"');
  });

  it('float64 values beyond float32 range are reported as non-finite, with the reason', () => {
    const t = new Map(torchTensors);
    t.set('bn1.running_var', { dtype: 'float64', shape: [3], strides: [1], data: Float64Array.from([1, 1e300, 1]) });
    expect(() => mapMedicalNet(t, TINY_PARAMS)).toThrow(/float64 in the file; values beyond float32 range become Inf/);
  });
});

describe('medfl model import', () => {
  it('writes MedFL names/layouts with arch, shortcut, width and the source sha256 in the metadata', async () => {
    const out = join(tmp, 'tiny.safetensors');
    const r = await runImport({ checkpoint: TINY, arch: 'resnet10', shortcut: 'B', out, expected: TINY_PARAMS });
    expect(r.parts).toBe('all');
    expect(r.sourceFormat).toBe('torch-zip');
    expect([...r.ignored].sort()).toEqual(['bn1.num_batches_tracked', 'conv_seg.1.num_batches_tracked']);
    const { bundle: written, metadata } = decodeSafetensors(readFileSync(out));
    expect(metadata.sourceSha256).toBe(sha256Hex(readFileSync(TINY)));
    expect(metadata).toMatchObject({ arch: 'resnet10', shortcut: 'B', widthMultiplier: '1', parts: 'all', source: 'medicalnet_tiny.pth', sourceContainer: 'state_dict', architecture: 'med3d', format: 'medfl' });
    for (const [k, v] of bundle) expect(written.get(k)!.data, k).toEqual(v.data);
    expect(formatImportResult(r)).toContain('"module." prefix stripped');
  });

  it('parses --arch spellings', () => {
    expect(parseArch('resnet18')).toBe(18);
    expect(parseArch('R50')).toBe(50);
    expect(parseArch('101')).toBe(101);
    expect(() => parseArch('resnet152')).toThrow(/--arch must be one of resnet10, resnet18, resnet34, resnet50, resnet101/);
  });

  describe('on a MedicalNet-shaped ResNet-10-A checkpoint (test/fixtures/med3d/r10-A.pth)', () => {
    const ckpt = join(MED3D_DIR, 'r10-A.pth');
    const opts = { checkpoint: ckpt, arch: 'resnet10', shortcut: 'A', widthMultiplier: 0.0625 } as const;

    it('imports encoder + head, identical to med3d.ts’s own conversion, and the forward pass matches PyTorch', async () => {
      const out = join(tmp, 'r10a.safetensors');
      const r = await runImport({ ...opts, out, patch: [34, 40, 44] });
      expect(r.parts).toBe('all');
      expect(r.strippedPrefix).toBe('module.');
      const { bundle: mine } = decodeSafetensors(readFileSync(out));
      const arch = createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [34, 40, 44] });
      const ref = decodeSafetensors(readFileSync(join(MED3D_DIR, 'r10-A.safetensors'))).bundle;
      const theirs = med3dFromTorch(arch, [...ref.values()]);
      expect([...mine.keys()]).toEqual([...theirs.keys()]);
      for (const [k, v] of theirs) expect(mine.get(k)!.data, k).toEqual(v.data);

      const input = decodeNpy(readFileSync(join(MED3D_DIR, 'input.npy')));
      const want = decodeNpy(readFileSync(join(MED3D_DIR, 'r10-A.seg.npy')));
      const x = tf.transpose(tf.tensor5d(input.data as Float32Array, [...input.shape] as [number, number, number, number, number]), [0, 2, 3, 4, 1]);
      const y = med3dPredict(tf, arch, mine, x);
      const ref5 = tf.transpose(tf.tensor(want.data as Float32Array, [...want.shape]), [0, 2, 3, 4, 1]);
      const scale = tf.max(tf.abs(ref5)).dataSync()[0];
      expect(maxAbsDiff(y, ref5) / scale).toBeLessThan(1e-4);
    });

    it('encoder only on request: head keys are skipped and listed', async () => {
      const r = await runImport({ ...opts, out: join(tmp, 'enc.safetensors'), parts: 'encoder' });
      expect(r.parts).toBe('encoder');
      expect(r.ignored.some((k) => k.startsWith('conv_seg.'))).toBe(true);
      const { bundle: b, metadata } = decodeSafetensors(readFileSync(join(tmp, 'enc.safetensors')));
      expect([...b.keys()].every((k) => k.startsWith('encoder.'))).toBe(true);
      expect(metadata.parts).toBe('encoder');
    });

    it('the wrong shortcut type, width or class count fails with every problem and a hint', async () => {
      await expect(runImport({ ...opts, shortcut: 'B', out: join(tmp, 'x.safetensors') })).rejects.toThrow(
        /ResNet-10-B.*missing: the model needs these.*encoder\.layer2\.0\.downsample\.0\.weight.*encoder\.layer4\.0\.downsample\.1\.running_var.*hint: only downsample \(shortcut\) weights are missing: the checkpoint looks like shortcut type A/s,
      );
      await expect(runImport({ ...opts, widthMultiplier: 0.125, out: join(tmp, 'x.safetensors') })).rejects.toThrow(
        /mis-shaped \(\d+\):.*"encoder\.conv1\.weight" \(checkpoint "conv1\.weight"\): checkpoint \[4,1,7,7,7\] Conv3d \[out,in,kD,kH,kW\] → \[7,7,7,1,4\], model expects \[7,7,7,1,8\]/s,
      );
      await expect(runImport({ ...opts, numClasses: 3, out: join(tmp, 'x.safetensors') })).rejects.toThrow(/"head\.conv_seg\.6\.weight".*model expects \[1,1,1,2,3\]/s);
    });
  });
});
