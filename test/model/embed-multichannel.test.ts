/**
 * `medfl model embed` with a model of 4 input channels (plan model.inputChannels): four NIfTI files (one per
 * channel) or one channels-last .npy give the encoder's features of the interleaved volume; a wrong channel count
 * or channels on different grids are refused by name.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { afterAll, describe, expect, it } from 'vitest';
import { runEmbed } from '../../cli/model-embed.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { decodeNpy, encodeNpy } from '../../shared/io/npy.ts';
import { createMed3d } from '../../shared/model/med3d.ts';
import { med3dEmbed } from '../../shared/model/med3d-forward.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { dimsFromShape, writeNifti } from '../../site-agent/data/nifti.ts';

const dir = mkdtempSync(join(tmpdir(), 'medfl-embed-mc-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('medfl model embed with several input channels', () => {
  it('embeds four NIfTI channels or a 4-channel .npy exactly as the encoder does the interleaved volume', async () => {
    const [D, H, W, C] = [16, 16, 8, 4];
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [D, H, W], inChannels: C });
    const weights = arch.init(5);
    const model = join(dir, 'mc.safetensors');
    writeFileSync(model, encodeSafetensors(weights));
    const n = D * H * W;
    const channel = (c: number) => Float32Array.from({ length: n }, (_, v) => Math.sin(0.37 * v * (c + 1)) + c);
    const files: string[] = [];
    for (let c = 0; c < C; c++) {
      const f = join(dir, `scan_000${c}.nii.gz`);
      await writeNifti(f, { dims: dimsFromShape([D, H, W]), spacing: [1, 1, 1], data: channel(c) });
      files.push(f);
    }
    const interleaved = new Float32Array(n * C);
    for (let c = 0; c < C; c++) channel(c).forEach((x, v) => (interleaved[v * C + c] = x));

    const r = await runEmbed({ model, input: files, out: join(dir, 'f-nii.npy'), engine: 'cpu' });
    expect(r.inputShape).toEqual([1, D, H, W, C]);
    const { tf } = await selectEngine({ force: 'cpu' });
    const x = tf.tensor(interleaved, [1, D, H, W, C]) as TfModule.Tensor5D;
    const want = med3dEmbed(tf, arch, weights, x);
    const expected = new Float32Array(want.dataSync() as Float32Array);
    const got = decodeNpy(readFileSync(join(dir, 'f-nii.npy')));
    expect(got.shape).toEqual([...want.shape]);
    expect(Array.from(got.data)).toEqual(Array.from(expected));
    want.dispose();
    x.dispose();

    writeFileSync(join(dir, 'vol.npy'), encodeNpy({ shape: [1, D, H, W, C], data: interleaved }));
    await runEmbed({ model, input: join(dir, 'vol.npy'), out: join(dir, 'f-npy.npy'), engine: 'cpu' });
    expect(Array.from(decodeNpy(readFileSync(join(dir, 'f-npy.npy'))).data)).toEqual(Array.from(expected));
  });

  it('refuses a channel count the model does not take, and channels on different grids', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'segmentation', numClasses: 2 }, patch: [8, 8, 8], inChannels: 2 });
    const model = join(dir, 'two.safetensors');
    writeFileSync(model, encodeSafetensors(arch.init(1)));
    const a = join(dir, 'a.nii.gz');
    const b = join(dir, 'b.nii.gz');
    await writeNifti(a, { dims: dimsFromShape([8, 8, 8]), spacing: [1, 1, 1], data: new Float32Array(512) });
    await writeNifti(b, { dims: dimsFromShape([8, 8, 16]), spacing: [1, 1, 1], data: new Float32Array(1024) });
    await expect(runEmbed({ model, input: a, out: join(dir, 'x.npy'), engine: 'cpu' })).rejects.toThrow(
      /the input has 1 channel\(s\) but the model takes 2: give 2 NIfTI files \(one per channel/,
    );
    await expect(runEmbed({ model, input: [a, b], out: join(dir, 'x.npy'), engine: 'cpu' })).rejects.toThrow(/b\.nii\.gz: 8×8×16 voxels where a\.nii\.gz has 8×8×8: the channels of one scan must share one grid/);
  });
});
