/**
 * Issue 15: a site whose clock is behind sees "certificate is not yet valid" and should be told to look at its
 * clock. The failure here is real: a coordinator certificate issued two days "ahead" (as a host with a fast clock
 * would issue it), presented by a real TLS server, refused by Node's TLS client with the federation CA pinned.
 */
import { once } from 'node:events';
import * as tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createCertificateAuthority, issueServerCertificate } from '../../shared/security/pki.ts';
import { tlsClockHint } from '../../site-agent/transport/tls-hint.ts';

const DAY = 86_400_000;

afterEach(() => {
  vi.useRealTimers();
});

/** The error message a pinned TLS client gets from a server whose certificates were issued `aheadMs` in the future. */
async function handshakeError(aheadMs: number): Promise<{ message: string; caPem: string }> {
  vi.useFakeTimers({ toFake: ['Date'] });
  vi.setSystemTime(Date.now() + aheadMs);
  const ca = await createCertificateAuthority({ commonName: 'MedFL clock test CA', validDays: 30 });
  const cert = await issueServerCertificate(ca, { validDays: 30 });
  vi.useRealTimers();
  const server = tls.createServer({ key: cert.keyPem, cert: cert.chainPem });
  server.on('tlsClientError', () => undefined);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  try {
    const socket = tls.connect({ host: '127.0.0.1', port: (server.address() as AddressInfo).port, ca: ca.certPem, servername: 'localhost' });
    const [err] = (await once(socket, 'error').catch((e: unknown) => [e])) as [Error];
    socket.destroy();
    return { message: `cannot connect to the coordinator: ${err.message}`, caPem: ca.certPem };
  } finally {
    server.close();
  }
}

describe('the clock hint for TLS failures', () => {
  it('names the local clock, and how far behind the pinned CA it is, for "certificate is not yet valid"', async () => {
    const { message, caPem } = await handshakeError(2 * DAY);
    expect(message).toMatch(/certificate is not yet valid/);
    const now = Date.now();
    const hint = tlsClockHint(message, { now, caPem: () => caPem });
    expect(hint).toContain(`local time ${new Date(now).toISOString()}`);
    expect(hint).toMatch(/site clock is probably behind/);
    expect(hint).toMatch(/NTP/);
    expect(hint).toMatch(/federation CA itself is valid only from .*, 2 day\(s\) after this clock: this clock is behind/);
  });

  it('says nothing about clocks for failures that are not about certificate dates', async () => {
    expect(tlsClockHint('14 UNAVAILABLE: connect ECONNREFUSED 127.0.0.1:7443')).toBeUndefined();
    expect(tlsClockHint('self-signed certificate in certificate chain')).toBeUndefined();
    // A good clock and an expired-looking message: the hint stays general, without a CA comparison.
    expect(tlsClockHint('certificate has expired', { caPem: () => 'not a certificate' })).toMatch(/site clock may be ahead/);
  });
});
