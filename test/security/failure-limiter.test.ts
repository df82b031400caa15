/**
 * The per-peer failure limiter on its own (coordinator/auth/failure-limiter.ts), with a hand-driven clock:
 * the token bucket, the collapsing of warn lines, peer addresses and the memory bound.
 */
import { describe, expect, it } from 'vitest';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { FailureLimiter, peerAddress } from '../../coordinator/auth/failure-limiter.ts';

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

const fail = { method: '/medfl.v1.Federation/Heartbeat', code: 'UNAUTHENTICATED', reason: 'bad token' };

describe('FailureLimiter', () => {
  it('lets `burst` failures through, then refuses the peer until a token has refilled', () => {
    const { limiter, clock } = setup({ burst: 3, refillPerMinute: 6 });
    for (let i = 0; i < 3; i++) {
      expect(limiter.refusal('10.0.0.1:4000', fail.method)).toBeUndefined();
      limiter.failure(`10.0.0.1:${4000 + i}`, fail);
    }
    expect(limiter.refusal('10.0.0.1:5000', fail.method)).toMatch(/too many failed authentication or enrolment calls from 10\.0\.0\.1; .* about 10 s/);
    // Another address is not affected.
    expect(limiter.refusal('10.0.0.2:4000', fail.method)).toBeUndefined();
    clock.advance(9_000);
    expect(limiter.refusal('10.0.0.1:4000', fail.method)).toBeDefined();
    clock.advance(1_000); // 6 per minute: one token every 10 s
    expect(limiter.refusal('10.0.0.1:4000', fail.method)).toBeUndefined();
    limiter.failure('10.0.0.1:4000', fail);
    expect(limiter.refusal('10.0.0.1:4000', fail.method)).toBeDefined();
    limiter.close();
  });

  it('collapses 2,000 failures into a full line, a refusing line and one summary per window', () => {
    const { limiter, lines, clock } = setup({ burst: 20, refillPerMinute: 12, summaryMs: 60_000 });
    let refused = 0;
    for (let i = 0; i < 2000; i++) {
      if (limiter.refusal('192.0.2.7:1234', fail.method) !== undefined) refused++;
      else limiter.failure('192.0.2.7:1234', { ...fail, reason: `bad token ${i}` });
      clock.advance(10);
    }
    // 19.99 s passed: the 20 of the burst and the 3 tokens refilled at 5, 10 and 15 s were used; the rest was refused unread.
    expect(2000 - refused).toBe(23);
    expect(lines.map((l) => l.msg)).toEqual(['site call rejected', 'too many failed calls from this address: refusing its calls until the limit refills']);
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
    expect(limiter.refusal('10.9.9.9:1', fail.method)).toMatch(/about 2 s/);
    limiter.close();
  });

  it('refuses nonsensical options', () => {
    expect(() => setup({ burst: 0 })).toThrow(/burst must be a positive number/);
    expect(() => setup({ refillPerMinute: Number.NaN })).toThrow(/refillPerMinute/);
  });
});
