/**
 * Hints for TLS failures that a wrong site clock causes. "certificate is not yet valid" nearly always means this
 * machine's clock is behind (the coordinator's certificate was issued "in its future"); "certificate has expired"
 * may mean it is ahead. Where it can, the hint compares the local clock with the federation CA pinned at enrolment.
 */
import { X509Certificate } from 'node:crypto';

const NOT_YET_VALID = /certificate is not yet valid|CERT_NOT_YET_VALID/i;
const EXPIRED = /certificate has expired|CERT_HAS_EXPIRED/i;

/** Whole days, else hours, else minutes, else seconds. */
function span(ms: number): string {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s >= 86_400) return `${Math.round(s / 86_400)} day(s)`;
  if (s >= 3600) return `${Math.round(s / 3600)} hour(s)`;
  if (s >= 60) return `${Math.round(s / 60)} minute(s)`;
  return `${s} s`;
}

/** What the pinned CA's validity says about the local clock, if anything. */
function caClockNote(caPem: (() => string) | undefined, now: number): string {
  if (!caPem) return '';
  try {
    const ca = new X509Certificate(caPem());
    const from = Date.parse(ca.validFrom);
    const to = Date.parse(ca.validTo);
    if (now < from) return ` The federation CA itself is valid only from ${new Date(from).toISOString()}, ${span(from - now)} after this clock: this clock is behind.`;
    if (now > to) return ` The federation CA expired at ${new Date(to).toISOString()}, ${span(now - to)} before this clock: this clock is ahead, or the federation needs a new CA.`;
  } catch {
    // No readable CA: the hint stands without the comparison.
  }
  return '';
}

/**
 * A hint to log with a connection failure whose message is a clock-related certificate error, else undefined.
 * `caPem` reads the federation CA pinned at enrolment (only called when a hint is due).
 */
export function tlsClockHint(message: string, opts: { now?: number; caPem?: () => string } = {}): string | undefined {
  const now = opts.now ?? Date.now();
  const local = new Date(now).toISOString();
  if (NOT_YET_VALID.test(message)) {
    return (
      `a certificate is not valid yet by this machine's clock (local time ${local}): the site clock is probably behind — ` +
      `check it against a time source (NTP, e.g. \`timedatectl status\`).` +
      caClockNote(opts.caPem, now)
    );
  }
  if (EXPIRED.test(message)) {
    return (
      `a certificate has expired by this machine's clock (local time ${local}): the site clock may be ahead (check NTP), ` +
      `or the coordinator's certificate needs renewing.` +
      caClockNote(opts.caPem, now)
    );
  }
  return undefined;
}
