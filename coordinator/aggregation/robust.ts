/**
 * Coordinate-wise median and β-trimmed mean (Yin et al. 2018). Both need every update of the round at
 * once, so each update is spilled to disk as a flat float32 file when it is added, and finish() walks the
 * model in coordinate blocks: for each block it reads that range from every spill file into one n × block
 * matrix (bounded by `blockBytes`, default 64 MiB) and reduces each column.
 *
 * Cost: memory = output + the block matrix + that block of the base (≈ 1 model + 64 MiB, whatever the site
 * count; the base is read per block, base-blocks.ts); disk =
 * one model per update (written once, read once, deleted at finish). A block's columns are reduced by the
 * native addon when it is built (robustColumnsNative: a sorting network over all columns of a tile at once, in
 * vector code; on the stored float32 values when every row shares one scale and coef) and else by robustColumnsJs
 * (quickselect per column); both give exactly the statistics of sorting each column, the trimmed mean summed in
 * increasing order.
 */
import { closeSync, mkdirSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadOneDnnKernels } from '../../shared/engine/onednn-kernels.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import { asBaseBlocks, type BaseBlocks, type BaseLike } from './base-blocks.ts';
import type { DeltaSqLanes } from './validate.ts';

export type RobustRule = { kind: 'median' } | { kind: 'trimmed-mean'; beta: number };

/**
 * Reduces the first `len` columns of `rows` (n rows of `ld` float32 values): per column j the values
 * v_i = scale_i·(rows[i][j] − coef_i·base[j]) in float64, then out[j] = base[j] + median (trim < 0; the mean of the
 * two middle values for even n) or the mean of the values left after dropping the `trim` smallest and largest,
 * summed in increasing order.
 */
export type RobustColumns = (
  rows: Float32Array, n: number, ld: number, len: number, base: Float32Array, scale: Float64Array, coef: Float64Array, trim: number, out: Float32Array,
) => void;

export const robustColumnsJs: RobustColumns = (rows, n, ld, len, base, scale, coef, trim, out) => {
  const col = new Float64Array(n);
  for (let j = 0; j < len; j++) {
    const b = base[j];
    for (let i = 0, at = j; i < n; i++, at += ld) col[i] = scale[i] * (rows[at] - coef[i] * b);
    out[j] = b + (trim < 0 ? medianInPlace(col, n) : trimmedMeanInPlace(col, n, trim));
  }
};

interface RobustAddon {
  robustColumns: RobustColumns;
}

let nativeColumns: RobustColumns | null | undefined;

/** The addon's robustColumns when the oneDNN addon is built and has it (an older build has not), else undefined. */
export function robustColumnsNative(): RobustColumns | undefined {
  if (nativeColumns === undefined) {
    const addon = loadOneDnnKernels().kernels?.addon as Partial<RobustAddon> | undefined;
    nativeColumns = typeof addon?.robustColumns === 'function' ? addon.robustColumns.bind(addon) : null;
  }
  return nativeColumns ?? undefined;
}

interface Spilled {
  path: string;
  /** Who sent it, so an update that could not be stored can be taken out again. */
  site?: string;
  /** Clip factor applied to the delta. */
  scale: number;
  isDelta: boolean;
}

/** Floats written per write() by addMeasured: measured first, so the spill copies them from cache (256 KiB). */
export const SPILL_CHUNK_FLOATS = 64 * 1024;

export class RobustCombiner {
  private readonly spilled: Spilled[] = [];
  private readonly dir: string;
  /** Names spill files: one taken out leaves a gap, never a name used twice. */
  private nextFile = 0;

  constructor(
    private readonly rule: RobustRule,
    private readonly offsets: ReadonlyMap<string, { off: number; n: number }>,
    private readonly total: number,
    opts: { spillDir?: string; blockBytes?: number; columns?: RobustColumns } = {},
  ) {
    this.columns = opts.columns ?? robustColumnsNative() ?? robustColumnsJs;
    const parent = opts.spillDir ?? tmpdir();
    mkdirSync(parent, { recursive: true });
    this.dir = mkdtempSync(join(parent, 'round-'));
    this.blockBytes = opts.blockBytes ?? 64 * 1024 * 1024;
  }

  private readonly blockBytes: number;
  private readonly columns: RobustColumns;

  get count(): number {
    return this.spilled.length;
  }

  /** Writes the update's tensors, in spec order, to this round's spill directory. */
  add(update: TensorBundle, scale: number, isDelta: boolean, site?: string): void {
    const path = join(this.dir, `${this.nextFile++}.f32`);
    const fd = openSync(path, 'w', 0o600);
    try {
      for (const [name] of this.offsets) {
        const d = update.get(name)!.data;
        const b = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
        for (let off = 0; off < b.length; ) off += writeSync(fd, b, off, b.length - off);
      }
    } catch (e) {
      closeSync(fd);
      rmSync(path, { force: true });
      throw e;
    }
    closeSync(fd);
    this.spilled.push({ path, scale, isDelta, site });
  }

  /**
   * add() (scale 1) that measures the update's delta norm on the way, in one read of the update: each chunk is summed
   * into the norm lanes and then written from cache. Returns deltaNorm's result bit for bit (the same lanes, in the
   * same order); non-finite when a value is. The caller decides the verdict and takes a refused update out with
   * removeLast().
   */
  addMeasured(update: TensorBundle, isDelta: boolean, base: BaseBlocks | undefined, site: string, lanesOf: DeltaSqLanes): number {
    const path = join(this.dir, `${this.nextFile++}.f32`);
    const fd = openSync(path, 'w', 0o600);
    const lanes = new Float64Array(4);
    let sq = 0;
    try {
      for (const [name, { off, n }] of this.offsets) {
        const d = update.get(name)!.data;
        lanes.fill(0);
        for (let at = 0; at < n; at += SPILL_CHUNK_FLOATS) {
          const len = Math.min(SPILL_CHUNK_FLOATS, n - at);
          const x = d.subarray(at, at + len);
          lanesOf(x, isDelta || !base ? undefined : base.block(off + at, len), lanes);
          const b = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
          for (let w = 0; w < b.length; ) w += writeSync(fd, b, w, b.length - w);
        }
        sq += lanes[0] + lanes[1] + lanes[2] + lanes[3];
      }
    } catch (e) {
      closeSync(fd);
      rmSync(path, { force: true });
      throw e;
    }
    closeSync(fd);
    this.spilled.push({ path, scale: 1, isDelta, site });
    return Math.sqrt(sq);
  }

  /** Takes out the update added last (refused after it was spilled). */
  removeLast(): void {
    const s = this.spilled.pop();
    if (s) rmSync(s.path, { force: true });
  }

  /** Takes out `site`'s update (it could not be stored); false when there is none. */
  remove(site: string): boolean {
    const at = this.spilled.findIndex((s) => s.site === site);
    if (at < 0) return false;
    rmSync(this.spilled[at].path, { force: true });
    this.spilled.splice(at, 1);
    return true;
  }

  /** out[j] = base[j] + rule over i of scale_i · δ_ij, block by block; then deletes the spill files. */
  finish(base: BaseLike, out: Float32Array): void {
    const blocks = asBaseBlocks(base)!;
    const n = this.spilled.length;
    if (n === 0) throw new Error('no updates to aggregate');
    const block = Math.max(1024, Math.floor(this.blockBytes / 4 / n));
    const rows = new Float32Array(n * block);
    const rowBytes = new Uint8Array(rows.buffer);
    const fds = this.spilled.map((s) => openSync(s.path, 'r'));
    const trim = this.rule.kind === 'trimmed-mean' ? trimCount(n, this.rule.beta) : -1;
    const scale = Float64Array.from(this.spilled, (s) => s.scale);
    // What to subtract from each stored value, per unit of base: 1 for weights, 0 for deltas.
    const baseCoef = Float64Array.from(this.spilled, (s) => (s.isDelta ? 0 : 1));
    try {
      for (let a = 0; a < this.total; a += block) {
        const len = Math.min(block, this.total - a);
        for (let i = 0; i < n; i++) readFully(fds[i], rowBytes, i * block * 4, len * 4, a * 4);
        this.columns(rows, n, block, len, blocks.block(a, len), scale, baseCoef, trim, out.subarray(a, a + len));
      }
    } finally {
      for (const fd of fds) closeSync(fd);
      this.discard();
    }
  }

  discard(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Values dropped at each end: ⌊β·n⌋, leaving at least one. */
export function trimCount(n: number, beta: number): number {
  return Math.min(Math.floor(beta * n), Math.floor((n - 1) / 2));
}

function readFully(fd: number, buf: Uint8Array, at: number, len: number, pos: number): void {
  for (let got = 0; got < len; ) {
    const r = readSync(fd, buf, at + got, len - got, pos + got);
    if (r === 0) throw new Error(`spill file ended early at byte ${pos + got}; the spill directory was changed while a round was open`);
    got += r;
  }
}

/** Rearranges a[lo..hi] so a[k] is the k-th smallest, smaller ones before it, larger after (Hoare quickselect). */
function select(a: Float64Array, lo: number, hi: number, k: number): void {
  while (hi > lo) {
    if (hi - lo < 16) {
      for (let i = lo + 1; i <= hi; i++) {
        const v = a[i];
        let j = i - 1;
        while (j >= lo && a[j] > v) {
          a[j + 1] = a[j];
          j--;
        }
        a[j + 1] = v;
      }
      return;
    }
    const mid = (lo + hi) >> 1;
    // median of three as pivot
    if (a[mid] < a[lo]) swap(a, mid, lo);
    if (a[hi] < a[lo]) swap(a, hi, lo);
    if (a[hi] < a[mid]) swap(a, hi, mid);
    const p = a[mid];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < p) i++;
      while (a[j] > p) j--;
      if (i <= j) {
        swap(a, i, j);
        i++;
        j--;
      }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else return;
  }
}

function swap(a: Float64Array, i: number, j: number): void {
  const t = a[i];
  a[i] = a[j];
  a[j] = t;
}

export function medianInPlace(a: Float64Array, n: number): number {
  const m = n >> 1;
  select(a, 0, n - 1, m);
  if (n % 2) return a[m];
  let lowerMax = a[0];
  for (let i = 1; i < m; i++) if (a[i] > lowerMax) lowerMax = a[i];
  return (lowerMax + a[m]) / 2;
}

export function trimmedMeanInPlace(a: Float64Array, n: number, k: number): number {
  if (k > 0) {
    select(a, 0, n - 1, k);
    select(a, k, n - 1, n - 1 - k);
  }
  // The kept values in increasing order, so the sum rounds as the native reduction's does.
  a.subarray(k, n - k).sort();
  let s = 0;
  for (let i = k; i < n - k; i++) s += a[i];
  return s / (n - 2 * k);
}
