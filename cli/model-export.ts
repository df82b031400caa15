/**
 * `medfl model export MODEL.safetensors --format torch|onnx [--head SITE_LOCAL.safetensors] --out FILE`
 *
 * --format onnx writes an ONNX graph (opset 17) of the encoder, or of encoder + head with --head (or when the model
 * holds a head), with input "input" [N, C, D, H, W] and output "features" or "logits" (shared/checkpoints/onnx-write.ts):
 * for onnxruntime, TensorRT, OpenVINO and the like. Every head kind and norm is exported.
 *
 * Writes a MedFL Med3D model (MedFL names, [kD,kH,kW,in,out] layouts) as a PyTorch state_dict in MedicalNet's
 * names and layouts, loadable with `torch.load(FILE)` and, for the encoder alone or the encoder with MedicalNet's
 * segmentation head (`conv_seg.*`) and BatchNorm, `model.load_state_dict(sd, strict=True)` into MedicalNet's
 * models/resnet.py module (scripts/make_med3d_fixtures.py rebuilds that layout). Written by
 * shared/checkpoints/pth-write.ts; no Python needed.
 *
 * MODEL: a global model version (the coordinator's models/<sha256>.safetensors), an imported or pretrained
 * encoder file. --head: the site's own tensors (its head, and whatever the plan keeps local, e.g. FedBN norms)
 * from the site's local/ folder; they complete or replace the model's tensors of the same name. The head is
 * exported when the tensors hold one; U-Net (`dec.*`) and classification (`fc.*`) heads keep MedFL's names,
 * which `medfl model import` reads back, but MedicalNet's module has no such layers. Group/instance-norm models
 * have no running statistics and do not load into MedicalNet's BatchNorm module either.
 *
 * Added for MedicalNet's layout: `num_batches_tracked` (int64, 0) after every BatchNorm's running_var — MedFL
 * does not count batches; PyTorch uses the count only with momentum=None.
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { encodeMed3dOnnx } from '../shared/checkpoints/onnx-write.ts';
import { encodeTorchStateDict, type TorchWriteTensor } from '../shared/checkpoints/pth-write.ts';
import {
  createMed3d,
  describeMed3d,
  inferMed3dOptions,
  MED3D_ID,
  med3dOptionsFromMetadata,
  med3dNameToTorch,
  med3dToTorch,
  type Med3dArchitecture,
  type Med3dOptions,
} from '../shared/model/med3d.ts';
import { checkAgainstSpecs, findNonFinite, makeBundle, type NamedTensor, type TensorBundle } from '../shared/tensors/bundle.ts';
import { decodeSafetensors } from '../shared/tensors/safetensors.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import type { ExportFormat } from '../shared/model/model-definition.ts';
import { MODELS, modelDefinition } from '../shared/model/registry.ts';

export type { ExportFormat };
export const EXPORT_FORMATS: readonly ExportFormat[] = ['torch', 'onnx'];

export interface ExportOptions {
  /** MedFL model file (safetensors, MedFL names). */
  readonly model: string;
  readonly format: ExportFormat | string;
  /** The site's local tensors (safetensors, MedFL names): its head, and any tensors the plan keeps local. */
  readonly head?: string;
  readonly out: string;
}

export interface ExportResult {
  readonly out: string;
  readonly format: ExportFormat;
  readonly architecture: string;
  readonly head: 'none' | 'segmentation' | 'unet' | 'classification';
  /** state_dict entries written (num_batches_tracked included); ONNX: initializers (weights and graph constants). */
  readonly entries: number;
  readonly parameters: number;
  /** Whether `load_state_dict(strict=True)` into MedicalNet's module works, and why not when it does not (torch only). */
  readonly medicalNetLoadable: true | string;
  readonly bytes: number;
}

export class ExportError extends Error {
  override name = 'ExportError';
}

async function readMedflFile(path: string, what: string): Promise<{ bundle: TensorBundle; metadata: Record<string, string> }> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new ExportError(`${what} ${path}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  let decoded;
  try {
    decoded = decodeSafetensors(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  } catch (e) {
    throw new ExportError(`${what} ${basename(path)}: not a safetensors file MedFL can read (${(e as Error).message})`);
  }
  const names = [...decoded.bundle.keys()];
  const foreign = names.filter((n) => !n.startsWith('encoder.') && !n.startsWith('head.'));
  if (foreign.length > 0) {
    throw new ExportError(
      `${what} ${basename(path)}: ${foreign.length} tensor(s) without MedFL's encoder./head. names (e.g. "${foreign[0]}"); ` +
        'export takes MedFL model files (a PyTorch state_dict saved as safetensors is already in PyTorch names)',
    );
  }
  const bad = names.filter((n) => decoded.bundle.get(n)!.dtype !== 'F32');
  if (bad.length > 0) throw new ExportError(`${what} ${basename(path)}: non-float32 tensor(s): ${bad.slice(0, 3).join(', ')}`);
  return { bundle: decoded.bundle, metadata: decoded.metadata };
}

/** The architecture of the tensors: the file's metadata where it says, else what the tensors show. */
function architectureOf(tensors: TensorBundle, metadata: Record<string, string>, source: string): Med3dArchitecture {
  let meta: Partial<Med3dOptions>;
  try {
    meta = med3dOptionsFromMetadata(metadata) ?? {};
  } catch (e) {
    throw new ExportError(`${source}: ${(e as Error).message}`);
  }
  const inferred = inferMed3dOptions(tensors.values());
  const depth = meta.depth ?? inferred.depth;
  const shortcut = meta.shortcut ?? inferred.shortcut;
  if (depth === undefined || shortcut === undefined) {
    throw new ExportError(`${source}: cannot tell the ResNet depth/shortcut from the tensors (encoder incomplete?); expected a Med3D model file`);
  }
  // Group and instance norm have the same tensors; which one only matters for training, not for the file.
  const norm = meta.norm ?? (tensors.has('encoder.bn1.running_mean') ? 'batch' : 'instance');
  try {
    return createMed3d({
      depth,
      shortcut,
      widthMultiplier: inferred.widthMultiplier ?? meta.widthMultiplier,
      // The tensors' head decides (a site's own head differs from the plan's); none → a placeholder, not exported.
      head: inferred.head ?? { kind: 'segmentation', numClasses: 2 },
      patch: meta.patch ?? [56, 448, 448],
      norm,
      normGroups: norm === 'group' ? meta.normGroups : undefined,
      // conv1's input channels: the tensors show them (a multi-modal model has C > 1).
      inChannels: inferred.inChannels ?? meta.inChannels,
    });
  } catch (e) {
    throw new ExportError(`${source}: ${(e as Error).message}`);
  }
}

/**
 * MedicalNet's state_dict for `bundle` (already checked against `arch`'s parameters), in the module's order
 * (arch.params() follows it; a bundle is sorted by name), so the keys list like model.state_dict()'s.
 */
export function med3dTorchStateDict(arch: Med3dArchitecture, bundle: TensorBundle): TorchWriteTensor[] {
  const torch = new Map(med3dToTorch(bundle).map((t) => [t.name, t]));
  const out: TorchWriteTensor[] = [];
  for (const p of arch.params()) {
    if (!bundle.has(p.name)) continue;
    const t = torch.get(med3dNameToTorch(p.name))!;
    out.push({ name: t.name, dtype: 'float32', shape: t.shape, data: t.data });
    if (arch.config.norm === 'batch' && t.name.endsWith('.running_var')) {
      out.push({ name: `${t.name.slice(0, -'running_var'.length)}num_batches_tracked`, dtype: 'int64', shape: [], data: new BigInt64Array(1) });
    }
  }
  return out;
}

/**
 * The formats a model file can be written in are its architecture's (registered definition); a file that names no
 * architecture is Med3D's (imported, pretrained or a global model).
 */
function checkExportable(metadata: Record<string, string>, format: ExportFormat, source: string): void {
  const id = metadata.architecture ?? MED3D_ID;
  let formats: readonly ExportFormat[];
  try {
    formats = modelDefinition(id).exportFormats;
  } catch (e) {
    throw new ExportError(`${source}: ${(e as Error).message}`);
  }
  if (formats.includes(format)) return;
  const able = MODELS.filter((m) => m.exportFormats.includes(format)).map((m) => m.id);
  throw new ExportError(`${source}: ${id} models cannot be exported as ${format} (only ${able.join(', ')})`);
}

export async function runExport(opts: ExportOptions): Promise<ExportResult> {
  if (!EXPORT_FORMATS.includes(opts.format as ExportFormat)) throw new ExportError(`--format ${opts.format}: expected ${EXPORT_FORMATS.join(' or ')}`);
  const model = await readMedflFile(opts.model, 'model');
  checkExportable(model.metadata, opts.format as ExportFormat, basename(opts.model));
  const tensors = new Map<string, NamedTensor>(model.bundle);
  if (opts.head !== undefined) {
    const local = await readMedflFile(opts.head, '--head');
    if (![...local.bundle.keys()].some((n) => n.startsWith('head.'))) {
      throw new ExportError(`--head ${basename(opts.head)}: holds no head.* tensors; pass the site's local tensors file (SITE_DIR/local/med3d-….safetensors)`);
    }
    // The site's own head replaces any head the model carries (a shared head is the plan's, not the site's).
    for (const n of [...tensors.keys()]) if (n.startsWith('head.')) tensors.delete(n);
    for (const [n, t] of local.bundle) tensors.set(n, t);
  }
  const source = basename(opts.model) + (opts.head ? ` + ${basename(opts.head)}` : '');
  const arch = architectureOf(tensors, model.metadata, source);
  const withHead = [...tensors.keys()].some((n) => n.startsWith('head.'));
  const expected = arch.params().filter((p) => withHead || p.part === 'encoder');
  const selected = makeBundle(expected.flatMap((p) => tensors.get(p.name) ?? []));
  // Unknown names, missing and mis-shaped tensors; compared on the full set, in parameter order afterwards.
  const problem = checkAgainstSpecs(makeBundle([...tensors.values()]), expected) ?? findNonFinite(selected);
  if (problem) {
    const hint = opts.head === undefined && /missing/.test(problem) ? " (a plan that keeps tensors local, e.g. FedBN norms, needs the site's local file: --head)" : '';
    throw new ExportError(`${source} → ${describeMed3d(arch)}: ${problem}${hint}`);
  }

  const format = opts.format as ExportFormat;
  const headKind = withHead ? arch.config.head.kind : 'none';
  if (format === 'onnx') {
    const bytes = encodeMed3dOnnx(arch, selected, { withHead, docString: `${describeMed3d(arch)}; exported by medfl model export from ${source}` });
    writeFileAtomic(opts.out, bytes, opts.head !== undefined ? 0o600 : 0o644);
    return {
      out: opts.out,
      format,
      architecture: describeMed3d(arch),
      head: headKind,
      entries: selected.size,
      parameters: [...selected.values()].reduce((a, t) => a + t.data.length, 0),
      medicalNetLoadable: 'an ONNX graph, not a state_dict',
      bytes: bytes.length,
    };
  }
  const stateDict = med3dTorchStateDict(arch, selected);
  const bytes = encodeTorchStateDict(stateDict);
  // A site's head never leaves the site through the federation; keep its export private to the owner too.
  writeFileAtomic(opts.out, bytes, opts.head !== undefined ? 0o600 : 0o644);

  let loadable: true | string = true;
  if (arch.config.norm !== 'batch') loadable = `${arch.config.norm} norm has no running statistics; MedicalNet's module uses BatchNorm3d`;
  else if (headKind === 'unet') loadable = "the U-Net head (dec.*) is MedFL's own; MedicalNet's module has no such layers";
  else if (headKind === 'classification') loadable = "the classification head (fc.*) is MedFL's own; MedicalNet's module has no such layer";
  return {
    out: opts.out,
    format,
    architecture: describeMed3d(arch),
    head: headKind,
    entries: stateDict.length,
    parameters: stateDict.reduce((a, t) => a + (t.dtype === 'float32' ? t.data.length : 0), 0),
    medicalNetLoadable: loadable,
    bytes: bytes.length,
  };
}

/** Lines for people, after a successful export. */
export function formatExportResult(r: ExportResult): string {
  if (r.format === 'onnx') {
    return [
      `exported ${r.architecture}`,
      `  parts         encoder${r.head === 'none' ? ' only' : ` + ${r.head} head`}`,
      `  ONNX          opset 17; input "input" [N, C, D, H, W] float32 → output "${r.head === 'none' ? 'features' : 'logits'}"; ${r.parameters.toLocaleString('en-US')} float32 weights`,
      `  written       ${r.out} (${r.bytes.toLocaleString('en-US')} bytes)`,
      '',
    ].join('\n');
  }
  return [
    `exported ${r.architecture}`,
    `  parts         encoder${r.head === 'none' ? ' only' : ` + ${r.head} head`}`,
    `  state_dict    ${r.entries} entries (${r.parameters.toLocaleString('en-US')} float32 values), MedicalNet names and layouts`,
    `  MedicalNet    ${r.medicalNetLoadable === true ? 'loads with load_state_dict(strict=True)' : `does not load into its module: ${r.medicalNetLoadable}`}`,
    `  written       ${r.out} (${r.bytes.toLocaleString('en-US')} bytes; torch.load(FILE) gives the state_dict)`,
    '',
  ].join('\n');
}
