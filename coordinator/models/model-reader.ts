/**
 * A model file read in part: the header is parsed (and the file's SHA-256 checked) once, then any range of a
 * tensor is read from the file when asked, so a round's base model costs a block of memory instead of two models
 * (the file's bytes and the decoded copy that ModelFiles.load() makes).
 */
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { parseSafetensorsHeader, type SafetensorsEntry } from '../../shared/tensors/safetensors.ts';
import type { TensorReader } from '../aggregation/base-blocks.ts';

/** Bytes hashed per read while the file is checked. */
const HASH_CHUNK = 1 << 20;

/**
 * Opens `path` as a safetensors model. With `sha256`, the whole file is hashed first (streamed, no model-sized
 * buffer) and a mismatch throws `corrupt(actual)`'s error. The file is kept open from the first read until close().
 */
export function openModelReader(path: string, sha256?: { hex: string; corrupt: (actual: string) => Error }): TensorReader {
  const fd = openSync(path, 'r');
  let entries: Map<string, SafetensorsEntry>;
  let dataStart: number;
  try {
    const bytes = fstatSync(fd).size;
    if (sha256) {
      const h = createHash('sha256');
      const buf = Buffer.allocUnsafe(Math.min(HASH_CHUNK, Math.max(1, bytes)));
      for (let pos = 0; pos < bytes; ) {
        const got = readSync(fd, buf, 0, Math.min(buf.length, bytes - pos), pos);
        if (got === 0) break;
        h.update(buf.subarray(0, got));
        pos += got;
      }
      const actual = h.digest('hex');
      if (actual !== sha256.hex) throw sha256.corrupt(actual);
    }
    let prefix: Uint8Array = readExactly(fd, Math.min(8, bytes), 0);
    let parsed = parseSafetensorsHeader(prefix, bytes);
    if (!('entries' in parsed)) {
      prefix = readExactly(fd, 8 + parsed.headerBytes, 0);
      parsed = parseSafetensorsHeader(prefix, bytes);
      if (!('entries' in parsed)) throw new Error(`model file ${path}: header could not be read`);
    }
    entries = new Map(parsed.entries.map((e) => [e.name, e]));
    dataStart = parsed.dataStart;
  } finally {
    closeSync(fd);
  }
  return tensorFileReader(path, entries, dataStart);
}

/**
 * A reader over the float32 tensors of a safetensors file whose header was already read and checked (`entries`: where
 * each tensor's bytes lie after `dataStart`). The file is opened at the first read and kept open until close().
 */
export function tensorFileReader(path: string, entries: ReadonlyMap<string, Pick<SafetensorsEntry, 'begin' | 'end'>>, dataStart: number): TensorReader {
  let open: number | undefined;
  return {
    size: (name) => {
      const e = entries.get(name);
      return e ? (e.end - e.begin) / 4 : undefined;
    },
    read(name, from, out) {
      const e = entries.get(name);
      if (!e) throw new Error(`model file ${path} holds no tensor ${name}`);
      if (from < 0 || from + out.length > (e.end - e.begin) / 4) throw new Error(`range [${from}, ${from + out.length}) is outside tensor ${name}`);
      open ??= openSync(path, 'r');
      const b = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
      const pos = dataStart + e.begin + from * 4;
      for (let off = 0; off < b.length; ) {
        const got = readSync(open, b, off, b.length - off, pos + off);
        if (got === 0) throw new Error(`model file ${path} ends early (at byte ${pos + off})`);
        off += got;
      }
    },
    close() {
      if (open === undefined) return;
      closeSync(open);
      open = undefined;
    },
  };
}

function readExactly(fd: number, n: number, pos: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let off = 0; off < n; ) {
    const got = readSync(fd, b, off, n - off, pos + off);
    if (got === 0) throw new Error('file ends inside its safetensors header');
    off += got;
  }
  return b;
}
