/**
 * plan.compression: the sites' compression settings in every task and, for compression.model float16 / int8, the
 * round's base model encoded that way, written once next to the float32 file and registered as a downloadable
 * version. The float32 hash stays the round's identity (what updates name as their base); sites only download the
 * smaller file.
 */
import { existsSync } from 'node:fs';
import type { TaskSettings } from '../../../shared/protocol/task.ts';
import { encodeModel } from '../../../shared/tensors/update-codec.ts';
import { writeFileAtomic } from '../../../shared/util/fs-atomic.ts';
import { sha256Hex } from '../../../shared/util/hash.ts';
import type { RoundFeature, RoundFeatureContext } from '../round-feature.ts';

type ModelFile = { hash: string; size: number; encoding: 'float16' | 'int8' };

export class CompressedModelFiles implements RoundFeature {
  readonly name = 'compressed-model-files';

  constructor(private readonly c: RoundFeatureContext) {}

  taskSettings(baseModelHash: string): Partial<TaskSettings> {
    const compression = this.c.plan.compression;
    const modelFile = this.modelFileFor(baseModelHash);
    return {
      ...(compression.update !== 'float32' || compression.delta || compression.model !== 'float32' ? { compression: { ...compression } } : {}),
      ...(modelFile ? { modelFile } : {}),
    };
  }

  /** The encoded file of model `hash` (made on first use, then found by its store meta key); undefined for float32. */
  private modelFileFor(hash: string): ModelFile | undefined {
    const encoding = this.c.plan.compression.model;
    if (encoding === 'float32') return undefined;
    const { store, models, log } = this.c;
    const key = `model_file:${encoding}:${hash}`;
    const known = store.getMeta(key);
    if (known) return JSON.parse(known) as ModelFile;
    const bytes = encodeModel(models.load(hash), encoding);
    const encHash = sha256Hex(bytes);
    const path = models.pathFor(encHash);
    if (!existsSync(path)) writeFileAtomic(path, bytes);
    store.addModel({ hash: encHash, path, round: store.getModel(hash)?.round ?? 0, sizeBytes: bytes.length, createdAt: Date.now() });
    const file: ModelFile = { hash: encHash, size: bytes.length, encoding };
    store.setMeta(key, JSON.stringify(file));
    log.info({ model: hash.slice(0, 12), encoded: encHash.slice(0, 12), encoding, bytes: bytes.length, float32Bytes: models.size(hash) }, 'model encoded for download');
    return file;
  }
}
