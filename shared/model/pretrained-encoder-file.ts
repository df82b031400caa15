/**
 * The file a federated pretraining stage leaves behind: every encoder tensor of the Med3D architecture in MedFL
 * names and layouts (what `model.init: pretrained` and `medfl experiment --pretrained` read), with its provenance
 * in the safetensors metadata — which sites, how many rounds, which objective and corruptions, when, and the
 * SHA-256 of the tensors themselves (a file cannot hold its own hash, so the hash covers the tensors only).
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { makeBundle, type TensorBundle } from '../tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors } from '../tensors/safetensors.ts';
import { sha256Hex } from '../util/hash.ts';
import { writeFileAtomic } from '../util/fs-atomic.ts';
import { RestorationTransformsSchema } from './genesis-corruption.ts';
import { med3dEncoderParams, med3dMetadata, type Med3dArchitecture } from './med3d.ts';

/** safetensors metadata key of the provenance JSON. */
export const PROVENANCE_KEY = 'medfl.pretraining';

const sha256 = z.string().regex(/^[0-9a-f]{64}$/);

export const EncoderProvenanceSchema = z
  .object({
    objective: z.literal('restoration'),
    /** Sites whose updates were aggregated in at least one pretraining round, sorted. */
    sites: z.array(z.string().min(1)).min(1),
    rounds: z.number().int().positive(),
    stepsPerRound: z.number().int().positive(),
    learningRate: z.number().positive(),
    transforms: RestorationTransformsSchema,
    /** Federation id (a real federation) or "medfl-experiment" (an in-process simulation). */
    federation: z.string().min(1),
    /** SHA-256 of the tensors alone: safetensors bytes of the encoder bundle without metadata. */
    tensorsSha256: sha256,
    /** The coordinator's model version the encoder was taken from (absent in a simulation). */
    sourceModelHash: sha256.optional(),
    /** ISO 8601 time the file was written. */
    createdAt: z.iso.datetime(),
    /**
     * Encoder tensors the plan kept at the sites (share.keepLocal, e.g. FedBN's norm layers): never aggregated, so
     * written here as the scratch initialisation (norm identity), not as pretrained values.
     */
    notPretrained: z.array(z.string()),
  })
  .strict();

export type EncoderProvenance = z.infer<typeof EncoderProvenanceSchema>;

/**
 * Every encoder tensor of `arch`: the aggregated shared tensors where the federation has them, the rest from
 * `scratch` (arch.init of the plan's seed). Head tensors in `shared` are not taken.
 */
export function assembleEncoder(arch: Med3dArchitecture, shared: TensorBundle, scratch: TensorBundle): { bundle: TensorBundle; notPretrained: string[] } {
  const notPretrained: string[] = [];
  const tensors = med3dEncoderParams(arch).map((p) => {
    const t = shared.get(p.name);
    if (t) return t;
    notPretrained.push(p.name);
    const s = scratch.get(p.name);
    if (!s) throw new Error(`assembleEncoder: no scratch tensor ${p.name}`);
    return s;
  });
  return { bundle: makeBundle(tensors), notPretrained };
}

/** SHA-256 of a bundle's tensors alone (safetensors bytes, no metadata). */
export function tensorsSha256(bundle: TensorBundle): string {
  return sha256Hex(encodeSafetensors(bundle));
}

/** The file bytes: the encoder, the architecture metadata (med3dMetadata) and the provenance. */
export function encodePretrainedEncoder(arch: Med3dArchitecture, encoder: TensorBundle, provenance: Omit<EncoderProvenance, 'tensorsSha256'>): { bytes: Buffer; provenance: EncoderProvenance } {
  const full = EncoderProvenanceSchema.parse({ ...provenance, tensorsSha256: tensorsSha256(encoder) });
  return { bytes: encodeSafetensors(encoder, { ...med3dMetadata(arch), kind: 'pretrained-encoder', [PROVENANCE_KEY]: JSON.stringify(full) }), provenance: full };
}

/** Writes the file as `<dir>/encoder-<first 12 hex of the tensors' hash>.safetensors` (atomically); returns its path. */
export function writePretrainedEncoder(dir: string, arch: Med3dArchitecture, encoder: TensorBundle, provenance: Omit<EncoderProvenance, 'tensorsSha256'>): { path: string; provenance: EncoderProvenance } {
  const { bytes, provenance: full } = encodePretrainedEncoder(arch, encoder, provenance);
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `encoder-${full.tensorsSha256.slice(0, 12)}.safetensors`);
  writeFileAtomic(path, bytes);
  return { path, provenance: full };
}

/**
 * The tensors and, when the file has one, its checked provenance. Throws when the provenance is malformed or its
 * hash does not match the tensors (the file was edited after it was written).
 */
export function readPretrainedEncoder(bytes: Buffer): { bundle: TensorBundle; provenance?: EncoderProvenance } {
  const { bundle, metadata } = decodeSafetensors(bytes);
  const raw = metadata[PROVENANCE_KEY];
  if (raw === undefined) return { bundle };
  const provenance = EncoderProvenanceSchema.parse(JSON.parse(raw));
  const actual = tensorsSha256(bundle);
  if (actual !== provenance.tensorsSha256) throw new Error(`pretrained encoder: the tensors hash to ${actual.slice(0, 12)}…, its provenance says ${provenance.tensorsSha256.slice(0, 12)}… (changed after it was written)`);
  return { bundle, provenance };
}
