/**
 * `medfl model export --format torch`: the written file is a torch.save state_dict in MedicalNet's names and layouts.
 * The PyTorch checks run Debian's python3-torch (/usr/bin/python3; scripts/test.sh installs it) and FAIL when it is
 * missing: loading into MedicalNet's module is the whole point of the export.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { unzipSync } from 'fflate';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runExport, ExportError } from '../../cli/model-export.ts';
import { runImport } from '../../cli/model-import.ts';
import { crc32, encodeTorchStateDict } from '../../shared/checkpoints/pth-write.ts';
import { readCheckpoint } from '../../shared/checkpoints/pth.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { decodeNpy, encodeNpy } from '../../shared/io/npy.ts';
import { createMed3d, med3dMetadata, med3dToTorch, type Med3dArchitecture, type Med3dDepth, type Med3dShortcut } from '../../shared/model/med3d.ts';
import { med3dPredict } from '../../shared/model/med3d-forward.ts';
import { createTiny3d } from '../../shared/model/tiny3d.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { weightsWithDrawnNorms } from '../helpers/drawn-norm-weights.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

const REPO = join(import.meta.dirname, '..', '..');
const PYTHON = '/usr/bin/python3'; // Debian's, where python3-torch installs
let dir: string;
let tf: typeof TfModule;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-export-'));
  tf = (await selectEngine({ force: 'cpu' })).tf;
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));


const part = (b: TensorBundle, prefix: string) => makeBundle([...b.values()].filter((t) => t.name.startsWith(prefix)));

/** Writes the global model (encoder, with its metadata) and the site's local file (head) as MedFL stores them. */
function writeModelFiles(name: string, arch: Med3dArchitecture, w: TensorBundle): { model: string; head: string } {
  const model = join(dir, `${name}.safetensors`);
  const head = join(dir, `${name}-local.safetensors`);
  writeFileSync(model, encodeSafetensors(part(w, 'encoder.'), { ...med3dMetadata(arch), round: '3' }));
  writeFileSync(head, encodeSafetensors(part(w, 'head.')));
  return { model, head };
}

describe('torch.save writer', () => {
  it('writes a zip whose data.pkl and storages read back, entries 64-byte aligned, CRCs right', () => {
    const f = Float32Array.from({ length: 300 }, (_, i) => Math.sin(i));
    const bytes = encodeTorchStateDict([
      { name: 'w', dtype: 'float32', shape: [3, 4, 25], data: f },
      { name: 'bn.num_batches_tracked', dtype: 'int64', shape: [], data: BigInt64Array.from([123456789012n]) },
      { name: 'empty', dtype: 'float32', shape: [0, 2], data: new Float32Array(0) },
    ]);
    const back = readCheckpoint(bytes, 'written.pth');
    expect(back.format).toBe('torch-zip');
    expect([...back.tensors.keys()]).toEqual(['w', 'bn.num_batches_tracked', 'empty']);
    expect(back.tensors.get('w')!.shape).toEqual([3, 4, 25]);
    expect(Array.from(back.tensors.get('w')!.data as Float32Array)).toEqual(Array.from(f));
    expect(back.tensors.get('bn.num_batches_tracked')!.data[0]).toBe(123456789012n);
    expect(back.tensors.get('empty')!.shape).toEqual([0, 2]);
    // Each local header: data offset = header + 30 + name + extra.
    const entries = unzipSync(bytes);
    expect(Object.keys(entries).sort()).toEqual(['archive/byteorder', 'archive/data.pkl', 'archive/data/0', 'archive/data/1', 'archive/data/2', 'archive/version']);
    let off = 0;
    while (bytes.readUInt32LE(off) === 0x04034b50) {
      const size = bytes.readUInt32LE(off + 18);
      const nameLen = bytes.readUInt16LE(off + 26);
      const start = off + 30 + nameLen + bytes.readUInt16LE(off + 28);
      const name = bytes.subarray(off + 30, off + 30 + nameLen).toString();
      expect(start % 64, name).toBe(0);
      expect(bytes.readUInt32LE(off + 14), name).toBe(crc32(bytes.subarray(start, start + size)));
      off = start + size;
    }
    expect(new TextDecoder().decode(entries['archive/version'])).toBe('3\n');
  });

  it('refuses duplicate keys and data that do not fit the shape', () => {
    const t = { name: 'a', dtype: 'float32' as const, shape: [2], data: new Float32Array(2) };
    expect(() => encodeTorchStateDict([t, t])).toThrow(/duplicate/);
    expect(() => encodeTorchStateDict([{ ...t, shape: [3] }])).toThrow(/needs 3 values/);
    expect(() => encodeTorchStateDict([{ ...t, dtype: 'int64' }])).toThrow(/int64/);
  });
});

describe('medfl model export --format torch', () => {
  it('round-trips through medfl model import (names, layouts, values) and adds num_batches_tracked', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] });
    const w = weightsWithDrawnNorms(arch, 5);
    const files = writeModelFiles('r10-tiny', arch, w);
    const out = join(dir, 'r10-tiny.pth');
    const r = await runExport({ model: files.model, head: files.head, format: 'torch', out });
    expect(r.head).toBe('segmentation');
    expect(r.medicalNetLoadable).toBe(true);
    expect(statSync(out).mode & 0o777).toBe(0o600); // holds the site's head
    const ckpt = readCheckpoint(readFileSync(out), 'r10-tiny.pth');
    const torch = med3dToTorch(w);
    const bnLayers = arch.params().filter((p) => p.name.endsWith('.running_var')).length;
    expect(ckpt.tensors.size).toBe(torch.length + bnLayers);
    expect(ckpt.tensors.get('layer1.0.bn1.num_batches_tracked')).toMatchObject({ dtype: 'int64', shape: [] });
    expect(ckpt.tensors.get('conv1.weight')!.shape).toEqual([4, 1, 7, 7, 7]);
    expect(ckpt.tensors.get('conv_seg.0.weight')!.shape).toEqual([32, 2, 2, 2, 2]); // ConvTranspose3d [in, out, k, k, k]
    for (const t of torch) expect(Array.from(ckpt.tensors.get(t.name)!.data as Float32Array), t.name).toEqual(Array.from(t.data));

    const back = join(dir, 'r10-tiny-back.safetensors');
    const imp = await runImport({ checkpoint: out, arch: 'resnet10', shortcut: 'B', widthMultiplier: 0.0625, out: back });
    expect(imp.parts).toBe('all');
    const { decodeSafetensors } = await import('../../shared/tensors/safetensors.ts');
    const again = decodeSafetensors(readFileSync(back)).bundle;
    expect([...again.keys()].sort()).toEqual([...w.keys()].sort());
    for (const [n, t] of w) expect(Array.from(again.get(n)!.data), n).toEqual(Array.from(t.data));
  });

  it('exports the encoder alone without --head, and names what is wrong with a bad head file', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'A', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [16, 16, 16] });
    const w = weightsWithDrawnNorms(arch, 9);
    const files = writeModelFiles('r10a-tiny', arch, w);
    const r = await runExport({ model: files.model, format: 'torch', out: join(dir, 'enc.pth') });
    expect(r.head).toBe('none');
    const keys = [...readCheckpoint(readFileSync(join(dir, 'enc.pth'))).tensors.keys()];
    expect(keys.some((k) => k.startsWith('conv_seg.'))).toBe(false);
    expect(keys.some((k) => k.includes('downsample'))).toBe(false); // shortcut A: no parameters

    // An encoder file passed as the head, and a model missing a tensor.
    await expect(runExport({ model: files.model, head: files.model, format: 'torch', out: join(dir, 'x.pth') })).rejects.toThrow(/no head\.\* tensors/);
    const cut = join(dir, 'cut.safetensors');
    writeFileSync(cut, encodeSafetensors(makeBundle([...part(w, 'encoder.').values()].filter((t) => t.name !== 'encoder.layer3.0.bn2.running_var')), med3dMetadata(arch)));
    await expect(runExport({ model: cut, format: 'torch', out: join(dir, 'x.pth') })).rejects.toThrow(/missing tensor\(s\): encoder\.layer3\.0\.bn2\.running_var.*--head/);
    await expect(runExport({ model: files.model, format: 'tflite', out: join(dir, 'x.pth') })).rejects.toBeInstanceOf(ExportError);
    // The formats are the architecture's (its registered definition): tiny3d has none; an unregistered one is named.
    const tiny = join(dir, 'tiny.safetensors');
    const tinyArch = createTiny3d({ patch: [8, 8, 8] });
    writeFileSync(tiny, encodeSafetensors(tinyArch.init(1), { architecture: 'tiny3d' }));
    await expect(runExport({ model: tiny, format: 'torch', out: join(dir, 'x.pth') })).rejects.toThrow('tiny.safetensors: tiny3d models cannot be exported as torch (only med3d)');
    writeFileSync(tiny, encodeSafetensors(tinyArch.init(1), { architecture: 'vnet' }));
    await expect(runExport({ model: tiny, format: 'onnx', out: join(dir, 'x.onnx') })).rejects.toThrow('tiny.safetensors: unknown model architecture "vnet" (registered: tiny3d, med3d)');
  });

  // Full width, small input: MedicalNet's module (scripts/make_med3d_fixtures.py) must load the file strict and
  // compute what MedFL computes.
  const cases: [Med3dDepth, Med3dShortcut][] = [
    [10, 'B'],
    [18, 'A'],
  ];
  for (const [depth, shortcut] of cases) {
    it(`R${depth}-${shortcut} at full width: PyTorch loads it strict=True into MedicalNet's module and its forward matches MedFL's`, async () => {
      const probe = spawnSync(PYTHON, ['-c', 'import torch'], { encoding: 'utf8' });
      expect(probe.status, `${PYTHON} cannot import torch (${probe.stderr.trim().split('\n').pop()}); install it: apt-get install -y python3-torch`).toBe(0);

      const input: [number, number, number] = [16, 24, 20]; // D ≠ H ≠ W catches axis mix-ups
      const arch = createMed3d({ depth, shortcut, head: { kind: 'segmentation', numClasses: 2 }, patch: input });
      const w = weightsWithDrawnNorms(arch, depth);
      const files = writeModelFiles(`r${depth}`, arch, w);
      const out = join(dir, `r${depth}.pth`);
      await runExport({ model: files.model, head: files.head, format: 'torch', out });

      const rng = mulberry32(42);
      const x = Float32Array.from({ length: input[0] * input[1] * input[2] }, () => gaussian(rng));
      const xPath = join(dir, `x${depth}.npy`);
      const yPath = join(dir, `y${depth}.npy`);
      writeFileSync(xPath, encodeNpy({ shape: [1, 1, ...input], data: x })); // NCDHW, C = 1: same memory order as NDHWC
      const py = [
        'import sys, collections, numpy as np, torch',
        "sys.path.insert(0, 'scripts')",
        'from make_med3d_fixtures import Med3d',
        `depth, shortcut, pth, xp, yp = ${depth}, '${shortcut}', sys.argv[1], sys.argv[2], sys.argv[3]`,
        'sd = torch.load(pth, weights_only=True)',
        "assert type(sd) is collections.OrderedDict, type(sd)",
        'm = Med3d(depth, shortcut, base=64, head_channels=32, num_seg_classes=2)',
        "assert list(sd.keys()) == list(m.state_dict().keys()), 'key order differs from the module'",
        'm.load_state_dict(sd, strict=True)',
        'm.eval()',
        'torch.set_num_threads(2)',
        'with torch.no_grad():',
        '    y = m(torch.from_numpy(np.load(xp)))',
        "np.save(yp, y.numpy().astype('<f4'))",
      ].join('\n');
      const r = spawnSync(PYTHON, ['-c', py, out, xPath, yPath], { cwd: REPO, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      const yTorch = decodeNpy(readFileSync(yPath)); // [1, classes, D', H', W']

      const xt = tf.tensor5d(x, [1, ...input, 1]);
      const yt = med3dPredict(tf, arch, w, xt) as TfModule.Tensor5D;
      const ours = yt.dataSync() as Float32Array;
      const [, d, h, ww, c] = yt.shape;
      xt.dispose();
      yt.dispose();
      expect(yTorch.shape).toEqual([1, c, d, h, ww]);
      let maxDiff = 0;
      let maxRef = 0;
      for (let z = 0; z < d; z++)
        for (let yy = 0; yy < h; yy++)
          for (let xx = 0; xx < ww; xx++)
            for (let k = 0; k < c; k++) {
              const a = ours[(((z * h + yy) * ww + xx) * c) + k];
              const b = yTorch.data[(((k * d + z) * h + yy) * ww) + xx];
              maxDiff = Math.max(maxDiff, Math.abs(a - b));
              maxRef = Math.max(maxRef, Math.abs(b));
            }
      expect(maxRef).toBeGreaterThan(0);
      expect(maxDiff / maxRef).toBeLessThanOrEqual(1e-4);
    }, 300_000); // full-width forwards in tfjs and PyTorch: a minute alone, several on a loaded machine
  }
});
