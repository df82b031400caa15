/**
 * `medfl model import CHECKPOINT --arch resnet10|18|34|50|101 [--shortcut A|B] [--width M] --out FILE.safetensors`
 *
 * Reads a MedicalNet / PyTorch checkpoint (.pth/.pt zip or legacy format, or .safetensors) without
 * Python and without running anything from it (shared/checkpoints/pickle.ts refuses every global
 * outside a small allow-list), maps it onto the Med3D parameter list (MedFL names, tfjs layouts) and
 * writes a MedFL model file. Any missing, unexpected, mis-shaped or non-finite tensor fails the import
 * with ONE error listing all of them (MedicalNet's own loader silently skips mismatched keys).
 *
 * Parts: MedicalNet's pretrained releases are encoders; when the checkpoint holds no `conv_seg.*` /
 * `fc.*` keys only the encoder is imported (the head stays site-local and is initialised later),
 * otherwise encoder and head are (and the head must then match --classes). `--parts` overrides this.
 *
 * Output: safetensors with MedFL names and layouts; __metadata__ = med3dMetadata (format "medfl",
 * architecture "med3d", med3d {depth, shortcut, widthMultiplier, head, patch}) plus arch, shortcut,
 * widthMultiplier, parts, source (file name), sourceSha256, sourceFormat, sourceContainer, importedAt.
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { mapStateDict, medicalNetIsConvTranspose, medicalNetRename } from '../shared/checkpoints/torch-mapping.ts';
import { readCheckpoint, type CheckpointFormat } from '../shared/checkpoints/pth.ts';
import { createMed3d, describeMed3d, med3dMetadata, MED3D_DEPTHS, type Med3dDepth, type Med3dShortcut } from '../shared/model/med3d.ts';
import type { ParamInfo } from '../shared/model/types.ts';
import { bundleParameterCount } from '../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../shared/tensors/safetensors.ts';
import { sha256Hex } from '../shared/util/hash.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';

export type ImportArch = 'resnet10' | 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101';
export type ImportParts = 'auto' | 'encoder' | 'all';

/** Shortcut types of MedicalNet's 23-dataset release (MedicalNet's README). */
export const MEDICALNET_RELEASE_SHORTCUT: Readonly<Record<Med3dDepth, Med3dShortcut>> = { 10: 'B', 18: 'A', 34: 'A', 50: 'B', 101: 'B' };

export interface ImportOptions {
  readonly checkpoint: string;
  /** "resnet10" … "resnet101"; also accepts "r18", "18". */
  readonly arch: ImportArch | string;
  /** Default: MedicalNet's release convention for the depth (R10 B, R18 A, R34 A, R50/R101 B). */
  readonly shortcut?: Med3dShortcut | string;
  readonly widthMultiplier?: number;
  readonly out: string;
  /** Segmentation classes of the head (used when the head is imported; default 2, MedicalNet's). */
  readonly numClasses?: number;
  /** Patch recorded in the metadata (default [56, 448, 448], MedicalNet's input size). */
  readonly patch?: readonly [number, number, number];
  /** Which parameters to import (default auto: "all" if the checkpoint has head keys, else "encoder"). */
  readonly parts?: ImportParts;
  /** Dotted key of the weights inside the checkpoint (default: state_dict / model / net / plain). */
  readonly container?: string;
  /**
   * The parameter list to map onto, instead of building it with createMed3d (tests, other
   * architectures with MedicalNet naming). Filtered by `parts` like the built one.
   */
  readonly expected?: readonly ParamInfo[];
}

export interface ImportResult {
  readonly out: string;
  readonly architecture: string;
  readonly parts: 'encoder' | 'all';
  readonly tensors: number;
  readonly parameters: number;
  readonly sourceFormat: CheckpointFormat;
  readonly sourceContainer: string;
  readonly strippedPrefix: string;
  readonly sourceSha256: string;
  /** Checkpoint keys deliberately not imported (num_batches_tracked, head keys under parts=encoder). */
  readonly ignored: readonly string[];
  readonly metadata: Readonly<Record<string, string>>;
}

export function parseArch(arch: string): Med3dDepth {
  const m = /^(?:resnet|r)?-?(\d+)$/i.exec(arch.trim());
  const depth = m ? Number(m[1]) : NaN;
  if (!MED3D_DEPTHS.includes(depth as Med3dDepth)) {
    throw new Error(`--arch must be one of ${MED3D_DEPTHS.map((d) => `resnet${d}`).join(', ')}, got "${arch}"`);
  }
  return depth as Med3dDepth;
}

export async function runImport(opts: ImportOptions): Promise<ImportResult> {
  const depth = parseArch(opts.arch);
  const shortcut = (opts.shortcut ?? MEDICALNET_RELEASE_SHORTCUT[depth]).toUpperCase();
  if (shortcut !== 'A' && shortcut !== 'B') throw new Error(`--shortcut must be A or B, got "${opts.shortcut}"`);
  const widthMultiplier = opts.widthMultiplier ?? 1;
  const arch = createMed3d({
    depth,
    shortcut,
    widthMultiplier,
    head: { kind: 'segmentation', numClasses: opts.numClasses ?? 2 },
    patch: opts.patch ?? [56, 448, 448],
  });

  const bytes = await readFile(opts.checkpoint);
  const source = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sourceSha256 = sha256Hex(source);
  const ckpt = readCheckpoint(source, basename(opts.checkpoint), { container: opts.container });

  const isHeadKey = (k: string) => medicalNetRename(k)?.startsWith('head.') ?? false;
  const requested = opts.parts ?? 'auto';
  if (requested !== 'auto' && requested !== 'encoder' && requested !== 'all') throw new Error(`--parts must be auto, encoder or all, got "${String(requested)}"`);
  const parts: 'encoder' | 'all' = requested === 'auto' ? ([...ckpt.tensors.keys()].some(isHeadKey) ? 'all' : 'encoder') : requested;

  const all = opts.expected ?? arch.params();
  const expected = parts === 'encoder' ? all.filter((p) => p.part === 'encoder') : all;
  const ignored: string[] = [];
  const rename = (k: string) => {
    const name = medicalNetRename(k);
    if (name === undefined || (parts === 'encoder' && name.startsWith('head.'))) {
      ignored.push(k);
      return undefined;
    }
    return name;
  };
  let bundle;
  try {
    bundle = mapStateDict(ckpt.tensors, expected, { rename, convTranspose: medicalNetIsConvTranspose });
  } catch (e) {
    (e as Error).message = `${basename(opts.checkpoint)} → ${describeMed3d(arch)}${parts === 'encoder' ? ' (encoder only)' : ''}: ${(e as Error).message}`;
    throw e;
  }

  const metadata: Record<string, string> = {
    ...med3dMetadata(arch),
    arch: `resnet${depth}`,
    shortcut,
    widthMultiplier: String(widthMultiplier),
    parts,
    source: basename(opts.checkpoint),
    sourceSha256,
    sourceFormat: ckpt.format,
    sourceContainer: ckpt.container,
  };
  writeFileAtomic(opts.out, encodeSafetensors(bundle, metadata));
  return {
    out: opts.out,
    architecture: describeMed3d(arch),
    parts,
    tensors: bundle.size,
    parameters: bundleParameterCount(bundle),
    sourceFormat: ckpt.format,
    sourceContainer: ckpt.container,
    strippedPrefix: ckpt.strippedPrefix,
    sourceSha256,
    ignored,
    metadata,
  };
}

/** Lines for people, after a successful import. */
export function formatImportResult(r: ImportResult): string {
  return [
    `imported ${r.metadata.source} (${r.sourceFormat}${r.sourceContainer ? `, weights under "${r.sourceContainer}"` : ''}${r.strippedPrefix ? `, "${r.strippedPrefix}" prefix stripped` : ''})`,
    `  architecture  ${r.architecture}`,
    `  parts         ${r.parts === 'encoder' ? 'encoder only (no head in the checkpoint, or --parts encoder)' : 'encoder and head'}`,
    `  tensors       ${r.tensors} (${r.parameters.toLocaleString('en-US')} values); ${r.ignored.length} checkpoint keys skipped (num_batches_tracked${r.parts === 'encoder' ? ', head' : ''})`,
    `  source sha256 ${r.sourceSha256}`,
    `  written       ${r.out}`,
    '',
  ].join('\n');
}
