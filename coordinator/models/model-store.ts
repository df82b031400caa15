/**
 * Global model versions as immutable files named by their SHA-256: a site that asks for a hash always
 * gets exactly that snapshot, never a mix of two rounds.
 */
import { existsSync, statSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeSafetensors, decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { sha256Hex, SHA256_HEX } from '../../shared/util/hash.ts';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';

export class ModelFiles {
  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true });
  }

  pathFor(hash: string): string {
    if (!SHA256_HEX.test(hash)) throw new Error(`not a model hash: ${JSON.stringify(hash).slice(0, 80)}`);
    return join(this.dir, `${hash}.safetensors`);
  }

  /** Writes (or finds) the snapshot; returns its hash, path and size. Same content ⇒ same file. */
  save(bundle: TensorBundle, metadata: Record<string, string>): { hash: string; path: string; sizeBytes: number } {
    const bytes = encodeSafetensors(bundle, metadata);
    const hash = sha256Hex(bytes);
    const path = this.pathFor(hash);
    if (!existsSync(path)) writeFileAtomic(path, bytes);
    return { hash, path, sizeBytes: bytes.length };
  }

  load(hash: string): TensorBundle {
    const bytes = readFileSync(this.pathFor(hash));
    const actual = sha256Hex(bytes);
    if (actual !== hash) throw new Error(`model file ${hash.slice(0, 12)}… is corrupt on disk (hash ${actual.slice(0, 12)}…); restore it from backup`);
    return decodeSafetensors(bytes).bundle;
  }

  size(hash: string): number {
    return statSync(this.pathFor(hash)).size;
  }
}
