/**
 * Global model versions as immutable files named by their SHA-256: a site that asks for a hash always
 * gets exactly that snapshot, never a mix of two rounds.
 */
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { decodeSafetensors, writeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { sha256Hex, SHA256_HEX } from '../../shared/util/hash.ts';
import { fsyncDir } from '../../shared/util/fs-atomic.ts';
import type { TensorReader } from '../aggregation/base-blocks.ts';
import { openModelReader } from './model-reader.ts';

/** A model file being written, renamed to its hash once complete. */
const INCOMING_PREFIX = '.incoming-';

export class ModelFiles {
  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true });
  }

  /**
   * Deletes model files a killed process left half-written (`.incoming-*`: never renamed to their hash, so never a
   * model version); returns how many. Only for the coordinator's start: another process may be writing one now.
   */
  cleanIncoming(): number {
    let n = 0;
    for (const f of readdirSync(this.dir)) {
      if (!f.startsWith(INCOMING_PREFIX)) continue;
      rmSync(join(this.dir, f), { force: true });
      n++;
    }
    return n;
  }

  pathFor(hash: string): string {
    if (!SHA256_HEX.test(hash)) throw new Error(`not a model hash: ${JSON.stringify(hash).slice(0, 80)}`);
    return join(this.dir, `${hash}.safetensors`);
  }

  /**
   * Writes (or finds) the snapshot; returns its hash, path and size. Same content ⇒ same file.
   * Streams tensor by tensor into a temp file while hashing (no model-sized buffer), fsyncs, then
   * renames it to its hash: readers never see a half-written version.
   */
  save(bundle: TensorBundle, metadata: Record<string, string>): { hash: string; path: string; sizeBytes: number } {
    const tmp = join(this.dir, `${INCOMING_PREFIX}${randomBytes(6).toString('hex')}.tmp`);
    const h = createHash('sha256');
    const fd = openSync(tmp, 'w', 0o644);
    let sizeBytes: number;
    try {
      sizeBytes = writeSafetensors(fd, bundle, metadata, (b) => h.update(b));
      fsyncSync(fd);
    } catch (e) {
      closeSync(fd);
      rmSync(tmp, { force: true });
      throw e;
    }
    closeSync(fd);
    const hash = h.digest('hex');
    const path = this.pathFor(hash);
    if (existsSync(path)) rmSync(tmp, { force: true });
    else {
      renameSync(tmp, path);
      fsyncDir(this.dir);
    }
    return { hash, path, sizeBytes };
  }

  load(hash: string): TensorBundle {
    const bytes = readFileSync(this.pathFor(hash));
    const actual = sha256Hex(bytes);
    if (actual !== hash) throw corruptModel(hash, actual);
    return decodeSafetensors(bytes).bundle;
  }

  /**
   * The version's tensors read in part from its file (checked against its hash first, streamed): what a round's
   * aggregation reads its base model from, a block at a time, instead of a decoded model-sized copy.
   */
  reader(hash: string): TensorReader {
    return openModelReader(this.pathFor(hash), { hex: hash, corrupt: (actual) => corruptModel(hash, actual) });
  }

  size(hash: string): number {
    return statSync(this.pathFor(hash)).size;
  }
}

function corruptModel(hash: string, actual: string): Error {
  return new Error(`model file ${hash.slice(0, 12)}… is corrupt on disk (hash ${actual.slice(0, 12)}…); restore it from backup`);
}
