/**
 * Secure-aggregation overhead (shared/privacy/secagg): one in-process session per row, n sites, a
 * vector of L parameters (default 1,048,576), threshold t = ⌊n/2⌋ + 1, one site dropping after it shared
 * its keys (so the server also has to cancel that site's pairwise masks) — the realistic costly case.
 * Each n runs twice: the complete graph (classic SecAgg, t = ⌊n/2⌋ + 1) and SecAgg+ on a random
 * k-regular ring with k = 2⌈log2 n⌉, t = k/2 + 1 (BENCH_PLUS=0 skips it).
 * Sites run one after another in this process, so "per site" times are each site's own work (median and
 * max over the sites); in a federation they run in parallel on their own machines.
 *
 *   npm run bench:secagg                      # n = 10 and 50, L = 2^20
 *   BENCH_SITES=10,50,100 BENCH_PARAMS=4194304 npm run bench:secagg
 *
 * Bytes are for a compact binary encoding of each message (messages.ts wireBytes); the plain
 * comparison is the same vector as float32 (4 B/parameter, what a site uploads without SecAgg today).
 * Extrapolation to 33 M parameters: the masking work is AES-CTR keystream plus a uint32 add per
 * parameter per mask (1 self mask + n − 1 pair masks per site; n self masks + d·(n − d) pair masks at the
 * server for d drop-outs), so it is linear in L at fixed n; the rows scale the measured per-parameter
 * time by 33M / L. Key agreement and Shamir sharing do not depend on L.
 */
import { performance } from 'node:perf_hooks';
import * as os from 'node:os';
import Table from 'cli-table3';
import { SecAggClient, SecAggServer, quantizer, wireBytes } from '../shared/privacy/secagg/index.ts';

const SITES = (process.env.BENCH_SITES ?? '10,50').split(',').map(Number);
const L = Number(process.env.BENCH_PARAMS ?? 1 << 20);
const BIG = 33_000_000;
const ms = (t0: number) => performance.now() - t0;
const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (x: number, d = 0) => x.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });

interface Row {
  n: number;
  /** SecAgg+ degree, or undefined for the complete graph. */
  k?: number;
  t: number;
  setupMs: number[];
  maskMs: number[];
  unmaskMs: number[];
  siteSent: number;
  siteRecv: number;
  serverFoldMs: number;
  serverFinishMs: number;
  serverIn: number;
  serverOut: number;
  exact: boolean;
}

function session(n: number, k?: number): Row {
  const t = k !== undefined ? k / 2 + 1 : Math.floor(n / 2) + 1;
  const q = quantizer({ clip: 1, maxSites: n });
  const x = new Float32Array(L);
  for (let i = 0; i < L; i++) x[i] = Math.sin(i * 0.001) * 0.1;
  const encoded = q.encode(x);
  const server = new SecAggServer({ threshold: t, vectorLength: L, neighbours: k });
  const clients = Array.from({ length: n }, (_, i) => new SecAggClient(i + 1));
  const setupMs = new Array<number>(n).fill(0);
  const maskMs: number[] = [];
  const unmaskMs: number[] = [];
  const sent = new Map<number, number>();
  const recv = new Map<number, number>();
  const add = (m: Map<number, number>, id: number, b: number) => m.set(id, (m.get(id) ?? 0) + b);
  let serverFoldMs = 0;

  for (const c of clients) {
    const t0 = performance.now();
    const m = c.advertise();
    setupMs[c.id - 1]! += ms(t0);
    add(sent, c.id, wireBytes(m));
    server.receiveAdvertise(m);
  }
  const roster = server.roster();
  for (const c of clients) {
    add(recv, c.id, wireBytes(roster));
    const t0 = performance.now();
    const m = c.shareKeys(roster);
    setupMs[c.id - 1]! += ms(t0);
    add(sent, c.id, wireBytes(m));
    server.receiveShareKeys(m);
  }
  const fwd = server.forwardShares();
  const drop = n; // drops after sharing keys, before its masked input
  for (const c of clients) {
    const f = fwd.get(c.id)!;
    add(recv, c.id, wireBytes(f));
    if (c.id === drop) continue;
    const t0 = performance.now();
    const m = c.maskedInput(f, encoded);
    maskMs.push(ms(t0));
    add(sent, c.id, wireBytes(m));
    const t1 = performance.now();
    server.receiveMaskedInput(m);
    serverFoldMs += ms(t1);
  }
  const req = server.unmaskRequest();
  for (const c of clients) {
    if (c.id === drop) continue;
    add(recv, c.id, wireBytes(req));
    const t0 = performance.now();
    const m = c.unmask(req);
    unmaskMs.push(ms(t0));
    add(sent, c.id, wireBytes(m));
    server.receiveUnmask(m);
  }
  const t0 = performance.now();
  const { sum } = server.finish();
  const serverFinishMs = ms(t0);
  let exact = true;
  for (let i = 0; i < L; i += 997) if (sum[i] !== ((encoded[i]! * (n - 1)) >>> 0)) exact = false;
  const ids = clients.filter((c) => c.id !== drop).map((c) => c.id);
  const serverIn = [...sent.values()].reduce((a, b) => a + b, 0);
  const serverOut = [...recv.values()].reduce((a, b) => a + b, 0);
  return {
    n,
    k,
    t,
    setupMs,
    maskMs,
    unmaskMs,
    siteSent: med(ids.map((id) => sent.get(id)!)),
    siteRecv: med(ids.map((id) => recv.get(id)!)),
    serverFoldMs,
    serverFinishMs,
    serverIn,
    serverOut,
    exact,
  };
}

process.stdout.write(`secure aggregation, L = ${fmt(L)} parameters, ${os.cpus().length} cores, load ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}\n`);
/** SecAgg+ degree: the even number ≥ 2·⌈log2 n⌉ (Bell et al. take k = O(log n)). */
const plusDegree = (n: number) => 2 * Math.ceil(Math.log2(n));
const rows: Row[] = [];
for (const n of SITES) {
  process.stdout.write(`  running n = ${n} (complete graph) …\n`);
  rows.push(session(n));
  if (process.env.BENCH_PLUS !== '0' && plusDegree(n) < n) {
    process.stdout.write(`  running n = ${n} (SecAgg+, k = ${plusDegree(n)}) …\n`);
    rows.push(session(n, plusDegree(n)));
  }
}
const label = (r: Row) => (r.k === undefined ? `${r.n}` : `${r.n} (k=${r.k})`);
const plain = 4 * L;
const per = new Table({ head: ['sites n', 't', 'keys+shares ms (med)', 'mask ms (med / max)', 'unmask ms', 'sent B', '× plain', 'received B', `mask s @33M (est.)`] });
for (const r of rows) {
  per.push([
    label(r),
    r.t,
    fmt(med(r.setupMs), 1),
    `${fmt(med(r.maskMs))} / ${fmt(Math.max(...r.maskMs))}`,
    fmt(med(r.unmaskMs), 1),
    fmt(r.siteSent),
    fmt(r.siteSent / plain, 3),
    fmt(r.siteRecv),
    fmt((med(r.maskMs) * BIG) / L / 1000, 1),
  ]);
}
process.stdout.write(`\nper site (plain float32 upload = ${fmt(plain)} B)\n${per.toString()}\n`);
const srv = new Table({ head: ['sites n', 'fold inputs ms (all)', 'unmask ms (1 drop-out)', 'in B (all sites)', 'out B (all sites)', 'in × plain', 'server s @33M (est.)', 'exact'] });
for (const r of rows) {
  srv.push([
    label(r),
    fmt(r.serverFoldMs),
    fmt(r.serverFinishMs),
    fmt(r.serverIn),
    fmt(r.serverOut),
    fmt(r.serverIn / (plain * (r.n - 1)), 3),
    fmt(((r.serverFoldMs + r.serverFinishMs) * BIG) / L / 1000, 1),
    r.exact ? 'yes' : 'NO',
  ]);
}
process.stdout.write(`\nserver\n${srv.toString()}\n`);
if (rows.some((r) => !r.exact)) process.exitCode = 1;
