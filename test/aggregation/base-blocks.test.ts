/**
 * The round's base model read a block at a time (base-blocks.ts) instead of copied whole: from the model file
 * (model-reader.ts, the coordinator's path) every strategy gives the decoded bundle's round bit for bit; the file
 * is read in blocks, never a whole tensor, and closed when the round ends; the norms split into blocks equal one
 * loop over the tensor bit for bit; the last round's result (views into the strategy's own memory) still works as
 * the next base; a corrupt or mismatched model file is refused before anything is folded.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BASE_BLOCK_FLOATS, baseBlocks, type TensorReader } from '../../coordinator/aggregation/base-blocks.ts';
import { checkedFoldJs } from '../../coordinator/aggregation/checked-fold.ts';
import { ComposedStrategy, type ComposedOptions } from '../../coordinator/aggregation/composed.ts';
import { memoryMoments } from '../../coordinator/aggregation/moments.ts';
import type { RoundBase } from '../../coordinator/aggregation/base-blocks.ts';
import { deltaNorm, deltaNormJs } from '../../coordinator/aggregation/validate.ts';
import { openModelReader } from '../../coordinator/models/model-reader.ts';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { PlanSchema } from '../../shared/plan/schema.ts';
import { makeBundle, type TensorBundle, type TensorSpec } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { mulberry32 } from '../../shared/util/random.ts';

// Past the base block (262,144) and the native fold's chunk (65,536), at lengths that are not multiples of four;
// names out of spec order in the file (safetensors sorts them), so flat blocks cross tensors in a different order.
const SIZES = [5, BASE_BLOCK_FLOATS + 7, 70_001, 3];
const specs: TensorSpec[] = SIZES.map((n, i) => ({ name: `t${3 - i}`, dtype: 'F32', shape: [n] }));
const offsets = new Map<string, { off: number; n: number }>();
specs.reduce((off, s) => (offsets.set(s.name, { off, n: s.shape[0] }), off + s.shape[0]), 0);
const total = SIZES.reduce((a, b) => a + b, 0);

function bundle(seed: number, scale = 1, around?: TensorBundle): TensorBundle {
  const rng = mulberry32(seed);
  return makeBundle(specs.map((s) => ({ name: s.name, dtype: 'F32' as const, shape: [...s.shape], data: Float32Array.from({ length: s.shape[0] }, (_, i) => (around?.get(s.name)?.data[i] ?? 0) + scale * (rng() - 0.5)) })));
}
const flat = (b: TensorBundle): Float32Array => {
  const out = new Float32Array(total);
  for (const s of specs) out.set(b.get(s.name)!.data, offsets.get(s.name)!.off);
  return out;
};
const seeded = (seed: number) => {
  const rng = mulberry32(seed);
  return (o: Float32Array) => {
    for (let i = 0; i < o.length; i++) o[i] = rng() - 0.5;
  };
};

/** A reader that records what it was asked for. */
function recording(inner: TensorReader): TensorReader & { longest: number; reads: number; closed: number } {
  const r = {
    longest: 0,
    reads: 0,
    closed: 0,
    size: (name: string) => inner.size(name),
    read(name: string, from: number, out: Float32Array) {
      r.longest = Math.max(r.longest, out.length);
      r.reads++;
      inner.read(name, from, out);
    },
    close() {
      r.closed++;
      inner.close();
    },
  };
  return r;
}

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'medfl-base-blocks-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const STRATEGIES: [string, Record<string, unknown>, ComposedOptions, boolean][] = [
  ['fedavg (checked, relative norm bound)', {}, {}, false],
  ['fedavg + absolute norm bound', { validation: { maxNorm: 1e9 } }, {}, false],
  ['fedavg, delta uploads', {}, {}, true],
  ['fedavg + clip', { clipNorm: 5 }, {}, false],
  ['fedavg + FedAdam', { serverOptimizer: { type: 'fedadam' } }, { moments: memoryMoments }, false],
  ['fedavg + FedYogi, delta uploads', { serverOptimizer: { type: 'fedyogi' } }, { moments: memoryMoments }, true],
  ['fedavg + DP', { dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } }, {}, false],
  ['median', { strategy: 'median' }, {}, false],
  ['trimmed mean', { strategy: 'trimmed-mean', trimFraction: 0.2 }, {}, true],
];

/** Two rounds (the optimiser carries state), each with the given base; the results, flat. */
function twoRounds(cfg: Record<string, unknown>, opts: ComposedOptions, isDelta: boolean, baseOf: (round: number, b: TensorBundle) => RoundBase): Float32Array[] {
  const s = new ComposedStrategy(PlanSchema.parse({ aggregation: cfg }).aggregation, { spillDir: join(dir, 'spill'), ...opts, gaussian: seeded(5) });
  const outs: Float32Array[] = [];
  for (let round = 0; round < 2; round++) {
    const b = bundle(100 + round);
    const agg = s.begin(baseOf(round, b), specs, { expected: 5, deltaUpdates: isDelta });
    for (let k = 0; k < 5; k++) {
      const u = isDelta ? bundle(10 * round + k, 0.02) : bundle(10 * round + k, 0.02, b);
      const info = { site: `s${k}`, numSamples: 10 + k, isDelta };
      const fused = agg.checkAndAdd?.(u, info);
      if (fused) {
        expect(fused.problem).toBeUndefined();
        continue;
      }
      const v = agg.check(u, info);
      expect(v.problem).toBeUndefined();
      agg.add(u, info, v);
    }
    outs.push(flat(agg.finish()));
  }
  return outs;
}

describe('the base model read in blocks', () => {
  it.each(STRATEGIES)('%s: from its model file, the decoded bundle\'s results bit for bit; read in blocks, closed at the end', (_, cfg, opts, isDelta) => {
    const fromBundle = twoRounds(cfg, opts, isDelta, (_r, b) => b);
    const readers: ReturnType<typeof recording>[] = [];
    const fromFile = twoRounds(cfg, opts, isDelta, (round, b) => {
      const path = join(dir, `base-${round}.safetensors`);
      writeFileSync(path, encodeSafetensors(b));
      const r = recording(openModelReader(path));
      readers.push(r);
      return r;
    });
    for (let round = 0; round < 2; round++) expect(Buffer.from(fromFile[round].buffer).equals(Buffer.from(fromBundle[round].buffer))).toBe(true);
    for (const r of readers) {
      expect(r.reads).toBeGreaterThan(0);
      // Never the 262,151-value tensor at once: a block of it at most (robust rules: their own block size).
      expect(r.longest).toBeLessThanOrEqual(cfg.strategy ? total : BASE_BLOCK_FLOATS);
      expect(r.closed).toBeGreaterThan(0);
    }
  });

  it('a round that is discarded closes the file too; a round that needs no base reads nothing', () => {
    const path = join(dir, 'base.safetensors');
    writeFileSync(path, encodeSafetensors(bundle(1)));
    const s = new ComposedStrategy(PlanSchema.parse({ aggregation: { validation: { maxNorm: 10 } } }).aggregation);
    const r = recording(openModelReader(path));
    const agg = s.begin(r, specs);
    agg.discard!();
    expect(r.closed).toBeGreaterThan(0);
    const plain = new ComposedStrategy(PlanSchema.parse({ aggregation: { validation: { maxNormFactor: 0 } } }).aggregation);
    const r2 = recording(openModelReader(path));
    plain.begin(r2, specs);
    expect(r2.reads).toBe(0);
  });

  it('norms over blocks equal one loop over each tensor, bit for bit (JS and native)', () => {
    const base = bundle(7);
    const u = bundle(8, 0.3, base);
    const b = flat(base);
    // The loop before blocks: four lanes over the whole tensor, the tail into lane 0.
    let want = 0;
    for (const [name, { off, n }] of offsets) {
      const x = u.get(name)!.data;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      const n4 = n - (n % 4);
      let i = 0;
      for (; i < n4; i += 4) {
        const p = x[i] - b[off + i], q = x[i + 1] - b[off + i + 1], r = x[i + 2] - b[off + i + 2], t = x[i + 3] - b[off + i + 3];
        s0 += p * p; s1 += q * q; s2 += r * r; s3 += t * t;
      }
      for (; i < n; i++) s0 += (x[i] - b[off + i]) ** 2;
      want += s0 + s1 + s2 + s3;
    }
    want = Math.sqrt(want);
    const path = join(dir, 'base.safetensors');
    writeFileSync(path, encodeSafetensors(base));
    const fromFile = baseBlocks(openModelReader(path), offsets);
    expect(deltaNormJs(u, false, b, offsets)).toBe(want);
    expect(deltaNormJs(u, false, fromFile, offsets)).toBe(want);
    expect(deltaNorm(u, false, fromFile, offsets)).toBe(want);
    const sums = { sums: new Float64Array(total), foldBlock: () => undefined };
    expect(checkedFoldJs(u, false, fromFile, offsets, sums, 1, 1e6).norm).toBe(want);
    fromFile.close();
  });

  it('the last round\'s result (views into the strategy\'s own sums) works as the next base', () => {
    const cfg = PlanSchema.parse({ aggregation: { validation: { maxNorm: 1e9 } } }).aggregation;
    // Updates are made around `around`, a copy that nothing overwrites.
    const run = (s: ComposedStrategy, base: TensorBundle, around = base) => {
      const agg = s.begin(base, specs);
      for (let k = 0; k < 3; k++) expect(agg.checkAndAdd!(bundle(k + 40, 0.01, around), { site: `s${k}`, numSamples: 3 + k })?.problem).toBeUndefined();
      return agg.finish();
    };
    const a = new ComposedStrategy(cfg);
    const b = new ComposedStrategy(cfg);
    const first = run(a, bundle(3));
    run(b, bundle(3));
    const copy = makeBundle([...first.values()].map((t) => ({ ...t, data: t.data.slice() })));
    // `first` lives in a's sums, which a's next begin() zeroes: the round must not read its base from there.
    const got = flat(run(a, first, copy));
    const want = flat(run(b, copy));
    expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer))).toBe(true);
  });

  it('a model file whose bytes do not match its hash, or that lacks a shared tensor, is refused before anything is folded', () => {
    const models = new ModelFiles(join(dir, 'models'));
    const { hash, path } = models.save(bundle(2), {});
    expect(() => models.reader(hash)).not.toThrow();
    const bytes = encodeSafetensors(bundle(2));
    bytes[bytes.length - 1] ^= 1;
    writeFileSync(path, bytes);
    expect(() => models.reader(hash)).toThrow(/corrupt on disk/);
    const partial = join(dir, 'partial.safetensors');
    writeFileSync(partial, encodeSafetensors(makeBundle([...bundle(2).values()].slice(1))));
    const s = new ComposedStrategy(PlanSchema.parse({ aggregation: {} }).aggregation);
    expect(() => s.begin(openModelReader(partial), specs)).toThrow(/base model lacks shared tensor/);
  });
});
