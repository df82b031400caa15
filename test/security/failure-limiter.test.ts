/**
 * The per-peer failure limiter on its own (coordinator/auth/failure-limiter.ts), with a hand-driven clock:
 * the token bucket, the collapsing of warn lines, peer addresses and the memory bound.
 */
import { describe, expect, it } from 'vitest';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { FailureLimiter, peerAddress } from '../../coordinator/auth/failure-limiter.ts';
import { METHODS } from '../../shared/protocol/grpc.ts';

function setup(options: ConstructorParameters<typeof FailureLimiter>[1]) {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  let t = 1_000_000;
  const clock = { advance: (ms: number) => void (t += ms) };
  const limiter = new FailureLimiter(pino({ level: 'warn' }, sink), options, () => t);
  return { limiter, lines, clock };
}

const fail = { method: '/medfl.v1.Federation/Heartbeat', code: 'UNAUTHENTICATED', reason: 'bad token', claimant: 'site-a' };

describe('FailureLimiter', () => {
  it('lets `burst` failures of a caller through, then refuses that caller until a token has refilled', () => {
    const { limiter, clock } = setup({ burst: 3, refillPerMinute: 6 });
    for (let i = 0; i < 3; i++) {
      expect(limiter.refusal('10.0.0.1:4000', fail.method, 'site-a')).toBeUndefined();
      limiter.failure(`10.0.0.1:${4000 + i}`, fail);
    }
    expect(limiter.refusal('10.0.0.1:5000', fail.method, 'site-a')).toMatch(/too many failed authentication or enrolment calls from 10\.0\.0\.1 naming this site; .* about 10 s/);
    // Another address is not affected, nor another name at the same address.
    expect(limiter.refusal('10.0.0.2:4000', fail.method, 'site-a')).toBeUndefined();
    expect(limiter.refusal('10.0.0.1:4000', fail.method, 'site-b')).toBeUndefined();
    clock.advance(9_000);
    expect(limiter.refusal('10.0.0.1:4000', fail.method, 'site-a')).toBeDefined();
    clock.advance(1_000); // 6 per minute: one token every 10 s
    expect(limiter.refusal('10.0.0.1:4000', fail.method, 'site-a')).toBeUndefined();
    limiter.failure('10.0.0.1:4000', fail);
    expect(limiter.refusal('10.0.0.1:4000', fail.method, 'site-a')).toBeDefined();
    limiter.close();
  });

  it('collapses 2,000 failures into a full line, a refusing line and one summary per window', () => {
    const { limiter, lines, clock } = setup({ burst: 20, refillPerMinute: 12, summaryMs: 60_000 });
    let refused = 0;
    for (let i = 0; i < 2000; i++) {
      if (limiter.refusal('192.0.2.7:1234', fail.method, 'site-a') !== undefined) refused++;
      else limiter.failure('192.0.2.7:1234', { ...fail, reason: `bad token ${i}` });
      clock.advance(10);
    }
    // 19.99 s passed: the 20 of the burst and the 3 tokens refilled at 5, 10 and 15 s were used; the rest was refused unread.
    expect(2000 - refused).toBe(23);
    expect(lines.map((l) => l.msg)).toEqual(['site call rejected', 'too many failed calls from this address: refusing its failing callers until the limit refills']);
    clock.advance(60_000);
    limiter.flush();
    expect(lines).toHaveLength(3);
    expect(lines[2]).toMatchObject({ msg: 'more failed calls from this address (collapsed into one line)', peer: '192.0.2.7', failures: 22, refusedUnread: refused, lastReason: 'bad token 1500' });
    // After a quiet window the next failure is logged in full again.
    limiter.failure('192.0.2.7:1', fail);
    expect(lines.at(-1)).toMatchObject({ msg: 'site call rejected', peer: '192.0.2.7:1' });
    limiter.close();
  });

  it('forgets peers that are quiet and refilled, and never remembers more than maxPeers', () => {
    const { limiter, clock } = setup({ burst: 2, refillPerMinute: 60, summaryMs: 1000, maxPeers: 100 });
    for (let i = 0; i < 1000; i++) limiter.failure(`10.1.${i >> 8}.${i & 255}:1`, fail);
    expect(limiter.size).toBe(100);
    expect(limiter.callerCount).toBe(100);
    clock.advance(5_000);
    limiter.flush();
    expect(limiter.size).toBe(0);
    limiter.close();
  });

  it('reads the address from grpc-js and node:http2 peer strings', () => {
    expect(peerAddress('127.0.0.1:5555')).toBe('127.0.0.1');
    expect(peerAddress('::ffff:10.2.3.4:5555')).toBe('10.2.3.4');
    expect(peerAddress('::1:5555')).toBe('::1');
    expect(peerAddress('[2001:db8::1]:443')).toBe('2001:db8::1');
    expect(peerAddress('unknown')).toBe('unknown');
  });

  it('keeps the defaults (50 in a burst) for options left undefined, as the CLI passes them', () => {
    const { limiter } = setup({ burst: undefined, refillPerMinute: undefined });
    for (let i = 0; i < 50; i++) limiter.failure('10.9.9.9:1', fail);
    expect(limiter.refusal('10.9.9.9:1', fail.method, 'site-a')).toMatch(/about 2 s/);
    limiter.close();
  });

  it('one failing caller behind a shared NAT address does not lock out the other sites there', () => {
    const { limiter } = setup({ burst: 5, refillPerMinute: 1 });
    const nat = '198.51.100.9';
    // A site with a broken clock fails over and over: it alone is refused.
    for (let i = 0; i < 200; i++) if (limiter.refusal(`${nat}:${i}`, fail.method, 'site-bad') === undefined) limiter.failure(`${nat}:${i}`, { ...fail, claimant: 'site-bad' });
    expect(limiter.refusal(`${nat}:1`, fail.method, 'site-bad')).toBeDefined();
    // Its neighbours are heard: one that authenticated before, and one that never called.
    limiter.success(`${nat}:2`, 'site-good');
    expect(limiter.refusal(`${nat}:3`, fail.method, 'site-good')).toBeUndefined();
    expect(limiter.refusal(`${nat}:4`, fail.method, 'site-new')).toBeUndefined();
    limiter.close();
  });

  it("an impostor using a real site's name from the same address cannot keep that site out; its own failures are answered as refused", () => {
    const { limiter, clock } = setup({ burst: 3, refillPerMinute: 0.1, trustMs: 60_000 });
    const nat = '198.51.100.10';
    limiter.success(`${nat}:1`, 'site-a');
    const answers: (string | undefined)[] = [];
    for (let i = 0; i < 10; i++) {
      // Trusted name: never refused before its token is checked, however many failures were made under it.
      expect(limiter.refusal(`${nat}:9`, fail.method, 'site-a')).toBeUndefined();
      answers.push(limiter.failure(`${nat}:9`, { ...fail, claimant: 'site-a' }));
    }
    // The first `burst` failures get their reason; the rest, already over the limit, the refusal.
    expect(answers.slice(0, 3)).toEqual([undefined, undefined, undefined]);
    for (const a of answers.slice(3)) expect(a).toMatch(/too many failed authentication/);
    // The real site keeps authenticating (every success renews the trust); once trust lapses without a success,
    // the name is held back like any other failing caller.
    clock.advance(30_000);
    limiter.success(`${nat}:2`, 'site-a');
    clock.advance(50_000);
    expect(limiter.refusal(`${nat}:9`, fail.method, 'site-a')).toBeUndefined();
    clock.advance(20_000);
    expect(limiter.refusal(`${nat}:9`, fail.method, 'site-a')).toBeDefined();
    limiter.close();
  });

  it('bounds an address that cycles through invented names, without refusing a name that never failed', () => {
    const { limiter } = setup({ burst: 5, refillPerMinute: 1, addressBurst: 20, addressRefillPerMinute: 2 });
    let heard = 0;
    for (let i = 0; i < 100; i++) {
      const name = `guess-${i % 40}`;
      if (limiter.refusal('203.0.113.5:1', fail.method, name) !== undefined) continue;
      heard++;
      limiter.failure('203.0.113.5:1', { ...fail, claimant: name });
    }
    // 20 (the address burst) as first tries of 20 names, then each of the other 20 names once: a name that never
    // failed is always heard once; a name that failed is held back by the empty address bucket.
    expect(heard).toBe(40);
    expect(limiter.refusal('203.0.113.5:1', fail.method, 'guess-1')).toMatch(/from 203\.0\.113\.5;/);
    expect(limiter.refusal('203.0.113.5:1', fail.method, 'never-failed')).toBeUndefined();
    expect(limiter.refusal('203.0.113.6:1', fail.method, 'guess-1')).toBeUndefined();
    limiter.close();
  });

  it('limits enrolment per address whatever names are claimed, and never refuses a call whose transport cannot name its claim', () => {
    const { limiter } = setup({ burst: 3, refillPerMinute: 1 });
    for (let i = 0; i < 3; i++) {
      expect(limiter.refusal('192.0.2.50:1', METHODS.enroll)).toBeUndefined();
      limiter.failure('192.0.2.50:1', { method: METHODS.enroll, code: 'UNAUTHENTICATED', reason: 'bad token', site: `site-${i}` }, 'enrolment refused');
    }
    expect(limiter.refusal('192.0.2.50:1', METHODS.enroll)).toMatch(/from 192\.0\.2\.50;/);
    // A site call from the same address is another caller; a bulk call that cannot say whom it claims is checked.
    expect(limiter.refusal('192.0.2.50:1', fail.method, 'site-0')).toBeUndefined();
    for (let i = 0; i < 50; i++) limiter.failure('192.0.2.50:2', { method: METHODS.downloadModel, code: 'UNAUTHENTICATED', reason: 'bad token' });
    expect(limiter.refusal('192.0.2.50:2', METHODS.downloadModel)).toBeUndefined();
    limiter.close();
  });

  it('refuses nonsensical options', () => {
    expect(() => setup({ burst: 0 })).toThrow(/burst must be a positive number/);
    expect(() => setup({ refillPerMinute: Number.NaN })).toThrow(/refillPerMinute/);
    expect(() => setup({ burst: 10, addressBurst: 5 })).toThrow(/addressBurst \(5\) must be at least burst/);
  });
});
