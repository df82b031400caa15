/**
 * Unlabelled phantom images for a phantom site (site-agent/data/phantom.ts writes the labelled ones): images in
 * imagesTr/ without a label file, which the site's data loader puts in its unlabelled pool. Used by
 * `medfl experiment` and the teacher–student tests; same generator, so the pool looks like the site's scans.
 */
import { join } from 'node:path';
import { dimsFromShape, writeNifti } from '../data/nifti.ts';
import { generatePhantomCase } from '../data/phantom.ts';
import { deriveSeed } from '../data/prng.ts';

export interface PhantomPoolOptions {
  readonly siteName: string;
  readonly cases: number;
  readonly size: readonly [number, number, number];
  readonly seed: number;
  readonly intensityShift: number;
  readonly intensityScale?: number;
  readonly spacing?: readonly [number, number, number];
}

/** Writes `cases` unlabelled images; their seeds never collide with writePhantomSite's (index offset 50 000). */
export async function writePhantomPool(dir: string, o: PhantomPoolOptions): Promise<string[]> {
  const prefix = o.siteName.replace(/[^A-Za-z0-9]+/g, '') || 'site';
  const names: string[] = [];
  for (let i = 0; i < o.cases; i++) {
    const ph = generatePhantomCase({ size: o.size, seed: deriveSeed(o.seed, 50_000 + i), intensityShift: o.intensityShift, intensityScale: o.intensityScale });
    const name = `${prefix}_pool${String(i).padStart(3, '0')}`;
    await writeNifti(join(dir, 'imagesTr', `${name}_0000.nii.gz`), { data: ph.image, dims: dimsFromShape(o.size), spacing: o.spacing ?? [1.5, 1.5, 1.5] });
    names.push(name);
  }
  return names;
}
