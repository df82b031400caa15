/**
 * Transfer initialisation strategies (shared/model/transfer-init.ts, docs/transfer-init.md): each strategy is
 * tested for what it promises. Inflation is checked against 2D responses computed by PyTorch
 * (test/fixtures/inflate, scripts/make_inflation_fixtures.py) and by tfjs conv2d on the original RGB kernels.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { readCheckpoint } from '../../shared/checkpoints/pth.ts';
import { CheckpointMappingError } from '../../shared/checkpoints/torch-mapping.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { decodeNpy } from '../../shared/io/npy.ts';
import { createMed3d, med3dFromTorch, permute, type Med3dArchitecture } from '../../shared/model/med3d.ts';
import { createMed3dEvalOps, type Med3dOps } from '../../shared/model/med3d-forward.ts';
import { createTiny3d } from '../../shared/model/tiny3d.ts';
import {
  encoderStages,
  initStrategyFromSpec,
  InitSpecError,
  parseInitSpec,
  partialStages,
  source2dFromTorch,
  summarizeInitReport,
  type InitResult,
} from '../../shared/model/transfer-init.ts';
import { makeBundle, type NamedTensor, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { batchNorm } from '../../shared/model/layers/batch-norm.ts';

type Tf = typeof TfModule;
type Tensor = TfModule.Tensor;
type Tensor4D = TfModule.Tensor4D;
type Tensor5D = TfModule.Tensor5D;

const MED3D_FIX = join(import.meta.dirname, '..', 'fixtures', 'med3d');
const INFLATE_FIX = join(import.meta.dirname, '..', 'fixtures', 'inflate');

const head2 = { kind: 'segmentation', numClasses: 2, channels: 2 } as const;
const r10 = (shortcut: 'A' | 'B', widthMultiplier = 0.0625): Med3dArchitecture =>
  createMed3d({ depth: 10, shortcut, widthMultiplier, head: head2, patch: [16, 16, 16] });

/** The r10-B PyTorch fixture as a MedFL bundle (encoder and head: the head shows up as "ignored"). */
function loadPretrained(arch: Med3dArchitecture): TensorBundle {
  const st = decodeSafetensors(readFileSync(join(MED3D_FIX, 'r10-B.safetensors'))).bundle;
  return med3dFromTorch(arch, [...st.values()]);
}

function load2d(): TensorBundle {
  const bytes = readFileSync(join(INFLATE_FIX, 'resnet10_2d.safetensors'));
  return source2dFromTorch(readCheckpoint(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), 'resnet10_2d').tensors);
}

function stats(d: Float32Array): { mean: number; std: number } {
  let s = 0;
  for (const v of d) s += v;
  const mean = s / d.length;
  let q = 0;
  for (const v of d) q += (v - mean) ** 2;
  return { mean, std: Math.sqrt(q / d.length) };
}

function correlation(a: Float32Array, b: Float32Array): number {
  const sa = stats(a);
  const sb = stats(b);
  let c = 0;
  for (let i = 0; i < a.length; i++) c += (a[i] - sa.mean) * (b[i] - sb.mean);
  return c / a.length / (sa.std * sb.std);
}

const same = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((v, i) => Object.is(v, b[i]));
const get = (b: TensorBundle, n: string) => {
  const t = b.get(n);
  if (!t) throw new Error(`no ${n}`);
  return t.data;
};

/** Checks shared by every strategy: all params present with the right shapes; copied/reinitialised partition them. */
function checkResult(arch: Med3dArchitecture | ReturnType<typeof createTiny3d>, r: InitResult): void {
  const names = arch.params().map((p) => p.name);
  expect(r.weights.size).toBe(names.length);
  for (const p of arch.params()) expect(r.weights.get(p.name)?.shape).toEqual([...p.shape]);
  expect([...r.report.copied, ...r.report.reinitialised].sort()).toEqual([...names].sort());
  expect(new Set(r.report.copied).size + new Set(r.report.reinitialised).size).toBe(names.length);
  for (const t of r.weights.values()) expect(t.data.every((v) => Number.isFinite(v))).toBe(true);
}

describe('init spec strings', () => {
  it('parses every documented form and round-trips the name', () => {
    for (const s of ['scratch', 'pretrained', 'mean-var', 'partial:0', 'partial:2', 'inflate-2d:1xk', 'inflate-2d:i3d']) {
      expect(initStrategyFromSpec(s).name).toBe(s);
    }
    expect(parseInitSpec(' partial:3 ')).toEqual({ kind: 'partial', stages: 3 });
    expect(initStrategyFromSpec('inflate-2d:i3d').needs).toBe('source2d');
    expect(initStrategyFromSpec('mean-var').needs).toBe('pretrained');
  });
  it('rejects unknown or incomplete forms with a clear error', () => {
    for (const s of ['Scratch', 'partial', 'partial:-1', 'partial:x', 'inflate-2d', 'inflate-2d:3x3', 'meanvar', '']) {
      expect(() => parseInitSpec(s)).toThrow(InitSpecError);
    }
    expect(() => parseInitSpec('bogus')).toThrow(/expected one of scratch, pretrained, partial:<k>, mean-var/);
  });
  it('orders Med3D stages stem, layer1..layer4; partial:k = stem + layer1..layerk', () => {
    const arch = r10('B');
    expect(encoderStages(arch)).toEqual(['stem', 'layer1', 'layer2', 'layer3', 'layer4']);
    expect(partialStages(arch, 0)).toEqual(['stem']);
    expect(partialStages(arch, 2)).toEqual(['stem', 'layer1', 'layer2']);
    expect(() => partialStages(arch, 5)).toThrow(/k must be 0\.\.4/);
    // tiny3d: stem, down, mid.
    expect(partialStages(createTiny3d({ patch: [8, 8, 8] }), 1)).toEqual(['stem', 'down']);
  });
});

describe('scratch', () => {
  const arch = r10('B');
  const scratch = initStrategyFromSpec('scratch');

  it('is arch.init(seed): deterministic in the seed, different across seeds', () => {
    const a = scratch.init(arch, { seed: 5 });
    const b = scratch.init(arch, { seed: 5 });
    const c = scratch.init(arch, { seed: 6 });
    checkResult(arch, a);
    const ref = arch.init(5);
    for (const [n, t] of a.weights) {
      expect(same(t.data, b.weights.get(n)!.data)).toBe(true);
      expect(same(t.data, get(ref, n))).toBe(true);
    }
    expect(same(get(a.weights, 'encoder.layer4.0.conv2.weight'), get(c.weights, 'encoder.layer4.0.conv2.weight'))).toBe(false);
    expect(a.report.copied).toEqual([]);
    expect(a.report.reinitialised.length).toBe(arch.params().length);
  });

  it('draws conv weights Kaiming-normal fan_out (std √(2/(out·k³))) and sets BN to identity', () => {
    const { weights } = scratch.init(arch, { seed: 11 });
    let checked = 0;
    for (const p of arch.params()) {
      const d = get(weights, p.name);
      if (p.part === 'encoder' && p.layerType === 'conv' && d.length >= 1000) {
        const [k, , , , out] = p.shape;
        const expected = Math.sqrt(2 / (out * k * k * k));
        const s = stats(d);
        expect(Math.abs(s.std / expected - 1)).toBeLessThan(5 / Math.sqrt(2 * d.length));
        expect(Math.abs(s.mean)).toBeLessThan((5 * expected) / Math.sqrt(d.length));
        checked++;
      }
      if (p.layerType === 'norm') {
        const v = p.name.endsWith('.weight') || p.name.endsWith('.running_var') ? 1 : 0;
        expect(d.every((x) => x === v)).toBe(true);
      }
    }
    expect(checked).toBeGreaterThanOrEqual(5);
  });
});

describe('pretrained', () => {
  const arch = r10('B');
  const pretrained = loadPretrained(arch);

  it('copies the encoder exactly (no aliasing) and initialises the head as scratch; the pretrained head is ignored', () => {
    const r = initStrategyFromSpec('pretrained').init(arch, { seed: 3, pretrained });
    checkResult(arch, r);
    const scratch = arch.init(3);
    for (const p of arch.params()) {
      const d = get(r.weights, p.name);
      if (p.part === 'encoder') {
        expect(same(d, get(pretrained, p.name))).toBe(true);
        expect(d).not.toBe(get(pretrained, p.name));
      } else {
        expect(same(d, get(scratch, p.name))).toBe(true);
      }
    }
    expect(r.report.copied).toEqual(arch.params().filter((p) => p.part === 'encoder').map((p) => p.name));
    expect(r.report.reinitialised).toEqual(arch.params().filter((p) => p.part === 'head').map((p) => p.name));
    expect(r.report.ignored).toEqual([...pretrained.keys()].filter((n) => n.startsWith('head.')).sort());
    expect(r.report.copiedStages).toEqual(['stem', 'layer1', 'layer2', 'layer3', 'layer4']);
    expect(summarizeInitReport(r.report)).toMatch(/^pretrained: \d+ copied/);
  });

  it('throws ONE error listing every missing, mis-shaped, unexpected and non-finite tensor', () => {
    const broken = new Map<string, NamedTensor>(pretrained);
    broken.delete('encoder.layer2.0.conv1.weight');
    broken.delete('encoder.bn1.running_var');
    const c1 = broken.get('encoder.conv1.weight')!;
    broken.set('encoder.conv1.weight', { ...c1, shape: [7, 7, 7, 1, 8], data: new Float32Array(7 * 7 * 7 * 8) });
    broken.set('encoder.layer5.0.conv1.weight', { name: 'encoder.layer5.0.conv1.weight', dtype: 'F32', shape: [2], data: new Float32Array(2) });
    const nan = Float32Array.from(get(pretrained, 'encoder.layer3.0.bn2.weight'));
    nan[1] = Number.NaN;
    broken.set('encoder.layer3.0.bn2.weight', { ...broken.get('encoder.layer3.0.bn2.weight')!, data: nan });
    let err: unknown;
    try {
      initStrategyFromSpec('pretrained').init(arch, { seed: 1, pretrained: makeBundle(broken.values()) });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CheckpointMappingError);
    const e = err as CheckpointMappingError;
    expect(e.problems.length).toBe(5);
    expect(e.of('missing').map((p) => p.name).sort()).toEqual(['encoder.bn1.running_var', 'encoder.layer2.0.conv1.weight']);
    expect(e.of('mis-shaped').map((p) => p.name)).toEqual(['encoder.conv1.weight']);
    expect(e.of('unexpected').map((p) => p.name)).toEqual(['encoder.layer5.0.conv1.weight']);
    expect(e.of('non-finite').map((p) => p.name)).toEqual(['encoder.layer3.0.bn2.weight']);
    for (const n of ['layer2.0.conv1.weight', 'bn1.running_var', 'conv1.weight', '[7,7,7,1,8]', 'layer5', 'layer3.0.bn2.weight']) expect(e.message).toContain(n);
  });

  it('says how to convert when given PyTorch names, and needs ctx.pretrained', () => {
    const st = decodeSafetensors(readFileSync(join(MED3D_FIX, 'r10-B.safetensors'))).bundle;
    expect(() => initStrategyFromSpec('pretrained').init(arch, { seed: 1, pretrained: st })).toThrow(/med3dFromTorch/);
    expect(() => initStrategyFromSpec('pretrained').init(arch, { seed: 1 })).toThrow(/needs pretrained weights/);
    // Shortcut mismatch gets the shortcut hint.
    expect(() => initStrategyFromSpec('pretrained').init(r10('A'), { seed: 1, pretrained })).toThrow(/shortcut type B/);
  });
});

describe('partial:k', () => {
  const arch = r10('B');
  const pretrained = loadPretrained(arch);
  const stages = ['stem', 'layer1', 'layer2', 'layer3', 'layer4'];

  for (const k of [0, 1, 2, 3, 4]) {
    it(`partial:${k} copies exactly ${stages.slice(0, k + 1).join(' + ')}; the rest is scratch`, () => {
      const r = initStrategyFromSpec(`partial:${k}`).init(arch, { seed: 9, pretrained });
      checkResult(arch, r);
      const copiedStages = stages.slice(0, k + 1);
      expect(r.report.copiedStages).toEqual(copiedStages);
      const expected = arch.params().filter((p) => p.part === 'encoder' && copiedStages.includes(p.stage)).map((p) => p.name);
      expect(r.report.copied).toEqual(expected);
      const scratch = arch.init(9);
      for (const p of arch.params()) {
        const d = get(r.weights, p.name);
        if (expected.includes(p.name)) {
          expect(same(d, get(pretrained, p.name))).toBe(true);
        } else {
          // Re-initialised: exactly the scratch tensor, and not the pretrained one.
          expect(same(d, get(scratch, p.name))).toBe(true);
          if (p.part === 'encoder') expect(same(d, get(pretrained, p.name))).toBe(false);
        }
      }
    });
  }

  it('re-initialised convs are distributed like scratch (Kaiming fan_out), unrelated to the pretrained ones', () => {
    const r = initStrategyFromSpec('partial:2').init(arch, { seed: 21, pretrained });
    for (const n of ['encoder.layer3.0.conv2.weight', 'encoder.layer4.0.conv1.weight', 'encoder.layer4.0.conv2.weight']) {
      const d = get(r.weights, n);
      const out = r.weights.get(n)!.shape[4];
      const s = stats(d);
      expect(Math.abs(s.std / Math.sqrt(2 / (out * 27)) - 1)).toBeLessThan(5 / Math.sqrt(2 * d.length));
      expect(Math.abs(correlation(d, get(pretrained, n)))).toBeLessThan(0.1);
    }
    for (const n of ['encoder.layer3.0.bn1.weight', 'encoder.layer4.0.downsample.1.running_var']) expect(get(r.weights, n).every((v) => v === 1)).toBe(true);
  });

  it('partial:4 equals pretrained; partial:5 is refused', () => {
    const a = initStrategyFromSpec('partial:4').init(arch, { seed: 2, pretrained });
    const b = initStrategyFromSpec('pretrained').init(arch, { seed: 2, pretrained });
    for (const [n, t] of a.weights) expect(same(t.data, get(b.weights, n))).toBe(true);
    expect(() => initStrategyFromSpec('partial:5').init(arch, { seed: 2, pretrained })).toThrow(/k must be 0\.\.4/);
  });
});

describe('mean-var (Transfusion)', () => {
  const arch = r10('B');
  // A pretrained bundle whose layers have distinct, non-zero means and scales (the fixture's weights are
  // zero-mean Kaiming draws; shift and scale each conv tensor so that a wrong μ or σ would show).
  const base = loadPretrained(arch);
  const convNames = arch.params().filter((p) => p.part === 'encoder' && p.layerType === 'conv').map((p) => p.name);
  const pretrained = makeBundle(
    [...base.values()].map((t) => {
      const i = convNames.indexOf(t.name);
      if (i < 0) return t;
      const s = stats(t.data);
      const mu = (i % 2 === 0 ? 1 : -1) * 0.01 * (i + 1);
      const sigma = 0.02 + 0.015 * i;
      return { ...t, data: t.data.map((v) => mu + (sigma * (v - s.mean)) / s.std) };
    }),
  );

  it('draws each conv tensor i.i.d. from N(μ, σ²) of the pretrained tensor, uncorrelated with it', () => {
    const r = initStrategyFromSpec('mean-var').init(arch, { seed: 4, pretrained });
    checkResult(arch, r);
    expect(r.report.copied).toEqual([]);
    expect(r.report.resampled).toEqual(convNames);
    let correlated = 0;
    for (const n of convNames) {
      const src = get(pretrained, n);
      const d = get(r.weights, n);
      const s0 = stats(src);
      const s1 = stats(d);
      expect(r.report.sourceStats[n].mean).toBeCloseTo(s0.mean, 6);
      expect(r.report.sourceStats[n].std).toBeCloseTo(s0.std, 6);
      expect(Math.abs(s1.mean - s0.mean)).toBeLessThan((5 * s0.std) / Math.sqrt(d.length));
      expect(Math.abs(s1.std / s0.std - 1)).toBeLessThan(5 / Math.sqrt(2 * d.length));
      if (d.length >= 1000) {
        expect(Math.abs(correlation(d, src))).toBeLessThan(0.1);
        correlated++;
      }
    }
    expect(correlated).toBeGreaterThanOrEqual(5);
  });

  it('resets every encoder BatchNorm to identity and initialises the head as scratch', () => {
    const r = initStrategyFromSpec('mean-var').init(arch, { seed: 4, pretrained });
    const scratch = arch.init(4);
    const norms = arch.params().filter((p) => p.part === 'encoder' && p.layerType === 'norm');
    expect(r.report.reset).toEqual(norms.map((p) => p.name));
    for (const p of norms) {
      const v = p.name.endsWith('.weight') || p.name.endsWith('.running_var') ? 1 : 0;
      expect(get(r.weights, p.name).every((x) => x === v)).toBe(true);
    }
    // The pretrained BN was not identity, so this is a real reset.
    expect(get(pretrained, 'encoder.bn1.running_var').some((x) => x !== 1)).toBe(true);
    for (const p of arch.params().filter((q) => q.part === 'head')) expect(same(get(r.weights, p.name), get(scratch, p.name))).toBe(true);
  });

  it('is deterministic in the seed and validates the pretrained bundle', () => {
    const n = 'encoder.layer4.0.conv2.weight';
    const a = initStrategyFromSpec('mean-var').init(arch, { seed: 8, pretrained });
    const b = initStrategyFromSpec('mean-var').init(arch, { seed: 8, pretrained });
    const c = initStrategyFromSpec('mean-var').init(arch, { seed: 9, pretrained });
    expect(same(get(a.weights, n), get(b.weights, n))).toBe(true);
    expect(same(get(a.weights, n), get(c.weights, n))).toBe(false);
    const missing = makeBundle([...pretrained.values()].filter((t) => t.name !== n));
    expect(() => initStrategyFromSpec('mean-var').init(arch, { seed: 8, pretrained: missing })).toThrow(CheckpointMappingError);
  });
});

// -------------------------------------------------------------------------------------------------
// 2D → 3D inflation

describe('inflate-2d: mapping', () => {
  const source = load2d();

  it('maps every tensor of a shortcut-B R10 from the torchvision-layout 2D ResNet; fc is ignored', () => {
    const arch = r10('B');
    for (const mode of ['1xk', 'i3d'] as const) {
      const r = initStrategyFromSpec(`inflate-2d:${mode}`).init(arch, { seed: 1, source2d: source });
      checkResult(arch, r);
      expect(r.report.copied).toEqual(arch.params().filter((p) => p.part === 'encoder').map((p) => p.name));
      expect(r.report.inflated).toEqual(arch.params().filter((p) => p.part === 'encoder' && p.layerType === 'conv').map((p) => p.name));
      expect(r.report.ignored).toEqual(['fc.bias', 'fc.weight']);
      expect(r.report.notes.join('\n')).toMatch(/RGB → grey/);
      // BN copied verbatim.
      for (const p of arch.params().filter((q) => q.part === 'encoder' && q.layerType === 'norm')) {
        expect(same(get(r.weights, p.name), get(source, p.name.slice('encoder.'.length)))).toBe(true);
      }
    }
  });

  it('builds the kernels as documented: i3d = repeat/kD, 1xk = centre slice; conv1 sums R, G, B', () => {
    const arch = r10('B');
    const i3d = initStrategyFromSpec('inflate-2d:i3d').init(arch, { seed: 1, source2d: source }).weights;
    const oneK = initStrategyFromSpec('inflate-2d:1xk').init(arch, { seed: 1, source2d: source }).weights;
    for (const [name, kD] of [
      ['conv1.weight', 7],
      ['layer3.0.conv2.weight', 3],
      ['layer2.0.downsample.0.weight', 1],
    ] as const) {
      const t = source.get(name)!;
      const hwio = permute(t.data, t.shape, [2, 3, 1, 0]).data; // [kH,kW,I,O]
      const [o, i, kh, kw] = t.shape;
      const cin = name === 'conv1.weight' ? 1 : i;
      const plane = new Float32Array(kh * kw * cin * o);
      for (let y = 0; y < kh * kw; y++) for (let c = 0; c < i; c++) for (let q = 0; q < o; q++) plane[(y * cin + (cin === 1 ? 0 : c)) * o + q] += hwio[(y * i + c) * o + q];
      const a = get(i3d, `encoder.${name}`);
      const b = get(oneK, `encoder.${name}`);
      expect(a.length).toBe(kD * plane.length);
      for (let d = 0; d < kD; d++) {
        const sa = a.subarray(d * plane.length, (d + 1) * plane.length);
        const sb = b.subarray(d * plane.length, (d + 1) * plane.length);
        for (let j = 0; j < plane.length; j++) expect(sa[j]).toBeCloseTo(plane[j] / kD, 6);
        if (d === (kD - 1) / 2) expect(same(sb, plane)).toBe(true);
        else expect(sb.every((v) => v === 0)).toBe(true);
      }
    }
  });

  it('re-initialises and lists what has no 2D counterpart (R18 second blocks); shortcut A ignores the 2D projections', () => {
    const r18 = createMed3d({ depth: 18, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16] });
    const r = initStrategyFromSpec('inflate-2d:i3d').init(r18, { seed: 7, source2d: source });
    checkResult(r18, r);
    const second = r18.params().filter((p) => /^encoder\.layer\d\.1\./.test(p.name)).map((p) => p.name);
    const head = r18.params().filter((p) => p.part === 'head').map((p) => p.name);
    expect(r.report.reinitialised).toEqual([...second, ...head]);
    const scratch = r18.init(7);
    for (const n of second) expect(same(get(r.weights, n), get(scratch, n))).toBe(true);
    expect(r.report.notes.join('\n')).toContain('encoder.layer4.1.conv2.weight');

    const a = initStrategyFromSpec('inflate-2d:1xk').init(r10('A'), { seed: 7, source2d: source });
    expect(a.report.ignored).toEqual([...source.keys()].filter((k) => k.includes('downsample') || k.startsWith('fc.')).sort());
    expect(a.report.reinitialised.every((n) => n.startsWith('head.'))).toBe(true);
  });

  it('refuses a width mismatch with one error listing all mis-shaped tensors and the width to use', () => {
    let err: unknown;
    try {
      initStrategyFromSpec('inflate-2d:i3d').init(r10('B', 0.125), { seed: 1, source2d: source });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CheckpointMappingError);
    const e = err as CheckpointMappingError;
    expect(e.of('mis-shaped').length).toBe(r10('B', 0.125).params().filter((p) => p.part === 'encoder').length);
    expect(e.message).toMatch(/2D network has 4 base planes, the model 8.*widthMultiplier = 4\/64 = 0\.0625/);
    expect(() => initStrategyFromSpec('inflate-2d:i3d').init(r10('B'), { seed: 1 })).toThrow(/needs a 2D source/);
    // A 3D bundle is not a 2D source; neither is one with foreign names.
    const renamed = makeBundle([...source.values()].map((t) => ({ ...t, name: `backbone.${t.name}` })));
    expect(() => initStrategyFromSpec('inflate-2d:i3d').init(r10('B'), { seed: 1, source2d: renamed })).toThrow(/no 2D checkpoint tensor matches/);
  });

  it('accepts the safetensors bundle directly and a DataParallel "module." prefix', () => {
    const direct = decodeSafetensors(readFileSync(join(INFLATE_FIX, 'resnet10_2d.safetensors'))).bundle;
    const prefixed = makeBundle([...direct.values()].map((t) => ({ ...t, name: `module.${t.name}` })));
    const a = initStrategyFromSpec('inflate-2d:i3d').init(r10('B'), { seed: 1, source2d: source }).weights;
    for (const s of [direct, prefixed]) {
      const b = initStrategyFromSpec('inflate-2d:i3d').init(r10('B'), { seed: 1, source2d: s }).weights;
      for (const [n, t] of a) expect(same(t.data, get(b, n))).toBe(true);
    }
  });
});

describe('inflate-2d: responses (tfjs cpu vs PyTorch 2D)', () => {
  let tf: Tf;
  let ops: Med3dOps;
  const source = load2d();
  const arch = r10('B');
  const npy = (f: string) => decodeNpy(readFileSync(join(INFLATE_FIX, f)), f);
  const image = npy('image.npy'); // [1,1,H,W]
  const [, , H, W] = image.shape;

  beforeAll(async () => {
    tf = (await selectEngine({ force: 'cpu' })).tf;
    ops = createMed3dEvalOps(tf);
  });

  /** PyTorch NCHW [1,C,h,w] → [h,w,C] values. */
  const nchwToHwc = (a: { shape: readonly number[]; data: Float32Array }) => permute(a.data, a.shape.slice(1), [1, 2, 0]);

  function relErr(got: Float32Array, want: Float32Array): number {
    let m = 0;
    let ref = 0;
    for (let i = 0; i < want.length; i++) {
      m = Math.max(m, Math.abs(got[i] - want[i]));
      ref = Math.max(ref, Math.abs(want[i]));
    }
    return m / ref;
  }

  function params(weights: TensorBundle): (n: string) => Tensor {
    return (n) => {
      const t = weights.get(`encoder.${n}`)!;
      return tf.tensor(t.data, [...t.shape]);
    };
  }

  const bn = (get: (n: string) => Tensor, x: Tensor5D, p: string) =>
    ops.norm(x, batchNorm, (s) => get(`${p}.${s}`), undefined, false);

  /** Med3D conv1, stem (conv1+bn1+relu) and layer1 (maxpool + basic block, identity shortcut) in NDHWC. */
  function stemAndLayer1(weights: TensorBundle, vol: Tensor5D): { conv1: Tensor5D; stem: Tensor5D; layer1: Tensor5D } {
    const get = params(weights);
    const conv1 = ops.conv3d(vol, get('conv1.weight'), { stride: 2, pad: 3 });
    const stem = ops.relu(bn(get, conv1, 'bn1'));
    const x = ops.maxPool(stem);
    let y = ops.relu(bn(get, ops.conv3d(x, get('layer1.0.conv1.weight'), { pad: 1 }), 'layer1.0.bn1'));
    y = bn(get, ops.conv3d(y, get('layer1.0.conv2.weight'), { pad: 1 }), 'layer1.0.bn2');
    return { conv1, stem, layer1: ops.relu(ops.add(y, x)) };
  }

  /** D copies of the fixture image: [1, D, H, W, 1]. */
  const identicalSlices = (d: number) => tf.tile(tf.tensor(image.data, [1, 1, H, W, 1]), [1, d, 1, 1, 1]) as Tensor5D;

  /** Output slice z of an NDHWC tensor as [h, w, C] values. */
  const slice = (t: Tensor5D, z: number) => t.slice([0, z, 0, 0, 0], [1, 1, -1, -1, -1]).dataSync() as Float32Array;

  it('i3d: on identical slices, conv1, conv1+BN+ReLU and layer1 give the PyTorch 2D response on every slice clear of the depth border', () => {
    const { weights } = initStrategyFromSpec('inflate-2d:i3d').init(arch, { seed: 1, source2d: source });
    const D = 40;
    const out = tf.tidy(() => {
      const r = stemAndLayer1(weights, identicalSlices(D));
      return { conv1: tf.keep(r.conv1), stem: tf.keep(r.stem), layer1: tf.keep(r.layer1) };
    });
    // Output slice z of conv1 (k 7, stride 2, pad 3) reads input slices 2z-3..2z+3: inside for z = 2..18 of 20.
    // maxpool (k3/s2/p1) slice m reads conv1 slices 2m-1..2m+1 → 2..8; each 3³ conv of layer1 loses one more: 4..6.
    const expectations: [Tensor5D, string, number, number][] = [
      [out.conv1, 'conv1.npy', 2, 18],
      [out.stem, 'stem.npy', 2, 18],
      [out.layer1, 'layer1.npy', 4, 6],
    ];
    for (const [t, file, lo, hi] of expectations) {
      const want = nchwToHwc(npy(file)).data;
      for (let z = lo; z <= hi; z++) expect(relErr(slice(t, z), want), `${file} slice ${z}`).toBeLessThan(1e-4);
    }
    // The border slices see the zero padding in depth: the 2D response is reproduced only away from it.
    expect(relErr(slice(out.conv1, 0), nchwToHwc(npy('conv1.npy')).data)).toBeGreaterThan(1e-2);
    tf.dispose([out.conv1, out.stem, out.layer1]);
  });

  it('1xk: on identical slices, conv1, stem and layer1 give the PyTorch 2D response on EVERY slice (zero depth padding is harmless)', () => {
    const { weights } = initStrategyFromSpec('inflate-2d:1xk').init(arch, { seed: 1, source2d: source });
    const D = 6;
    const out = tf.tidy(() => {
      const r = stemAndLayer1(weights, identicalSlices(D));
      return { conv1: tf.keep(r.conv1), stem: tf.keep(r.stem), layer1: tf.keep(r.layer1) };
    });
    for (const [t, file] of [
      [out.conv1, 'conv1.npy'],
      [out.stem, 'stem.npy'],
      [out.layer1, 'layer1.npy'],
    ] as const) {
      const want = nchwToHwc(npy(file)).data;
      for (let z = 0; z < t.shape[1]; z++) expect(relErr(slice(t, z), want), `${file} slice ${z}`).toBeLessThan(1e-4);
    }
    tf.dispose([out.conv1, out.stem, out.layer1]);
  });

  it('1xk: on a volume of DIFFERENT slices, each 3D output slice is the 2D conv (RGB kernel, R=G=B input) of its centre slice', () => {
    const { weights } = initStrategyFromSpec('inflate-2d:1xk').init(arch, { seed: 1, source2d: source });
    const D = 7;
    // Slice z: a different image per slice (scaled, shifted, flipped and noisy variants of the fixture image).
    const rng = (() => {
      let s = 12345;
      return () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
    })();
    const vol = new Float32Array(D * H * W);
    for (let z = 0; z < D; z++) {
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const src = z % 2 === 0 ? image.data[y * W + x] : image.data[(H - 1 - y) * W + (W - 1 - x)];
          vol[(z * H + y) * W + x] = (0.5 + 0.3 * z) * src + 0.1 * z + 0.5 * rng();
        }
      }
    }
    const cases: { name: string; stride: number; pad: number; dilation: number; cin: number }[] = [
      { name: 'conv1.weight', stride: 2, pad: 3, dilation: 1, cin: 1 },
      { name: 'layer1.0.conv1.weight', stride: 1, pad: 1, dilation: 1, cin: 4 },
      { name: 'layer3.0.conv1.weight', stride: 1, pad: 2, dilation: 2, cin: 8 },
    ];
    for (const c of cases) {
      tf.tidy(() => {
        // Input with c.cin channels: the grey volume for conv1, else channel j = volume·(1 + j/4) + j/10.
        const grey = tf.tensor(vol, [1, D, H, W, 1]);
        const x =
          c.cin === 1
            ? grey
            : (tf.concat(
                Array.from({ length: c.cin }, (_, j) => tf.add(tf.mul(grey, 1 + j / 4), j / 10)),
                4,
              ) as Tensor5D);
        const w3 = params(weights)(c.name);
        const y3 = ops.conv3d(x as Tensor5D, w3, { stride: c.stride, pad: c.pad, dilation: c.dilation });
        const t = source.get(c.name)!;
        const w2 = tf.tensor(permute(t.data, t.shape, [2, 3, 1, 0]).data, [t.shape[2], t.shape[3], t.shape[1], t.shape[0]]) as Tensor4D;
        for (let z = 0; z < y3.shape[1]; z++) {
          let x2 = x.slice([0, z * c.stride, 0, 0, 0], [1, 1, -1, -1, -1]).reshape([1, H, W, c.cin]) as Tensor4D;
          if (c.name === 'conv1.weight') x2 = tf.tile(x2, [1, 1, 1, 3]); // R = G = B, original 3-channel kernel
          const xp = tf.pad(x2, [
            [0, 0],
            [c.pad, c.pad],
            [c.pad, c.pad],
            [0, 0],
          ]);
          const y2 = tf.conv2d(xp, w2, c.stride, 'valid', 'NHWC', c.dilation);
          expect(relErr(slice(y3, z), y2.dataSync() as Float32Array), `${c.name} slice ${z}`).toBeLessThan(1e-4);
        }
      });
    }
  });
});

describe('tiny3d (generic architecture)', () => {
  it('mean-var and partial work on any encoder/head split; conv biases are resampled from their own statistics', () => {
    const arch = createTiny3d({ patch: [8, 8, 8], width: 4 });
    const pre = arch.init(100);
    const biased = makeBundle([...pre.values()].map((t) => (t.name.endsWith('.bias') ? { ...t, data: t.data.map((_, i) => 0.5 + 0.1 * i) } : t)));
    const r = initStrategyFromSpec('mean-var').init(arch, { seed: 1, pretrained: biased });
    checkResult(arch, r);
    expect(r.report.resampled).toEqual(arch.params().filter((p) => p.part === 'encoder').map((p) => p.name));
    const b = stats(get(r.weights, 'encoder.mid.conv.bias'));
    expect(r.report.sourceStats["encoder.mid.conv.bias"].mean).toBeCloseTo(0.85, 5);
    expect(Math.abs(b.mean - 0.85)).toBeLessThan(0.3);
    const p = initStrategyFromSpec('partial:1').init(arch, { seed: 1, pretrained: pre });
    expect(p.report.copied).toEqual(['encoder.stem.conv.weight', 'encoder.stem.conv.bias', 'encoder.down.conv.weight', 'encoder.down.conv.bias']);
  });
});
