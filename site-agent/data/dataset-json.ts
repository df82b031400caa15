/**
 * dataset.json of a Medical Segmentation Decathlon / nnU-Net folder: validated at the edge (zod), with errors
 * naming the offending field; class names from either label-map orientation (MSD index → name, nnU-Net v2
 * name → index).
 */
import { z } from 'zod';

export class DatasetError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DatasetError';
  }
}

const FileEntry = z.object({ image: z.string().min(1), label: z.string().min(1) });

/** MSD / nnU-Net v1 dataset.json, tolerant of nnU-Net v2 (channel_names, labels name -> index). */
export const DatasetJsonSchema = z
  .looseObject({
    name: z.string().min(1).optional(),
    description: z.string().optional(),
    tensorImageSize: z.enum(['3D', '4D']).optional(),
    modality: z.record(z.string().regex(/^\d+$/, 'keys must be channel indices'), z.string()).optional(),
    channel_names: z.record(z.string().regex(/^\d+$/, 'keys must be channel indices'), z.string()).optional(),
    labels: z.union([
      z.record(z.string().regex(/^\d+$/, 'keys must be class indices'), z.string()),
      z.record(z.string(), z.number().int().nonnegative()),
    ]),
    numTraining: z.number().int().nonnegative(),
    numTest: z.number().int().nonnegative().optional(),
    training: z.array(FileEntry).optional(),
    test: z.array(z.union([z.string(), FileEntry])).optional(),
  })
  .refine((d) => d.modality !== undefined || d.channel_names !== undefined, {
    message: 'one of "modality" (MSD) or "channel_names" (nnU-Net v2) is required',
    path: ['modality'],
  });

export type DatasetJson = z.infer<typeof DatasetJsonSchema>;

/** Parse and validate dataset.json text; errors name the offending field. */
export function parseDatasetJson(text: string, file = 'dataset.json'): DatasetJson {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new DatasetError(`${file}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  const r = DatasetJsonSchema.safeParse(raw);
  if (!r.success) {
    const issues = r.error.issues.map((i) => `field "${i.path.join('.') || '(root)'}": ${i.message}`);
    throw new DatasetError(`${file}: ${issues.join('; ')}`);
  }
  return r.data;
}

/** Class names indexed by class, from either label-map orientation; checks they are 0..n-1 with no gaps. */
export function classNames(labels: DatasetJson['labels']): string[] {
  const byIndex = new Map<number, string>();
  for (const [k, v] of Object.entries(labels)) {
    if (typeof v === 'number') byIndex.set(v, k);
    else byIndex.set(Number(k), v);
  }
  const n = byIndex.size;
  const names: string[] = [];
  for (let i = 0; i < n; i++) {
    const name = byIndex.get(i);
    if (name === undefined) throw new DatasetError(`dataset.json: field "labels": class indices must be 0..${n - 1} without gaps`);
    names.push(name);
  }
  if (n < 2) throw new DatasetError('dataset.json: field "labels": need background and at least one class');
  return names;
}
