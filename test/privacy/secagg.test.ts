import { describe, expect, it } from 'vitest';
import { SecAggClient, SecAggServer, neighboursOf, quantizer, shamir } from '../../shared/privacy/secagg/index.ts';
import type { UnmaskRequest } from '../../shared/privacy/secagg/messages.ts';

function inputs(n: number, len: number, seed = 1): Float32Array[] {
  let s = seed;
  const rnd = () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1;
  return Array.from({ length: n }, (_, k) => Float32Array.from({ length: len }, (_, i) => 0.3 * Math.sin(i / 50 + k) + 0.05 * rnd()));
}

interface Drops {
  beforeShare?: number[];
  beforeMask?: number[];
  beforeUnmask?: number[];
}

/** One in-memory session; ids 1..n. Returns the server result and the masked uploads. */
function run(n: number, t: number, xs: Float32Array[], drops: Drops = {}, neighbours?: number) {
  const q = quantizer({ clip: 1, maxSites: n });
  const len = xs[0]!.length;
  const server = new SecAggServer({ threshold: t, vectorLength: len, neighbours });
  const clients = Array.from({ length: n }, (_, i) => new SecAggClient(i + 1));
  for (const c of clients) server.receiveAdvertise(c.advertise());
  const roster = server.roster();
  for (const c of clients) if (!drops.beforeShare?.includes(c.id)) server.receiveShareKeys(c.shareKeys(roster));
  const fwd = server.forwardShares();
  const masked = new Map<number, Uint32Array>();
  for (const c of clients) {
    if (drops.beforeShare?.includes(c.id) || drops.beforeMask?.includes(c.id)) continue;
    const m = c.maskedInput(fwd.get(c.id)!, q.encode(xs[c.id - 1]!));
    masked.set(c.id, m.y);
    server.receiveMaskedInput(m);
  }
  const req = server.unmaskRequest();
  for (const c of clients) if (req.survivors.includes(c.id) && !drops.beforeUnmask?.includes(c.id)) server.receiveUnmask(c.unmask(req));
  return { q, server, clients, req, masked, result: server.finish() };
}

describe('secure aggregation', () => {
  it('with nobody dropping, the unmasked sum equals the sum of the inputs up to quantisation', () => {
    const xs = inputs(5, 2000);
    const { q, result } = run(5, 3, xs);
    const got = q.decode(result.sum);
    // Rounding: 0.5/scale per site, plus the float32 the decoded sum is returned in.
    for (let i = 0; i < got.length; i++) {
      const want = xs.reduce((a, x) => a + x[i]!, 0);
      expect(Math.abs(got[i]! - want)).toBeLessThanOrEqual((5 * 0.5) / q.scale + 1.2e-7 * Math.max(1, Math.abs(want)));
    }
    expect(result.dropped).toEqual([]);
  });

  it('recovers the exact sum of survivors when one site drops before masking and one after sending its masked input', () => {
    const xs = inputs(6, 3000, 7);
    const { q, result, req } = run(6, 3, xs, { beforeMask: [5], beforeUnmask: [2] });
    expect(req.survivors).toEqual([1, 2, 3, 4, 6]);
    expect(result.dropped).toEqual([5]);
    // Exact in the ring: the sum of the survivors' encoded inputs.
    const encoded = [1, 2, 3, 4, 6].map((id) => q.encode(xs[id - 1]!));
    const expected = new Uint32Array(3000);
    for (const e of encoded) for (let i = 0; i < e.length; i++) expected[i] = (expected[i]! + e[i]!) >>> 0;
    expect(Buffer.from(result.sum.buffer).equals(Buffer.from(expected.buffer))).toBe(true);
    const dec = q.decode(result.sum);
    for (let i = 0; i < 3000; i += 97) expect(Math.abs(dec[i]! - [1, 2, 3, 4, 6].reduce((a, id) => a + xs[id - 1]![i]!, 0))).toBeLessThan(5 / q.scale + 3e-7);
  });

  it('a site that drops before sharing keys is simply left out of the masks', () => {
    const xs = inputs(4, 500, 3);
    const { q, result } = run(4, 2, xs, { beforeShare: [3] });
    const dec = q.decode(result.sum);
    for (let i = 0; i < 500; i++) expect(Math.abs(dec[i]! - (xs[0]![i]! + xs[1]![i]! + xs[3]![i]!))).toBeLessThan(3 / q.scale + 3e-7);
  });

  it("a single masked upload is statistically unrelated to the site's update", () => {
    const len = 1 << 20;
    const xs = inputs(3, len, 11);
    const { q, masked } = run(3, 2, xs);
    const x = q.encode(xs[0]!);
    const y = masked.get(1)!;
    // Pearson correlation between the signed fixed-point input and the masked ring values.
    let sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
    for (let i = 0; i < len; i++) {
      const a = x[i]! | 0, b = y[i]!;
      sx += a; sy += b; sxx += a * a; syy += b * b; sxy += a * b;
    }
    const cov = sxy / len - (sx / len) * (sy / len);
    const r = cov / Math.sqrt((sxx / len - (sx / len) ** 2) * (syy / len - (sy / len) ** 2));
    expect(Math.abs(r)).toBeLessThan(0.01); // ~ 10 standard errors (1/√n ≈ 0.001)
    // Uniformity over the ring: chi-square of the top byte over 256 bins (df 255, sd ≈ 22.6).
    const chi = (v: Uint32Array) => {
      const bins = new Float64Array(256);
      for (let i = 0; i < v.length; i++) bins[v[i]! >>> 24]++;
      const e = v.length / 256;
      return bins.reduce((a, o) => a + (o - e) ** 2 / e, 0);
    };
    expect(chi(y)).toBeLessThan(255 + 6 * 22.6);
    expect(chi(x)).toBeGreaterThan(100_000); // the input itself is far from uniform: the test can tell
  });

  it('the server cannot unmask with fewer than t shares', () => {
    const xs = inputs(5, 100, 5);
    const q = quantizer({ clip: 1, maxSites: 5 });
    const server = new SecAggServer({ threshold: 4, vectorLength: 100 });
    const clients = Array.from({ length: 5 }, (_, i) => new SecAggClient(i + 1));
    for (const c of clients) server.receiveAdvertise(c.advertise());
    const roster = server.roster();
    for (const c of clients) server.receiveShareKeys(c.shareKeys(roster));
    const fwd = server.forwardShares();
    for (const c of clients) server.receiveMaskedInput(c.maskedInput(fwd.get(c.id)!, q.encode(xs[c.id - 1]!)));
    const req = server.unmaskRequest();
    const responses = clients.map((c) => c.unmask(req));
    for (const r of responses.slice(0, 3)) server.receiveUnmask(r);
    expect(() => server.finish()).toThrow(/fewer than the threshold 4/);
    // And at the level of the secret sharing: t − 1 shares interpolate to something else entirely.
    const secret = Buffer.alloc(32, 7);
    const shares = shamir.split(secret, 4, [1, 2, 3, 4, 5]);
    expect(shamir.combine(shares.slice(1, 5), 32).equals(secret)).toBe(true);
    expect(() => shamir.combine(shares.slice(0, 3), 32)).toThrow(/do not reconstruct/);
  });

  it('clients refuse an unmask request that would expose a survivor, and out-of-order steps', () => {
    const q = quantizer({ clip: 1, maxSites: 3 });
    const server = new SecAggServer({ threshold: 2, vectorLength: 10 });
    const clients = [1, 2, 3].map((id) => new SecAggClient(id));
    for (const c of clients) server.receiveAdvertise(c.advertise());
    const roster = server.roster();
    expect(() => clients[0]!.maskedInput({ type: 'forwarded-shares', to: 1, sharers: [1, 2], sealed: [] }, new Uint32Array(10))).toThrow(/phase 'shared'/);
    for (const c of clients) server.receiveShareKeys(c.shareKeys(roster));
    const fwd = server.forwardShares();
    for (const c of clients) server.receiveMaskedInput(c.maskedInput(fwd.get(c.id)!, q.encode(new Float32Array(10))));
    const tooFew: UnmaskRequest = { type: 'unmask-request', survivors: [1] };
    expect(() => clients[0]!.unmask(tooFew)).toThrow(/fewer than the threshold/);
    // A response never holds both kinds of share for one client.
    const r = clients[0]!.unmask({ type: 'unmask-request', survivors: [1, 2] });
    expect(r.selfMaskShares.map((s) => s.of)).toEqual([1, 2]);
    expect(r.keyShares.map((s) => s.of)).toEqual([3]);
  });

  it('SecAgg+: a random k-regular ring; k pair masks and shares per site; exact with drop-outs before and after masking', () => {
    const n = 20, k = 6, t = 4;
    const server = new SecAggServer({ threshold: t, vectorLength: 8, neighbours: k });
    const clients = Array.from({ length: n }, (_, i) => new SecAggClient(i + 1));
    for (const c of clients) server.receiveAdvertise(c.advertise());
    const roster = server.roster();
    const ids = roster.members.map((m) => m.id);
    for (const id of ids) {
      const nb = neighboursOf(id, ids, roster.graph);
      expect(nb).toHaveLength(k);
      for (const v of nb) expect(neighboursOf(v, ids, roster.graph)).toContain(id); // symmetric
    }
    expect(clients[0]!.shareKeys(roster).sealed).toHaveLength(k);

    const xs = inputs(n, 4000, 13);
    const { q, result } = run(n, t, xs, { beforeMask: [7], beforeUnmask: [12] }, k);
    expect(result.dropped).toEqual([7]);
    const survivors = ids.filter((id) => id !== 7);
    const expected = new Uint32Array(4000);
    for (const id of survivors) {
      const e = q.encode(xs[id - 1]!);
      for (let i = 0; i < e.length; i++) expected[i] = (expected[i]! + e[i]!) >>> 0;
    }
    expect(Buffer.from(result.sum.buffer).equals(Buffer.from(expected.buffer))).toBe(true);
  });

  it("SecAgg+: if too few of a dropped site's neighbours answer, the server cannot unmask", () => {
    const n = 12, k = 4, t = 3;
    const q = quantizer({ clip: 1, maxSites: n });
    const server = new SecAggServer({ threshold: t, vectorLength: 16, neighbours: k });
    const clients = Array.from({ length: n }, (_, i) => new SecAggClient(i + 1));
    for (const c of clients) server.receiveAdvertise(c.advertise());
    const roster = server.roster();
    for (const c of clients) server.receiveShareKeys(c.shareKeys(roster));
    const fwd = server.forwardShares();
    const dropped = 1;
    const nb = neighboursOf(dropped, roster.members.map((m) => m.id), roster.graph);
    for (const c of clients) if (c.id !== dropped) server.receiveMaskedInput(c.maskedInput(fwd.get(c.id)!, q.encode(new Float32Array(16))));
    const req = server.unmaskRequest();
    // Only k − 2 = 2 of its 4 neighbours answer (plus everyone else): fewer than t = 3 shares of its key.
    for (const c of clients) if (c.id !== dropped && !nb.slice(0, 2).includes(c.id)) server.receiveUnmask(c.unmask(req));
    expect(() => server.finish()).toThrow(/share holders answered, fewer than the threshold 3/);
  });

  it('quantiser refuses settings that could wrap the ring', () => {
    expect(() => quantizer({ clip: 1, scale: 2 ** 30, maxSites: 4 })).toThrow(/overflow/);
    const q = quantizer({ clip: 0.5, maxSites: 50 });
    expect(50 * 0.5 * q.scale).toBeLessThan(2 ** 31);
    expect(q.decode(q.encode(Float32Array.of(-2, 0.25, 3)))).toEqual(Float32Array.of(-0.5, Math.round(0.25 * q.scale) / q.scale, 0.5));
  });
});
