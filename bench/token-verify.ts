/**
 * Site tokens verified per second: jose's `jwtVerify` (WebCrypto, one promise and thread-pool job per token) against
 * the coordinator's synchronous check (coordinator/auth/ed25519-jwt.ts, `crypto.verify` on the cached KeyObject),
 * in the same process, on the same pre-signed tokens and the same KeyObject, alternating so that both see the same
 * machine load. Reports wall-clock rate and this process's CPU time per token (user + system, all threads: WebCrypto
 * runs on libuv's pool, so its CPU is not on the event loop but is still the coordinator's), and the CPU time of the
 * event loop's own thread per token (Linux, /proc/thread-self/schedstat): the part other calls wait behind.
 *
 *   node --import tsx bench/token-verify.ts [--tokens 2000] [--rounds 5] [--concurrency 1,64]
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { jwtVerify } from 'jose';
import { verify as cryptoVerify } from 'node:crypto';
import { checkEdDsaHeader, checkTimeClaims, decodeCompactJwt, verifyEd25519Jwt } from '../coordinator/auth/ed25519-jwt.ts';
import { CLOCK_TOLERANCE_S } from '../coordinator/auth/interceptor.ts';
import { generateSiteKeyPair, publicKeyFromRaw, signSiteToken } from '../shared/security/site-identity.ts';

const { values: a } = parseArgs({
  options: {
    tokens: { type: 'string', default: '2000' },
    rounds: { type: 'string', default: '5' },
    concurrency: { type: 'string', default: '1,64' },
  },
});
const count = Number(a.tokens);
const rounds = Number(a.rounds);
const concurrencies = a.concurrency.split(',').map(Number);

const pair = generateSiteKeyPair();
const key = publicKeyFromRaw(pair.publicKeyRaw);
const tokens: string[] = [];
for (let i = 0; i < count; i++) tokens.push(await signSiteToken({ siteName: 'bench-site', federationId: 'fed-bench', privateKey: pair.privateKeyPem }));
const options = { algorithms: ['EdDSA'], clockTolerance: CLOCK_TOLERANCE_S };
const nowSec = () => Math.floor(Date.now() / 1000);

/** On-CPU time of the calling (main) thread, ns (Linux: /proc/thread-self/schedstat); wall-clock load does not inflate it. */
function loopThreadCpuNs(): number {
  return Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]);
}

interface Sample {
  perSecond: number;
  cpuUsPerToken: number;
  /** CPU time of the event loop's own thread per token: what other calls queue behind. */
  loopUsPerToken: number;
}

async function measure(run: () => Promise<void> | void): Promise<Sample> {
  const cpu0 = process.cpuUsage();
  const loop0 = loopThreadCpuNs();
  const t0 = process.hrtime.bigint();
  await run();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const loopNs = loopThreadCpuNs() - loop0;
  return { perSecond: count / seconds, cpuUsPerToken: (cpu.user + cpu.system) / count, loopUsPerToken: loopNs / 1000 / count };
}

async function joseAll(concurrency: number): Promise<void> {
  for (let i = 0; i < tokens.length; i += concurrency) {
    await Promise.all(tokens.slice(i, i + concurrency).map((t) => jwtVerify(t, key, options)));
  }
}

/** Node's crypto.verify with a callback: the same OpenSSL call, run on libuv's pool like WebCrypto but without its wrapping. */
async function poolAll(concurrency: number): Promise<void> {
  const at = nowSec();
  for (let i = 0; i < tokens.length; i += concurrency) {
    await Promise.all(
      tokens.slice(i, i + concurrency).map((t) => {
        const jwt = decodeCompactJwt(t);
        checkEdDsaHeader(jwt.header);
        return new Promise<void>((resolve, reject) =>
          cryptoVerify(null, jwt.signingInput, key, jwt.signature, (err, ok) => {
            if (err || !ok) return reject(err ?? new Error('signature'));
            checkTimeClaims(jwt.claims, at, CLOCK_TOLERANCE_S);
            resolve();
          }),
        );
      }),
    );
  }
}

function syncAll(): void {
  const opts = { nowSec: nowSec(), clockToleranceS: CLOCK_TOLERANCE_S };
  for (const t of tokens) verifyEd25519Jwt(t, key, opts);
}

const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
const results = new Map<string, Sample[]>();
const add = (name: string, s: Sample) => results.set(name, [...(results.get(name) ?? []), s]);

// One warm-up pass each, then alternate.
await joseAll(1);
await poolAll(1);
syncAll();
for (let r = 0; r < rounds; r++) {
  for (const c of concurrencies) add(`jose jwtVerify, ${c} at a time`, await measure(() => joseAll(c)));
  for (const c of concurrencies) add(`crypto.verify with a callback (libuv pool), ${c} at a time`, await measure(() => poolAll(c)));
  add('crypto.verify, synchronous (ed25519-jwt.ts)', await measure(syncAll));
}

process.stdout.write(`token-verify — ${count} tokens × ${rounds} rounds, medians; load average ${(await import('node:os')).loadavg().map((l) => l.toFixed(1)).join(' ')}\n\n`);
process.stdout.write('| verifier | tokens/s | CPU µs per token (all threads) | event-loop µs per token |\n|---|---|---|---|\n');
for (const [name, samples] of results) {
  process.stdout.write(`| ${name} | ${Math.round(median(samples.map((s) => s.perSecond)))} | ${median(samples.map((s) => s.cpuUsPerToken)).toFixed(1)} | ${median(samples.map((s) => s.loopUsPerToken)).toFixed(1)} |\n`);
}
