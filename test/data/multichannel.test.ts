/**
 * Multi-channel (multi-modal) inputs end to end on real generated NIfTI files: the MSD _0000…_0003 layout read
 * and checked, each channel normalised on its own, augmentation applied alike to every channel, a 4-channel
 * Med3D trained and scored from the site loader, the 1 → C transfer rule checked numerically, and the one-channel
 * path left exactly as it was.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as TfModule from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCheckData } from '../../cli/check-data.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import { createMed3d, inferMed3dOptions, med3dMetadata, med3dOptionsFromMetadata } from '../../shared/model/med3d.ts';
import { med3dEmbed } from '../../shared/model/med3d-forward.ts';
import { createMed3dTrainer } from '../../shared/model/med3d-trainer.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { adaptInputChannels, initStrategyFromSpec } from '../../shared/model/transfer-init.ts';
import type { PatchSource, VolumeCase } from '../../shared/model/types.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { checkDataFolder } from '../../site-agent/data/check.ts';
import { writeNifti } from '../../site-agent/data/nifti.ts';
import { mulberry32 } from '../../site-agent/data/prng.ts';
import { patchToVolumeCase, preparedToVolumeCase, SiteData } from '../../site-agent/data/site-data.ts';
import { channelImage, writeMultiChannelSite } from '../helpers/multichannel-site.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-multichannel-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const site = join(tmp, 'site');
const same = join(tmp, 'same');
const SIZE = [16, 16, 16] as const;

beforeAll(async () => {
  await writeMultiChannelSite(site, { cases: 4, valCases: 1, size: SIZE, seed: 3 });
  await writeMultiChannelSite(same, { cases: 2, size: SIZE, seed: 4, identicalChannels: true });
}, 60_000);

const head2 = { kind: 'segmentation', numClasses: 2 } as const;

describe('a 4-channel MSD folder', () => {
  it('check-data reports 4 channels per case and the dataset channel names; --channels flags a plan mismatch', async () => {
    const r = await checkDataFolder(site);
    expect(r.channelNames).toEqual(['FLAIR', 'T1w', 'T1gd', 'T2w']);
    expect(r.rows.map((x) => x.channels)).toEqual([4, 4, 4, 4, 4]);
    expect(r.counts.unusable).toBe(0);
    let text = '';
    expect(await runCheckData(site, (s) => void (text += s))).toBe(0);
    expect(text).toMatch(/4 channel\(s\) 0=FLAIR, 1=T1w, 2=T1gd, 3=T2w/);
    expect(text).toMatch(/4\/4/);
    text = '';
    expect(await runCheckData(site, (s) => void (text += s), { expectChannels: 1 })).toBe(1);
    expect(text).toMatch(/names 4 channel\(s\) \(FLAIR, T1w, T1gd, T2w\) but the model takes 1/);
  });

  it('a case with a missing or an extra channel file is reported on that case only', async () => {
    const dir = join(tmp, 'faulty');
    await writeMultiChannelSite(dir, { cases: 3, size: [8, 8, 8], seed: 5 });
    rmSync(join(dir, 'imagesTr', 'mm_001_0002.nii.gz'));
    await writeNifti(join(dir, 'imagesTr', 'mm_002_0004.nii.gz'), { data: new Float32Array(512), dims: [8, 8, 8], spacing: [1.5, 1.5, 1.5] });
    const r = await checkDataFolder(dir);
    expect(r.rows.map((x) => [x.case, x.channels, x.usable])).toEqual([
      ['mm_000', 4, true],
      ['mm_001', 3, false],
      ['mm_002', 5, false],
    ]);
    const errors = r.problems.filter((p) => p.severity === 'error').map((p) => `${p.case}: ${p.fault}`);
    expect(errors).toEqual([
      'mm_001: missing channel file(s) _0002 (dataset has 4 channels)',
      'mm_002: channel file(s) _0004 beyond the 4 channel(s) dataset.json names (modality / channel_names)',
    ]);
  });

  it('normalises every channel on its own (z-score over its nonzero voxels), whatever its scale', async () => {
    const data = await SiteData.open(site, { patch: [16, 16, 16] });
    expect(data.modalities).toEqual(['mri', 'mri', 'mri', 'mri']);
    const c = (await data.load(data.train[0]))!;
    expect(c.channels).toHaveLength(4);
    for (const ch of c.channels) {
      let n = 0;
      let s = 0;
      let q = 0;
      for (const v of ch) if (v !== 0) [n, s, q] = [n + 1, s + v, q + v * v];
      const mean = s / n;
      expect(Math.abs(mean)).toBeLessThan(1e-4);
      expect(Math.sqrt(q / n - mean * mean)).toBeCloseTo(1, 3);
    }
    // Channels 0 and 2 are gain/offset copies of one image: after their own z-score they coincide; channel 1 (lesion darker) does not.
    let d02 = 0;
    let d01 = 0;
    for (let i = 0; i < c.channels[0].length; i++) {
      d02 = Math.max(d02, Math.abs(c.channels[0][i] - c.channels[2][i]));
      d01 = Math.max(d01, Math.abs(c.channels[0][i] - c.channels[1][i]));
    }
    expect(d02).toBeLessThan(1e-4);
    expect(d01).toBeGreaterThan(0.1);
    // The helper really wrote channels of different scales (the normalisation had something to do).
    const img = new Float32Array([100]);
    const lbl = new Uint8Array([0]);
    expect(channelImage(img, lbl, 3)[0]).toBeCloseTo(100 * 3.25 + 120, 4);
  });

  it('augments every channel alike: identical channel files give identical channels after rotation, zoom, elastic and flips', async () => {
    const data = await SiteData.open(same, { patch: [12, 12, 12] });
    const augment = {
      flipProbability: 1,
      rotationProbability: 1,
      zoomProbability: 1,
      elasticProbability: 1,
      scaleProbability: 0,
      noiseProbability: 0,
      gammaProbability: 0,
    };
    const batch = await data.sampleBatch(undefined, 4, mulberry32(9), { augment });
    let moved = 0;
    for (const p of batch) {
      expect(p.channels).toBe(4);
      for (let v = 0; v < p.image.length / 4; v++) {
        for (let c = 1; c < 4; c++) expect(p.image[v * 4 + c]).toBe(p.image[v * 4]);
      }
      moved += p.image.some((x) => x !== 0) ? 1 : 0;
    }
    expect(moved).toBeGreaterThan(0);
    // With per-channel intensity augmentation on, the channels part (brightness and gamma are drawn per channel).
    const noisy = await data.sampleBatch(undefined, 6, mulberry32(10), { augment: { ...augment, scaleProbability: 1, gammaProbability: 1 } });
    expect(noisy.some((p) => p.image.some((x, i) => i % 4 === 1 && x !== p.image[i - 1]))).toBe(true);
  });
});

describe('a 4-channel Med3D', () => {
  it('sizes conv1 (and the U-Net in_conv) by the plan, records the channels in the file, and reads them back', () => {
    const plan = parsePlan('model: { architecture: med3d, depth: 10, widthMultiplier: 0.0625, patch: [16, 16, 16], inputChannels: 4 }\n');
    const arch = architectureFor(plan.model) as ReturnType<typeof createMed3d>;
    expect(arch.config.inChannels).toBe(4);
    expect(arch.params().find((p) => p.name === 'encoder.conv1.weight')!.shape).toEqual([7, 7, 7, 4, 4]);
    const unet = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: { kind: 'unet', numClasses: 2 }, patch: [16, 16, 16], inChannels: 4 });
    expect(unet.params().find((p) => p.name === 'head.dec.in_conv.weight')!.shape).toEqual([3, 3, 3, 4, 8]);
    expect(med3dOptionsFromMetadata(med3dMetadata(arch))!.inChannels).toBe(4);
    expect(inferMed3dOptions(arch.params()).inChannels).toBe(4);
    expect(() => parsePlan('model: { architecture: tiny3d, inputChannels: 2 }\n')).toThrow(/inputChannels above 1 needs architecture med3d/);
    expect(() => parsePlan('model: { architecture: med3d, inputChannels: 2, patch: [16, 16, 16] }\npretraining: { enabled: true }\n')).toThrow(/pretraining restores one-channel patches/);
    // Teacher–student pseudo-labels multi-channel scans (test/teacher-student/multichannel-*.test.ts).
    expect(parsePlan('model: { architecture: med3d, inputChannels: 2, patch: [16, 16, 16] }\nteacherStudent: { enabled: true }\n').teacherStudent.enabled).toBe(true);
    expect(() => createMed3d({ depth: 10, shortcut: 'B', head: head2, patch: [16, 16, 16], inChannels: 0 })).toThrow(/inChannels must be an integer/);
  });

  it('trains from the site loader (augmented 4-channel patches) and scores whole 4-channel validation volumes', async () => {
    const arch = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16], inChannels: 4 });
    const kernels = (await selectConvKernels()).kernels;
    const trainer = createMed3dTrainer(arch, kernels);
    const data = await SiteData.open(site, { patch: [16, 16, 16] });
    const source: PatchSource = {
      cases: data.train.length,
      sample: async (count, rng) => (await data.sampleBatch(undefined, count, rng)).map((p, i) => patchToVolumeCase(p, `b${i}`)),
    };
    const w0 = arch.init(2);
    const r = await trainer.train({ weights: w0, cases: [], source, steps: 4, batchSize: 2, learningRate: 0.01, seed: 1 });
    expect(Number.isFinite(r.loss)).toBe(true);
    const conv1 = r.weights.get('encoder.conv1.weight')!;
    expect(conv1.shape).toEqual([7, 7, 7, 4, 4]);
    // Every input channel's kernel slice learned (gradients reach all four modalities).
    for (let c = 0; c < 4; c++) {
      let diff = 0;
      for (let i = c * 4; i < conv1.data.length; i += 16) for (let o = 0; o < 4; o++) diff += Math.abs(conv1.data[i + o] - w0.get('encoder.conv1.weight')!.data[i + o]);
      expect(diff).toBeGreaterThan(0);
    }
    const val: VolumeCase[] = [];
    for (const ref of data.val) val.push(preparedToVolumeCase((await data.load(ref))!, ref.id));
    expect(val[0].channels).toBe(4);
    expect(val[0].image.length).toBe(16 * 16 * 16 * 4);
    const ev = await trainer.evaluate(r.weights, val);
    expect(ev.cases).toBe(1);
    expect(ev.meanDice).toBeGreaterThanOrEqual(0);
    // A one-channel volume is refused by name, not by a shape deep in the graph.
    const one: VolumeCase = { id: 'one', shape: [16, 16, 16], image: new Float32Array(4096), label: new Uint8Array(4096) };
    await expect(trainer.evaluate(r.weights, [one])).rejects.toThrow(/case one: 1 input channel\(s\).*the model takes 4/);
  }, 120_000);
});

describe('1 → C transfer of a pretrained first layer', () => {
  let tf: typeof TfModule;
  beforeAll(async () => {
    tf = (await selectEngine({ force: 'cpu' })).tf;
  });

  it('replicates conv1 over C channels divided by C: C identical channels give the pretrained encoder features', () => {
    const one = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.125, head: head2, patch: [16, 16, 16] });
    const four = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.125, head: head2, patch: [16, 16, 16], inChannels: 4 });
    // Pretrained weights with non-trivial BatchNorm statistics, so the stem's scale matters downstream.
    const rng = mulberry32(77);
    const pretrained = makeBundle(
      [...one.init(11).values()].map((t) =>
        t.name.endsWith('running_var') ? { ...t, data: t.data.map(() => 0.5 + rng()) } : t.name.endsWith('running_mean') ? { ...t, data: t.data.map(() => rng() - 0.5) } : t,
      ),
    );
    for (const spec of ['pretrained', 'partial:1', 'mean-var']) {
      const { weights, report } = initStrategyFromSpec(spec).init(four, { seed: 1, pretrained });
      expect(report.adaptedInputs).toEqual(['encoder.conv1.weight']);
      expect(report.notes.join('\n')).toMatch(/replicated over 4 input channels and divided by 4/);
      expect(weights.get('encoder.conv1.weight')!.shape).toEqual([7, 7, 7, 4, 8]);
    }
    const { weights } = initStrategyFromSpec('pretrained').init(four, { seed: 1, pretrained });
    const w1 = pretrained.get('encoder.conv1.weight')!.data;
    const w4 = weights.get('encoder.conv1.weight')!.data;
    for (let k = 0; k < 7 * 7 * 7; k++) for (let c = 0; c < 4; c++) for (let o = 0; o < 8; o++) expect(w4[(k * 4 + c) * 8 + o]).toBe(w1[k * 8 + o] / 4);

    const n = 16 * 16 * 16;
    const vol = Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37) + ((i * 7919) % 13) / 13);
    const x1 = tf.tensor5d(vol, [1, 16, 16, 16, 1]);
    const x4 = tf.tile(x1, [1, 1, 1, 1, 4]) as TfModule.Tensor5D;
    const f1 = med3dEmbed(tf, one, pretrained, x1);
    const f4 = med3dEmbed(tf, four, weights, x4);
    const a = f1.dataSync();
    const b = f4.dataSync();
    let num = 0;
    let den = 0;
    for (let i = 0; i < a.length; i++) {
      num = Math.max(num, Math.abs(a[i] - b[i]));
      den = Math.max(den, Math.abs(a[i]));
    }
    tf.dispose([x1, x4, f1, f4]);
    expect(den).toBeGreaterThan(0);
    expect(num / den).toBeLessThan(1e-5);
    // Without the 1/C scale the response would be 4× at conv1: the check above can fail.
    const unscaled = makeBundle([...weights.values()].map((t) => (t.name === 'encoder.conv1.weight' ? { ...t, data: t.data.map((v) => v * 4) } : t)));
    const fu = med3dEmbed(tf, four, unscaled, tf.tile(tf.tensor5d(vol, [1, 16, 16, 16, 1]), [1, 1, 1, 1, 4]) as TfModule.Tensor5D);
    const u = fu.dataSync();
    let off = 0;
    for (let i = 0; i < a.length; i++) off = Math.max(off, Math.abs(a[i] - u[i]));
    fu.dispose();
    expect(off / den).toBeGreaterThan(1e-2);
  });

  it('leaves a bundle alone when the model takes one channel or the source already has C', () => {
    const one = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16] });
    const w = one.init(3);
    expect(adaptInputChannels(one, w).bundle).toBe(w);
    const four = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16], inChannels: 4 });
    const w4 = four.init(3);
    expect(adaptInputChannels(four, w4)).toEqual({ bundle: w4, adapted: [] });
    // A 2-channel source for a 4-channel model is no 1 → C case: the shape check names it.
    const two = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16], inChannels: 2 });
    expect(() => initStrategyFromSpec('pretrained').init(four, { seed: 1, pretrained: two.init(3) })).toThrow(/encoder\.conv1\.weight.*pretrained \[7,7,7,2,4\], model expects \[7,7,7,4,4\]/);
  });
});

describe('one channel stays as it was', () => {
  it('same parameters, init, metadata and VolumeCase as before multi-channel inputs', async () => {
    const a = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16] });
    const b = createMed3d({ depth: 10, shortcut: 'B', widthMultiplier: 0.0625, head: head2, patch: [16, 16, 16], inChannels: 1 });
    expect(a.params().find((p) => p.name === 'encoder.conv1.weight')!.shape).toEqual([7, 7, 7, 1, 4]);
    expect(b.params()).toEqual(a.params());
    const [wa, wb] = [a.init(5), b.init(5)];
    for (const [n, t] of wa) expect(wb.get(n)!.data).toEqual(t.data);
    expect(med3dMetadata(a).med3d).not.toMatch(/inChannels/);
    expect(Object.keys(parsePlan('model: { architecture: med3d }\n').model)).not.toContain('inputChannels');
    const dir = join(tmp, 'single');
    await writeMultiChannelSite(dir, { cases: 1, size: [8, 8, 8], seed: 6, channels: ['MRI'] });
    writeFileSync(join(dir, 'extra.txt'), 'not data');
    const data = await SiteData.open(dir, { patch: [8, 8, 8] });
    const [p] = await data.sampleBatch(undefined, 1, mulberry32(1), { augment: false });
    const vc = patchToVolumeCase(p, 'x');
    expect(Object.keys(vc).sort()).toEqual(['id', 'image', 'label', 'shape']);
    expect(vc.image).toBe(p.image);
    const whole = preparedToVolumeCase((await data.load(data.train[0]))!);
    expect(Object.keys(whole).sort()).toEqual(['id', 'image', 'label', 'shape']);
  });
});
