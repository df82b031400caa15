/**
 * The round-level glue of secure aggregation, in one process: the coordinator's session (phases, timers,
 * dropouts, failure below t) with the library's real clients, the round vector (weighted, quantised delta +
 * weight word), the composed strategy taking the unmasked sum, and the plan rules.
 */
import { describe, expect, it } from 'vitest';
import pino from 'pino';
import { SecAggClient } from '../../shared/privacy/secagg/client.ts';
import { asForwarded, asRoster, asUnmaskRequest, decodeRoundSum, encodeRoundVector, toJson, type RoundSecAgg } from '../../shared/privacy/secagg/wire.ts';
import { SecAggRound, SecAggRefused, type SecAggResult } from '../../coordinator/secagg/session.ts';
import { ComposedStrategy, acceptsSums } from '../../coordinator/aggregation/composed.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { parsePlan } from '../../shared/plan/load.ts';

const log = pino({ level: 'silent' });
const L = 1000;

function rand(seed: number, n: number, amp: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 2 ** 32) * 2 - 1) * amp;
  }
  return out;
}

type Drop = 'none' | 'before-masked' | 'after-masked' | 'before-advertise';

/** Runs a session with real clients; `drops[i]` says where site i stops. */
async function session(drops: Drop[], threshold = 2, neighbours?: number) {
  const sites = drops.map((_, i) => `site-${String.fromCharCode(97 + i)}`);
  const sa: RoundSecAgg = { id: 0, threshold, clip: 1, maxWeight: 100, sites: sites.length, vectorLength: L + 1 };
  let result: SecAggResult | undefined;
  let failure: string | undefined;
  const masked = new Map<string, Uint32Array>();
  const s = new SecAggRound({
    round: 1, sites, threshold, neighbours, vectorLength: L + 1, phaseMs: 100, session: 'test-session', log,
    onResult: (r) => { result = r; },
    onFailure: (r) => { failure = r; },
    onMasked: (site, y) => masked.set(site, Uint32Array.from(y)),
  });
  const deltas = sites.map((_, i) => rand(i + 1, L, 0.05));
  const weights = sites.map((_, i) => 3 + i);
  const vectors = sites.map((_, i) => encodeRoundVector(deltas[i]!, weights[i]!, { ...sa, id: i + 1 }));
  const runSite = async (i: number) => {
    const site = sites[i]!;
    const me = new SecAggClient(s.ids.get(site)!);
    if (drops[i] === 'before-advertise') return;
    const adv = me.advertise();
    const roster = asRoster(await s.advertise(site, toJson({ cPk: adv.cPk, sPk: adv.sPk })));
    const fwd = asForwarded(await s.shareKeys(site, toJson({ sealed: me.shareKeys(roster).sealed })));
    if (drops[i] === 'before-masked') return;
    const y = me.maskedInput(fwd, vectors[i]!).y;
    const bytes = Buffer.from(y.buffer, y.byteOffset, y.byteLength);
    // Two pieces, in order, as the agent sends a vector over 2 MiB.
    expect(await s.maskedPiece(site, 0, bytes.subarray(0, 400))).toBe('');
    const req = asUnmaskRequest(await s.maskedPiece(site, 100, bytes.subarray(400)));
    if (drops[i] === 'after-masked') return;
    const un = me.unmask(req);
    await s.unmask(site, toJson({ selfMaskShares: un.selfMaskShares, keyShares: un.keyShares }));
  };
  const settled = await Promise.allSettled(sites.map((_, i) => runSite(i)));
  await new Promise((r) => setTimeout(r, 250));
  return { s, result, failure, settled, deltas, weights, vectors, sites, sa, masked };
}

function expectedSum(idx: number[], deltas: Float32Array[], weights: number[]): { sum: Float32Array; w: number } {
  const sum = new Float32Array(L);
  let w = 0;
  for (const i of idx) {
    for (let j = 0; j < L; j++) sum[j]! += weights[i]! * deltas[i]![j]!;
    w += weights[i]!;
  }
  return { sum, w };
}

describe('secure aggregation session (coordinator glue) with real clients', () => {
  it('all three sites: the unmasked sum is Σ wᵢΔᵢ (up to quantisation) and Σ wᵢ exactly; masked inputs look uniform', async () => {
    const r = await session(['none', 'none', 'none']);
    expect(r.failure).toBeUndefined();
    expect(r.result!.survivors).toEqual(r.sites);
    const d = decodeRoundSum(r.result!.sum, r.sa);
    const e = expectedSum([0, 1, 2], r.deltas, r.weights);
    expect(d.weight).toBe(e.w);
    let maxErr = 0;
    for (let j = 0; j < L; j++) maxErr = Math.max(maxErr, Math.abs(d.weightedDelta[j]! - e.sum[j]!));
    expect(maxErr).toBeLessThan(1e-4);
    // A masked vector shares (almost) no words with the plain encoding, and its words spread over the whole ring.
    const y = r.masked.get('site-a')!;
    let same = 0;
    let mean = 0;
    for (let j = 0; j < L; j++) {
      if (y[j] === r.vectors[0]![j]) same++;
      mean += y[j]! / 2 ** 32 / L;
    }
    expect(same).toBeLessThan(3);
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.05);
    expect(r.s.phase).toBe('done');
  });

  it('a site that drops after sharing keys, before masking: the round closes with the other two, its pair masks removed', async () => {
    const r = await session(['none', 'before-masked', 'none']);
    expect(r.failure).toBeUndefined();
    expect(r.result!.survivors).toEqual(['site-a', 'site-c']);
    expect(r.result!.dropped).toEqual(['site-b']);
    const d = decodeRoundSum(r.result!.sum, r.sa);
    const e = expectedSum([0, 2], r.deltas, r.weights);
    expect(d.weight).toBe(e.w);
    for (let j = 0; j < L; j += 97) expect(d.weightedDelta[j]).toBeCloseTo(e.sum[j]!, 4);
  });

  it('a site that drops after sending its masked input: its input counts, its self mask is rebuilt from t shares', async () => {
    const r = await session(['none', 'none', 'after-masked']);
    expect(r.failure).toBeUndefined();
    expect(r.result!.survivors).toEqual(r.sites);
    const d = decodeRoundSum(r.result!.sum, r.sa);
    const e = expectedSum([0, 1, 2], r.deltas, r.weights);
    expect(d.weight).toBe(e.w);
    for (let j = 0; j < L; j += 97) expect(d.weightedDelta[j]).toBeCloseTo(e.sum[j]!, 4);
  });

  it('a site that never advertises (e.g. died while training) is left out after phaseMs once t have advertised', async () => {
    const r = await session(['before-advertise', 'none', 'none']);
    expect(r.failure).toBeUndefined();
    expect(r.result!.survivors).toEqual(['site-b', 'site-c']);
  });

  it('fewer than t sites left: the session fails with a reason that says so, and waiting calls are refused', async () => {
    const r = await session(['none', 'before-masked', 'before-masked']);
    expect(r.result).toBeUndefined();
    expect(r.failure).toMatch(/phase 'mask'.*only 1 client\(s\) masked inputs, fewer than the threshold 2/);
    expect(r.s.phase).toBe('failed');
    const rejected = r.settled.filter((x) => x.status === 'rejected');
    expect(rejected.length).toBe(1);
    expect(((rejected[0] as PromiseRejectedResult).reason as Error).message).toMatch(/fewer than the threshold 2/);
  });

  it('refuses strangers, repeats, out-of-phase and out-of-order messages with a reason', async () => {
    const s = new SecAggRound({ round: 4, sites: ['a', 'b', 'c'], threshold: 2, vectorLength: 10, phaseMs: 1000, session: 'x', log, onResult: () => undefined, onFailure: () => undefined });
    const adv = new SecAggClient(1).advertise();
    await expect(s.advertise('zz', toJson({ cPk: adv.cPk, sPk: adv.sPk }))).rejects.toThrow(/not in round 4's secure-aggregation session/);
    await expect(s.advertise('a', '{"cPk":"AAAA","sPk":"AAAA"}')).rejects.toThrow(/cPk: must decode to 32 bytes/);
    await expect(s.shareKeys('a', '{"sealed":[]}')).rejects.toThrow(/phase 'advertise', not 'share'/);
    const waiting = s.advertise('a', toJson({ cPk: adv.cPk, sPk: adv.sPk })).catch((e: Error) => e.message);
    await expect(s.advertise('a', toJson({ cPk: adv.cPk, sPk: adv.sPk }))).rejects.toThrow(/already answered/);
    expect(() => s.maskedPiece('b', 0, Buffer.alloc(4))).toThrow(SecAggRefused);
    s.abort('test over');
    expect(s.phase).toBe('failed');
    expect(await waiting).toMatch(/round 4's secure aggregation failed: test over/);
  });
});

describe('the composed strategy takes the unmasked sum', () => {
  const specs = [{ name: 'w', shape: [4], dtype: 'F32' as const }];
  const base = makeBundle([{ name: 'w', dtype: 'F32', shape: [4], data: Float32Array.from([1, 2, 3, 4]) }]);
  const sum = makeBundle([{ name: 'w', dtype: 'F32', shape: [4], data: Float32Array.from([10, -10, 0, 5]) }]);
  const cfg = (extra: string) => parsePlan(`minSites: 2\naggregation: { secureAggregation: { enabled: true }${extra} }\n`).aggregation;

  it('plain weighted mean: base + Σ wᵢΔᵢ / Σ wᵢ', () => {
    const a = new ComposedStrategy(cfg('')).begin(base, specs, { expected: 3 });
    expect(acceptsSums(a)).toBe(true);
    if (!acceptsSums(a)) return;
    a.addSum(sum, 5, 3);
    expect([...a.finish().get('w')!.data]).toEqual([3, 0, 3, 5]);
  });

  it('DP: noise on the sum (of site-clipped deltas), divided by the sites asked', () => {
    const a = new ComposedStrategy(cfg(', dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1.0e-5 }'), { gaussian: (o) => o.fill(1) }).begin(base, specs, { expected: 5 });
    if (!acceptsSums(a)) throw new Error('no addSum');
    a.addSum(sum, 3, 3);
    expect([...a.finish().get('w')!.data].map((x) => Math.round(x * 1e5) / 1e5)).toEqual([1 + 11 / 5, 2 - 9 / 5, 3 + 1 / 5, 4 + 6 / 5].map((x) => Math.round(x * 1e5) / 1e5));
  });

  it('a server optimiser applies to the unmasked mean delta', () => {
    const a = new ComposedStrategy(cfg(', serverOptimizer: { type: fedadam, lr: 0.1 }')).begin(base, specs, { expected: 3 });
    if (!acceptsSums(a)) throw new Error('no addSum');
    a.addSum(sum, 5, 3);
    const out = [...a.finish().get('w')!.data];
    expect(out[0]).toBeGreaterThan(1);
    expect(out[1]).toBeLessThan(2);
    expect(out[2]).toBeCloseTo(3, 5);
  });
});

describe('plan rules for secure aggregation', () => {
  const bad = (agg: string, top = 'minSites: 2') => () => parsePlan(`${top}\naggregation: { secureAggregation: { enabled: true }, ${agg} }\n`);
  it('refuses median / trimmed mean, per-update norm checks and clipping, t above minSites, and compressed uploads', () => {
    expect(bad('strategy: median')).toThrow(/needs strategy fedavg/);
    expect(bad('strategy: trimmed-mean')).toThrow(/needs strategy fedavg/);
    expect(bad('validation: { maxNorm: 3 }')).toThrow(/cannot check or clip single updates/);
    expect(bad('clipNorm: 3')).toThrow(/cannot check or clip single updates/);
    expect(() => parsePlan('minSites: 2\naggregation: { secureAggregation: { enabled: true, threshold: 3 } }\n')).toThrow(/threshold must not exceed minSites/);
    expect(() => parsePlan('minSites: 2\ncompression: { update: int8 }\naggregation: { secureAggregation: { enabled: true } }\n')).toThrow(/masked 32-bit ring words/);
    expect(() => parsePlan('minSites: 3\nsitesPerRound: 1\naggregation: { secureAggregation: { enabled: true, threshold: 2 } }\n')).toThrow(/sitesPerRound must be 0 \(all\) or at least/);
  });
  it('is off by default and leaves other plans alone', () => {
    const p = parsePlan('minSites: 2\naggregation: { strategy: median }\n');
    expect(p.aggregation.secureAggregation.enabled).toBe(false);
  });
});
