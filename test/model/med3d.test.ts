import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runEmbed } from '../../cli/model-embed.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { decodeNpy, encodeNpy, NpyError } from '../../shared/io/npy.ts';
import {
  createMed3d,
  inferMed3dOptions,
  med3dCounts,
  med3dFeatureShape,
  med3dFromTorch,
  med3dMetadata,
  med3dOptionsFromMetadata,
  med3dOutputShape,
  med3dToTorch,
  permute,
  type Med3dArchitecture,
  type Med3dDepth,
  type Med3dOptions,
  type Med3dShortcut,
} from '../../shared/model/med3d.ts';
import { createMed3dEvalOps, med3dEmbed, med3dPredict, type Med3dOps } from '../../shared/model/med3d-forward.ts';
import { checkAgainstSpecs, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { dimsFromShape, writeNifti } from '../../site-agent/data/nifti.ts';

type Tf = typeof TfModule;
type Tensor5D = TfModule.Tensor5D;

const FIXTURES = join(import.meta.dirname, '..', 'fixtures', 'med3d');
let tf: Tf;

beforeAll(async () => {
  // The parity numbers are for the pure-JS cpu backend (the reference engine available everywhere).
  tf = (await selectEngine({ force: 'cpu' })).tf;
});

const seg2 = { kind: 'segmentation', numClasses: 2 } as const;

describe('Med3D layout', () => {
  // MedicalNet's published sizes: "params" = PyTorch model.parameters() (conv weights, BN γ/β; no running statistics),
  // "entries" = state_dict keys including num_batches_tracked (one per BN layer; MedFL stores none).
  const published: [Med3dDepth, Med3dShortcut, number, number][] = [
    [10, 'B', 14_355_520, 72],
    [18, 'A', 32_986_176, 102],
    [34, 'A', 63_295_808, 198],
    [50, 'B', 46_155_072, 318],
    [101, 'B', 85_201_216, 624],
  ];
  for (const [depth, shortcut, params, entries] of published) {
    it(`R${depth}-${shortcut} at full width matches MedicalNet's encoder size (${params} params, ${entries} entries)`, () => {
      const arch = createMed3d({ depth, shortcut, head: seg2, patch: [56, 448, 448] });
      const c = med3dCounts(arch, 'encoder');
      expect(c.trainable).toBe(params);
      expect(c.torchEntries).toBe(entries);
      // Running mean + var add 2 values per BN channel on top of the trainable parameters.
      const bnChannels = arch.params().filter((p) => p.part === 'encoder' && p.name.endsWith('.running_mean')).reduce((a, p) => a + p.shape[0], 0);
      expect(c.all).toBe(params + 2 * bnChannels);
    });
  }

  it('names, layouts and groups follow the PyTorch state_dict', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', head: { kind: 'segmentation', numClasses: 3 }, patch: [56, 448, 448] });
    const byName = new Map(arch.params().map((p) => [p.name, p]));
    expect(byName.get('encoder.conv1.weight')!.shape).toEqual([7, 7, 7, 1, 64]);
    expect(byName.get('encoder.conv1.weight')!.stage).toBe('stem');
    expect(byName.get('encoder.bn1.running_mean')!).toMatchObject({ layerType: 'norm', trainable: false, part: 'encoder', stage: 'stem' });
    expect(byName.get('encoder.bn1.weight')!).toMatchObject({ layerType: 'norm', trainable: true });
    expect(byName.get('encoder.layer2.0.downsample.0.weight')!).toMatchObject({ shape: [1, 1, 1, 64, 128], layerType: 'conv', stage: 'layer2' });
    expect(byName.get('encoder.layer2.0.downsample.1.running_var')!).toMatchObject({ shape: [128], layerType: 'norm', trainable: false });
    expect(byName.get('encoder.layer4.0.conv2.weight')!.shape).toEqual([3, 3, 3, 512, 512]);
    expect(byName.get('head.conv_seg.0.weight')!).toMatchObject({ shape: [2, 2, 2, 32, 512], part: 'head', stage: 'head', layerType: 'conv' });
    expect(byName.get('head.conv_seg.0.bias')!.shape).toEqual([32]);
    expect(byName.get('head.conv_seg.4.running_var')!.trainable).toBe(false);
    expect(byName.get('head.conv_seg.6.weight')!.shape).toEqual([1, 1, 1, 32, 3]);
    expect(byName.has('head.conv_seg.3.bias')).toBe(false);
    expect([...byName.keys()].some((n) => n.includes('num_batches_tracked'))).toBe(false);
    expect(arch.params().filter((p) => p.part === 'head').length).toBe(2 + 4 + 1 + 4 + 1);

    const cls = createMed3d({ depth: 50, shortcut: 'B', head: { kind: 'classification', numClasses: 4, dropout: 0.5 }, patch: [32, 64, 64] });
    const fc = cls.params().filter((p) => p.part === 'head');
    expect(fc.map((p) => [p.name, p.shape, p.layerType])).toEqual([
      ['head.fc.weight', [2048, 4], 'dense'],
      ['head.fc.bias', [4], 'dense'],
    ]);
    // Bottleneck: stride on conv2; layer1 projects 64 → 256 at stride 1.
    const b50 = new Map(cls.params().map((p) => [p.name, p.shape]));
    expect(b50.get('encoder.layer1.0.downsample.0.weight')).toEqual([1, 1, 1, 64, 256]);
    expect(b50.get('encoder.layer2.0.conv2.weight')).toEqual([3, 3, 3, 128, 128]);
    expect(b50.get('encoder.layer4.2.conv3.weight')).toEqual([1, 1, 1, 512, 2048]);
  });

  it('shortcut A has no projection parameters, B has one per stage entry that changes shape', () => {
    const ds = (s: Med3dShortcut, depth: Med3dDepth) =>
      createMed3d({ depth, shortcut: s, head: seg2, patch: [16, 16, 16] })
        .params()
        .filter((p) => p.name.includes('downsample'))
        .map((p) => p.name.split('.downsample')[0]);
    expect(ds('A', 18)).toEqual([]);
    expect(ds('A', 50)).toEqual([]);
    expect([...new Set(ds('B', 18))]).toEqual(['encoder.layer2.0', 'encoder.layer3.0', 'encoder.layer4.0']);
    expect([...new Set(ds('B', 50))]).toEqual(['encoder.layer1.0', 'encoder.layer2.0', 'encoder.layer3.0', 'encoder.layer4.0']);
    const a = createMed3d({ depth: 34, shortcut: 'A', head: seg2, patch: [16, 16, 16] });
    expect(a.config.blocks.filter((b) => b.downsample === 'A').map((b) => b.prefix)).toEqual(['encoder.layer2.0', 'encoder.layer3.0', 'encoder.layer4.0']);
  });

  it('width multiplier scales every stage and the head', () => {
    const a = createMed3d({ depth: 18, shortcut: 'A', widthMultiplier: 0.25, head: seg2, patch: [16, 16, 16] });
    expect(a.config.basePlanes).toBe(16);
    expect(a.config.featureChannels).toBe(128);
    expect(a.config.head).toEqual({ kind: 'segmentation', numClasses: 2, channels: 8 });
    const tiny = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.01, head: seg2, patch: [8, 8, 8] });
    expect(tiny.config.basePlanes).toBe(1);
    expect(tiny.config.head.kind === 'segmentation' && tiny.config.head.channels).toBe(1);
    expect(() => createMed3d({ depth: 12 as Med3dDepth, shortcut: 'A', head: seg2, patch: [8, 8, 8] })).toThrow(/depth/);
    expect(() => createMed3d({ depth: 10, shortcut: 'C' as Med3dShortcut, head: seg2, patch: [8, 8, 8] })).toThrow(/shortcut/);
    expect(() => createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 0, head: seg2, patch: [8, 8, 8] })).toThrow(/widthMultiplier/);
  });

  it('computes MedicalNet\'s feature shapes for its 56×448×448 input', () => {
    for (const [depth, e] of [[18, 1], [50, 4]] as const) {
      const arch = createMed3d({ depth, shortcut: 'B', head: { kind: 'segmentation', numClasses: 2 }, patch: [56, 448, 448] });
      expect(med3dFeatureShape(arch.config, [56, 448, 448])).toEqual([7, 56, 56, 512 * e]);
      expect(med3dOutputShape(arch.config, [56, 448, 448])).toEqual([14, 112, 112, 2]);
    }
    const cls = createMed3d({ depth: 10, shortcut: 'A', head: { kind: 'classification', numClasses: 5 }, patch: [14, 28, 28] });
    expect(med3dFeatureShape(cls.config, [14, 28, 28])).toEqual([2, 4, 4, 512]);
    expect(med3dOutputShape(cls.config, [14, 28, 28])).toEqual([5]);
  });

  it('init is deterministic in the seed, with MedicalNet initial values', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.25, head: seg2, patch: [16, 16, 16] });
    const a = arch.init(3);
    const b = arch.init(3);
    const c = arch.init(4);
    expect(checkAgainstSpecs(a, arch.params())).toBeUndefined();
    for (const [name, t] of a) expect(Buffer.from(t.data.buffer).equals(Buffer.from(b.get(name)!.data.buffer))).toBe(true);
    expect(a.get('encoder.conv1.weight')!.data).not.toEqual(c.get('encoder.conv1.weight')!.data);
    expect([...a.get('encoder.bn1.weight')!.data].every((v) => v === 1)).toBe(true);
    expect([...a.get('encoder.bn1.bias')!.data].every((v) => v === 0)).toBe(true);
    expect([...a.get('encoder.layer3.0.downsample.1.running_mean')!.data].every((v) => v === 0)).toBe(true);
    expect([...a.get('head.conv_seg.4.running_var')!.data].every((v) => v === 1)).toBe(true);
    // Kaiming normal, fan_out: std √(2/(out·k³)); layer4.0.conv2 has 27·128·128 samples.
    const w = a.get('encoder.layer4.0.conv2.weight')!.data;
    const std = Math.sqrt(w.reduce((s, v) => s + v * v, 0) / w.length);
    expect(std / Math.sqrt(2 / (27 * 128))).toBeCloseTo(1, 1);
    // ConvTranspose3d keeps PyTorch's default: uniform ±1/√(out·k³).
    const ct = a.get('head.conv_seg.0.weight')!.data;
    const bound = 1 / Math.sqrt(8 * 8);
    expect(Math.max(...ct.map(Math.abs))).toBeLessThanOrEqual(bound);
    expect(Math.max(...ct.map(Math.abs))).toBeGreaterThan(0.9 * bound);
  });
});

// -------------------------------------------------------------------------------------------------

interface Fixture {
  arch: Med3dArchitecture;
  weights: TensorBundle;
  torch: TensorBundle;
  metadata: Record<string, string>;
}

function loadFixture(name: string, inputShape: [number, number, number]): Fixture {
  const { bundle, metadata } = decodeSafetensors(readFileSync(join(FIXTURES, `${name}.safetensors`)));
  const o = med3dOptionsFromMetadata(metadata)!;
  const arch = createMed3d({ ...(o as Med3dOptions), head: o.head ?? seg2, patch: inputShape });
  const weights = med3dFromTorch(arch, bundle.values(), { encoderOnly: !o.head });
  return { arch, weights, torch: bundle, metadata };
}

function readNpyFile(name: string) {
  return decodeNpy(readFileSync(join(FIXTURES, name)), name);
}

interface ErrStats {
  /** max|a − b| / max|b|: the acceptance measure. */
  maxRel: number;
  maxAbs: number;
  meanAbs: number;
  refMaxAbs: number;
  /** Largest |a − b| / (|b| + 1e-3·max|b|) over elements. */
  maxElemRel: number;
}

function errStats(got: ArrayLike<number>, ref: ArrayLike<number>): ErrStats {
  expect(got.length).toBe(ref.length);
  let maxAbs = 0;
  let sum = 0;
  let refMaxAbs = 0;
  for (let i = 0; i < ref.length; i++) refMaxAbs = Math.max(refMaxAbs, Math.abs(ref[i]));
  let maxElemRel = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(got[i] - ref[i]);
    maxAbs = Math.max(maxAbs, d);
    sum += d;
    maxElemRel = Math.max(maxElemRel, d / (Math.abs(ref[i]) + 1e-3 * refMaxAbs));
  }
  return { maxRel: maxAbs / refMaxAbs, maxAbs, meanAbs: sum / ref.length, refMaxAbs, maxElemRel };
}

const fmt = (s: ErrStats) =>
  `max rel ${s.maxRel.toExponential(2)}, max abs ${s.maxAbs.toExponential(2)}, mean abs ${s.meanAbs.toExponential(2)}, ` +
  `max elementwise rel ${s.maxElemRel.toExponential(2)} (|ref| max ${s.refMaxAbs.toFixed(2)})`;

/** PyTorch NCDHW → NDHWC. */
function toNdhwc(a: { shape: readonly number[]; data: Float32Array }): Float32Array {
  return permute(a.data, a.shape, [0, 2, 3, 4, 1]).data;
}

describe('Med3D forward matches PyTorch 1.13 (test/fixtures/med3d)', () => {
  let input: Tensor5D;
  let inputShape: [number, number, number];
  beforeAll(() => {
    const x = readNpyFile('input.npy');
    expect(x.shape).toEqual([1, 1, 34, 40, 44]);
    inputShape = [x.shape[2], x.shape[3], x.shape[4]];
    // NCDHW with C = 1 has the same memory order as NDHWC.
    input = tf.tensor(x.data, [1, ...inputShape, 1]) as Tensor5D;
  });
  afterAll(() => input?.dispose());

  const cases: [string, boolean][] = [
    ['r10-A', true],
    ['r10-B', true],
    ['r50-B', false],
  ];
  for (const [name, withHead] of cases) {
    it(`${name}: layer4${withHead ? ' and conv_seg' : ''} within 1e-4 relative`, () => {
      const fx = loadFixture(name, inputShape);
      const feats = med3dEmbed(tf, fx.arch, fx.weights, input);
      const refFeats = readNpyFile(`${name}.layer4.npy`);
      expect(feats.shape).toEqual([1, ...med3dFeatureShape(fx.arch.config, inputShape)]);
      expect(feats.shape).toEqual([refFeats.shape[0], ...refFeats.shape.slice(2), refFeats.shape[1]]);
      const s = errStats(feats.dataSync(), toNdhwc(refFeats));
      feats.dispose();
      console.log(`${name} layer4 ${fmt(s)}`);
      expect(s.maxRel).toBeLessThanOrEqual(1e-4);
      if (withHead) {
        const logits = med3dPredict(tf, fx.arch, fx.weights, input);
        const refSeg = readNpyFile(`${name}.seg.npy`);
        expect(logits.shape).toEqual([1, ...med3dOutputShape(fx.arch.config, inputShape)]);
        const h = errStats(logits.dataSync(), toNdhwc(refSeg));
        logits.dispose();
        console.log(`${name} conv_seg ${fmt(h)}`);
        expect(h.maxRel).toBeLessThanOrEqual(1e-4);
      }
    });
  }

  it("tfjs 'same' padding would not match (the padding trap is real on these sizes)", () => {
    const fx = loadFixture('r10-B', inputShape);
    const base = createMed3dEvalOps(tf);
    const sameOps: Med3dOps = {
      ...base,
      conv3d: (x, w, o) => (o.pad ? tf.conv3d(x, w as Tensor5D, o.stride ?? 1, 'same', 'NDHWC', o.dilation ?? 1) : base.conv3d(x, w, o)),
    };
    const feats = med3dEmbed(tf, fx.arch, fx.weights, input, sameOps);
    const s = errStats(feats.dataSync(), toNdhwc(readNpyFile('r10-B.layer4.npy')));
    feats.dispose();
    expect(s.maxRel).toBeGreaterThan(1e-2);
  });

  it('PyTorch <-> MedFL conversion round-trips and refuses mismatches loudly', () => {
    const fx = loadFixture('r10-B', inputShape);
    const back = new Map(med3dToTorch(fx.weights).map((t) => [t.name, t]));
    for (const [name, t] of fx.torch) {
      expect(back.get(name)!.shape).toEqual(t.shape);
      expect(Buffer.from(back.get(name)!.data.buffer).equals(Buffer.from(t.data.buffer))).toBe(true);
    }
    // "module." prefixes and num_batches_tracked are accepted (as in MedicalNet's checkpoints).
    const prefixed = [...fx.torch.values()].map((t) => ({ ...t, name: `module.${t.name}` }));
    prefixed.push({ name: 'module.bn1.num_batches_tracked', dtype: 'F32', shape: [], data: new Float32Array([5]) });
    expect(checkAgainstSpecs(med3dFromTorch(fx.arch, prefixed), fx.arch.params())).toBeUndefined();
    // A B checkpoint into an A model, and an A checkpoint into a B model, both fail.
    const a = loadFixture('r10-A', inputShape);
    expect(() => med3dFromTorch(a.arch, fx.torch.values())).toThrow(/unexpected[\s\S]*downsample/);
    expect(() => med3dFromTorch(fx.arch, a.torch.values())).toThrow(/missing[\s\S]*downsample/);
    const wrongWidth = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.125, head: seg2, patch: inputShape });
    expect(() => med3dFromTorch(wrongWidth, fx.torch.values())).toThrow(/mis-shaped/);
    // And the MedFL forward refuses a B bundle for an A model instead of ignoring the projections.
    expect(() => med3dEmbed(tf, a.arch, fx.weights, input)).toThrow(/unknown tensor/);
  });

  it('reads the architecture back from the tensors and from metadata', () => {
    for (const name of ['r10-A', 'r10-B', 'r50-B']) {
      const fx = loadFixture(name, inputShape);
      const fromMeta = med3dOptionsFromMetadata(fx.metadata)!;
      const inferred = inferMed3dOptions(fx.weights.values());
      expect(inferred.depth).toBe(fromMeta.depth);
      expect(inferred.shortcut).toBe(fromMeta.shortcut);
      expect(inferred.widthMultiplier).toBe(fromMeta.widthMultiplier);
      const meta = med3dMetadata(fx.arch);
      const again = med3dOptionsFromMetadata(meta)!;
      expect(again).toMatchObject({ depth: fx.arch.config.depth, shortcut: fx.arch.config.shortcut, widthMultiplier: fx.arch.config.widthMultiplier, head: fx.arch.config.head });
    }
    expect(() => med3dOptionsFromMetadata({ architecture: 'tiny3d' })).toThrow(/tiny3d/);
  });
});

describe('Med3D forward at small widths', () => {
  it('gives the expected shapes for R18-A, R34-A and R50-B on a non-cubic input', () => {
    for (const [depth, shortcut] of [[18, 'A'], [34, 'A'], [50, 'B']] as const) {
      const arch = createMed3d({ depth, shortcut, widthMultiplier: 1 / 32, head: seg2, patch: [16, 24, 32] });
      const w = arch.init(1);
      const x = tf.randomNormal([2, 16, 24, 32, 1], 0, 1, 'float32', 1) as Tensor5D;
      const f = med3dEmbed(tf, arch, w, x);
      const y = med3dPredict(tf, arch, w, x);
      expect(f.shape).toEqual([2, 2, 3, 4, 2 * 8 * (depth >= 50 ? 4 : 1)]);
      expect(y.shape).toEqual([2, 4, 6, 8, 2]);
      expect([...y.dataSync()].every(Number.isFinite)).toBe(true);
      tf.dispose([x, f, y]);
    }
  });

  it('classification head = global average pool + dense (dropout only in training)', () => {
    const arch = createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 1 / 16, head: { kind: 'classification', numClasses: 3, dropout: 0.5 }, patch: [16, 16, 16] });
    const w = arch.init(2);
    const x = tf.randomNormal([2, 16, 16, 16, 1], 0, 1, 'float32', 2) as Tensor5D;
    const f = med3dEmbed(tf, arch, w, x);
    const y = med3dPredict(tf, arch, w, x);
    expect(y.shape).toEqual([2, 3]);
    const [n, d, h, ww, c] = f.shape;
    const fv = f.dataSync();
    const fcW = w.get('head.fc.weight')!.data;
    const fcB = w.get('head.fc.bias')!.data;
    const yv = y.dataSync();
    for (let b = 0; b < n; b++) {
      const pooled = new Float64Array(c);
      const vox = d * h * ww;
      for (let v = 0; v < vox; v++) for (let k = 0; k < c; k++) pooled[k] += fv[(b * vox + v) * c + k] / vox;
      for (let j = 0; j < 3; j++) {
        let s = fcB[j];
        for (let k = 0; k < c; k++) s += pooled[k] * fcW[k * 3 + j];
        expect(yv[b * 3 + j]).toBeCloseTo(s, 4);
      }
    }
    tf.dispose([x, f, y]);
  });
});

// -------------------------------------------------------------------------------------------------

function npyBytes(dict: string, data: Uint8Array, major = 1): Uint8Array {
  const prefix = major === 1 ? 10 : 12;
  const total = Math.ceil((prefix + dict.length + 1) / 64) * 64;
  const header = dict.padEnd(total - prefix - 1, ' ') + '\n';
  const out = Buffer.alloc(total + data.length);
  Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, major, 0]).copy(out);
  if (major === 1) out.writeUInt16LE(header.length, 8);
  else out.writeUInt32LE(header.length, 8);
  out.write(header, prefix, 'latin1');
  out.set(data, total);
  return out;
}

describe('npy', () => {
  it('round-trips float32 arrays of any rank', () => {
    for (const shape of [[], [5], [2, 3], [1, 2, 3, 4, 1], [0, 3]]) {
      const n = shape.reduce((a, v) => a * v, 1);
      const data = Float32Array.from({ length: n }, (_, i) => i * 0.5 - 3);
      const buf = encodeNpy({ shape, data });
      expect(buf.length % 64).toBe((n * 4) % 64);
      const back = decodeNpy(buf);
      expect(back.shape).toEqual(shape);
      expect([...back.data]).toEqual([...data]);
    }
    expect(encodeNpy({ shape: [3], data: new Float32Array(3) }).toString('latin1', 10, 64)).toContain("'shape': (3,)");
  });

  it('reads what NumPy wrote (fixtures) and version 2.0 headers', () => {
    const x = readNpyFile('input.npy');
    expect(x.shape).toEqual([1, 1, 34, 40, 44]);
    const v2 = decodeNpy(npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", new Uint8Array(new Float32Array([1.5, -2]).buffer), 2));
    expect([...v2.data]).toEqual([1.5, -2]);
  });

  it('refuses other dtypes, Fortran order and damaged files with a clear reason', () => {
    const f8 = npyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", new Uint8Array(16));
    expect(() => decodeNpy(f8, 'a.npy')).toThrow(NpyError);
    expect(() => decodeNpy(f8, 'a.npy')).toThrow(/a\.npy: dtype '<f8' is not supported.*float32/);
    expect(() => decodeNpy(npyBytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", new Uint8Array(8)))).toThrow(/'>f4'/);
    expect(() => decodeNpy(npyBytes("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", new Uint8Array(8)))).toThrow(/'<i8'/);
    expect(() => decodeNpy(npyBytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", new Uint8Array(16)))).toThrow(/fortran_order/);
    const ok = encodeNpy({ shape: [4], data: new Float32Array(4) });
    expect(() => decodeNpy(ok.subarray(0, ok.length - 1))).toThrow(/truncated/);
    expect(() => decodeNpy(Buffer.from('PK\x03\x04 not numpy'))).toThrow(/magic/);
  });
});

describe('medfl model embed (runEmbed)', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'medfl-embed-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('embeds a .npy and a NIfTI volume with a PyTorch-layout and a MedFL-layout model file', async () => {
    const x = readNpyFile('input.npy');
    const [, , D, H, W] = x.shape;
    const ref = toNdhwc(readNpyFile('r10-B.layer4.npy'));
    // D×H×W .npy, PyTorch state_dict safetensors with metadata.
    writeFileSync(join(dir, 'vol.npy'), encodeNpy({ shape: [D, H, W], data: x.data }));
    const r1 = await runEmbed({ model: join(FIXTURES, 'r10-B.safetensors'), input: join(dir, 'vol.npy'), out: join(dir, 'f1.npy'), engine: 'cpu' });
    expect(r1.outputShape).toEqual([1, 5, 5, 6, 32]);
    const f1 = decodeNpy(readFileSync(join(dir, 'f1.npy')));
    expect(f1.shape).toEqual([1, 5, 5, 6, 32]);
    expect(errStats(f1.data, ref).maxRel).toBeLessThanOrEqual(1e-4);

    // MedFL-layout file without metadata (architecture inferred from the tensors), NIfTI input [X,Y,Z] = [W,H,D].
    const fx = loadFixture('r10-B', [D, H, W]);
    writeFileSync(join(dir, 'model.safetensors'), encodeSafetensors(fx.weights));
    await writeNifti(join(dir, 'vol.nii.gz'), { dims: dimsFromShape([D, H, W]), spacing: [1, 1, 1], data: x.data });
    const r2 = await runEmbed({ model: join(dir, 'model.safetensors'), input: join(dir, 'vol.nii.gz'), out: join(dir, 'f2.npy'), engine: 'cpu' });
    expect(r2.inputShape).toEqual([1, D, H, W, 1]);
    expect(errStats(decodeNpy(readFileSync(join(dir, 'f2.npy'))).data, ref).maxRel).toBeLessThanOrEqual(1e-4);

    // Flags override the file; a wrong override fails loudly.
    await expect(
      runEmbed({ model: join(FIXTURES, 'r10-B.safetensors'), input: join(dir, 'vol.npy'), out: join(dir, 'f3.npy'), shortcut: 'A', engine: 'cpu' }),
    ).rejects.toThrow(/downsample/);
    await expect(runEmbed({ model: join(FIXTURES, 'r10-B.safetensors'), input: join(dir, 'vol.npy'), out: join(dir, 'f3.npy'), arch: 'resnet12' })).rejects.toThrow(/--arch/);
    // Encoder-only PyTorch file of another depth, with its head dropped: R50 from the tensors.
    const r50 = await runEmbed({ model: join(FIXTURES, 'r50-B.safetensors'), input: join(dir, 'vol.npy'), out: join(dir, 'f4.npy'), arch: 'resnet50', engine: 'cpu' });
    expect(r50.architecture).toMatch(/ResNet-50-B/);
  });
});
