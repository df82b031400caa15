/**
 * Where a server optimiser keeps its moments (m, and v unless FedAvgM) between rounds: two models of float32 that
 * are touched once per round, at its close. In memory they cost two models of RSS for the whole run; in a file
 * they cost two blocks, read, updated and written back in place block by block (the page cache keeps them warm,
 * and the kernel may drop those pages under pressure). The arithmetic is the same either way: the moments are
 * float32 in both, so the optimiser's results do not depend on where they live.
 */
import { closeSync, ftruncateSync, mkdirSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Moments {
  readonly total: number;
  readonly withV: boolean;
  /** Calls fn over consecutive blocks [off, off + m.length) with that block's moments; what fn leaves there is kept. */
  forEachBlock(fn: (off: number, m: Float32Array, v: Float32Array | undefined) => void): void;
  /** The moment over [off, off + n): a view (memory) or a fresh copy (file); for export, one tensor at a time. */
  read(which: 'm' | 'v', off: number, n: number): Float32Array;
  /** Overwrites the moment over [off, off + data.length) (restoring stored state). */
  write(which: 'm' | 'v', off: number, data: Float32Array): void;
  /** Frees the memory or deletes the file. */
  dispose(): void;
}

/** Makes the moments of `total` values: m = 0, v = vInit (when withV). */
export type MomentsFactory = (total: number, withV: boolean, vInit: number) => Moments;

/** Both moments as Float32Arrays (the reference; two models of RSS). */
export const memoryMoments: MomentsFactory = (total, withV, vInit) => {
  const m = new Float32Array(total);
  const v = withV ? new Float32Array(total).fill(vInit) : undefined;
  const pick = (which: 'm' | 'v') => {
    if (which === 'm') return m;
    if (!v) throw new Error('this optimiser keeps no second moment');
    return v;
  };
  return {
    total,
    withV,
    forEachBlock: (fn) => fn(0, m, v),
    read: (which, off, n) => pick(which).subarray(off, off + n),
    write: (which, off, data) => pick(which).set(data, off),
    dispose: () => undefined,
  };
};

/** Floats per block of the file-backed moments (1 MiB each for m and v: what the close holds of them). */
export const MOMENT_BLOCK_FLOATS = 1 << 18;

/** m then v, float32, in one file under `dir`, unlinked as soon as it is open (its space goes with dispose() or the process). */
export function fileMoments(dir: string = tmpdir(), blockFloats = MOMENT_BLOCK_FLOATS): MomentsFactory {
  return (total, withV, vInit) => {
    mkdirSync(dir, { recursive: true });
    const path = join(dir, `server-optimizer-${randomBytes(6).toString('hex')}.f32`);
    const fd = openSync(path, 'w+', 0o600);
    const bytes = total * 4;
    let m: Float32Array;
    let v: Float32Array | undefined;
    try {
      ftruncateSync(fd, withV ? 2 * bytes : bytes); // m starts at 0: the file's zeros
      m = new Float32Array(Math.min(blockFloats, total));
      v = withV ? new Float32Array(m.length) : undefined;
      if (v) {
        v.fill(vInit);
        for (let at = 0; at < total; at += v.length) writeAll(fd, v.subarray(0, Math.min(v.length, total - at)), bytes + at * 4);
      }
    } catch (e) {
      closeSync(fd);
      rmSync(path, { force: true });
      throw e;
    }
    // Unlinked at once: the open descriptor keeps the data, and a process that dies leaves no file behind.
    rmSync(path, { force: true });
    const base = (which: 'm' | 'v') => {
      if (which === 'v' && !withV) throw new Error('this optimiser keeps no second moment');
      return which === 'm' ? 0 : bytes;
    };
    let open = true;
    return {
      total,
      withV,
      forEachBlock(fn) {
        for (let at = 0; at < total; at += m.length) {
          const len = Math.min(m.length, total - at);
          const mb = m.subarray(0, len);
          const vb = v?.subarray(0, len);
          readAll(fd, mb, at * 4);
          if (vb) readAll(fd, vb, bytes + at * 4);
          fn(at, mb, vb);
          writeAll(fd, mb, at * 4);
          if (vb) writeAll(fd, vb, bytes + at * 4);
        }
      },
      read(which, off, n) {
        const out = new Float32Array(n);
        readAll(fd, out, base(which) + off * 4);
        return out;
      },
      write(which, off, data) {
        writeAll(fd, data, base(which) + off * 4);
      },
      dispose() {
        if (!open) return;
        open = false;
        closeSync(fd);
      },
    };
  };
}

function readAll(fd: number, into: Float32Array, pos: number): void {
  const b = new Uint8Array(into.buffer, into.byteOffset, into.byteLength);
  for (let off = 0; off < b.length; ) {
    const got = readSync(fd, b, off, b.length - off, pos + off);
    if (got === 0) throw new Error(`server-optimiser moments file ends early (at byte ${pos + off})`);
    off += got;
  }
}

function writeAll(fd: number, from: Float32Array, pos: number): void {
  const b = new Uint8Array(from.buffer, from.byteOffset, from.byteLength);
  for (let off = 0; off < b.length; ) off += writeSync(fd, b, off, b.length - off, pos + off);
}
