/**
 * A generated multi-modal MSD folder (like Task01 BrainTumour: FLAIR, T1w, T1gd, T2w): one phantom anatomy per
 * case written as C NIfTI files CASE_0000 … CASE_000{C-1}, each channel with its own gain, offset and lesion
 * contrast (T1w shows the lesion darker), so the channels differ in scale and content as real modalities do.
 */
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { generatePhantomCase } from '../../site-agent/data/phantom.ts';
import { deriveSeed } from '../../site-agent/data/prng.ts';
import { dimsFromShape, writeNifti } from '../../site-agent/data/nifti.ts';

export const BRATS_LIKE_CHANNELS = ['FLAIR', 'T1w', 'T1gd', 'T2w'] as const;

export interface MultiChannelSiteOptions {
  readonly cases: number;
  readonly valCases?: number;
  /** [D, H, W]. */
  readonly size: readonly [number, number, number];
  readonly seed: number;
  /** Channel names written to dataset.json "modality" (default BRATS_LIKE_CHANNELS). */
  readonly channels?: readonly string[];
  /** Write the same image into every channel file (augmentation consistency checks). */
  readonly identicalChannels?: boolean;
}

/**
 * The image of channel k made from one phantom (image, label): gain, offset, lesion contrast per channel; the air
 * around the body (below 30, under a third of the tissue intensity) is 0, as in skull-stripped BraTS scans.
 */
export function channelImage(image: Float32Array, label: Uint8Array, k: number): Float32Array {
  const gain = 1 + 0.75 * k;
  const offset = 40 * k;
  const out = new Float32Array(image.length);
  for (let i = 0; i < image.length; i++) {
    const v = label[i] > 0 && k === 1 ? image[i] * 0.5 : image[i];
    out[i] = image[i] > 30 ? v * gain + offset : 0;
  }
  return out;
}

export async function writeMultiChannelSite(dir: string, o: MultiChannelSiteOptions): Promise<{ train: string[]; val: string[] }> {
  const names = o.channels ?? BRATS_LIKE_CHANNELS;
  const dims = dimsFromShape(o.size);
  const spacing: [number, number, number] = [1.5, 1.5, 1.5];
  const train: string[] = [];
  const val: string[] = [];
  const total = o.cases + (o.valCases ?? 0);
  for (let i = 0; i < total; i++) {
    const isVal = i >= o.cases;
    const name = `mm_${String(i).padStart(3, '0')}`;
    const ph = generatePhantomCase({ size: o.size, seed: deriveSeed(o.seed, 500 + i), intensityShift: 0 });
    const [imgDir, lblDir] = isVal ? ['imagesTs', 'labelsTs'] : ['imagesTr', 'labelsTr'];
    for (let k = 0; k < names.length; k++) {
      const data = o.identicalChannels ? channelImage(ph.image, ph.label, 0) : channelImage(ph.image, ph.label, k);
      await writeNifti(join(dir, imgDir, `${name}_${String(k).padStart(4, '0')}.nii.gz`), { data, dims, spacing });
    }
    await writeNifti(join(dir, lblDir, `${name}.nii.gz`), { data: ph.label, dims, spacing });
    (isVal ? val : train).push(name);
  }
  const modality = Object.fromEntries(names.map((n, k) => [String(k), n]));
  writeFileSync(
    join(dir, 'dataset.json'),
    JSON.stringify({ name: 'multi-modal', tensorImageSize: '4D', modality, labels: { '0': 'background', '1': 'lesion' }, numTraining: train.length, numTest: val.length }),
  );
  return { train, val };
}
