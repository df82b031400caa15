/**
 * The bounded labels the admin metrics put on free-text reasons, fed with the messages the real code produces
 * (so a reworded message that falls out of its category fails here), and the admin endpoint's settings.
 */
import { describe, expect, it } from 'vitest';
import * as grpc from '@grpc/grpc-js';
import { SignJWT } from 'jose';
import { randomUUID } from 'node:crypto';
import { verifySiteToken } from '../../coordinator/auth/interceptor.ts';
import { MemorySiteDirectory } from '../helpers/memory-site-directory.ts';
import { generateSiteKeyPair, signSiteToken, toPrivateKey } from '../../shared/security/site-identity.ts';
import { AUTH_METADATA_KEY } from '../../shared/protocol/grpc.ts';
import { authFailureReason, roundFailureCause, updateRejectionReason, AUTH_FAILURE_REASONS, UPDATE_REJECTION_REASONS } from '../../coordinator/events/reasons.ts';
import { isLoopbackHost, parseAdminHttpOptions, DEFAULT_MIN_FREE_BYTES } from '../../coordinator/admin-http/options.ts';
import { DEFAULT_RULES, nonFiniteProblem, normProblem, shapeAndSamplesProblem, valueBoundProblem } from '../../coordinator/aggregation/validate.ts';
import { UploadReceiver } from '../../coordinator/server/upload-receiver.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const FED = 'fed-reasons';

async function authMessage(token: string | undefined, dir: MemorySiteDirectory): Promise<string> {
  const md = new grpc.Metadata();
  if (token !== undefined) md.set(AUTH_METADATA_KEY, token);
  try {
    await verifySiteToken(md, { federationId: FED, directory: dir });
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error('the token was accepted');
}

describe('auth failure reasons, from verifySiteToken', () => {
  it('labels each kind of refusal', async () => {
    const key = generateSiteKeyPair();
    const other = generateSiteKeyPair();
    const dir = new MemorySiteDirectory();
    dir.addSite('site-a', key.publicKeyRaw);
    dir.addSite('site-r', key.publicKeyRaw);
    dir.revoke('site-r');
    const sign = (o: { site?: string; aud?: string; pem?: string; iat?: number; exp?: number }) => {
      const iat = o.iat ?? Math.floor(Date.now() / 1000);
      return new SignJWT({})
        .setProtectedHeader({ alg: 'EdDSA' })
        .setIssuer(o.site ?? 'site-a')
        .setSubject(o.site ?? 'site-a')
        .setAudience(o.aud ?? FED)
        .setIssuedAt(iat)
        .setExpirationTime(o.exp ?? iat + 60)
        .setJti(randomUUID())
        .sign(toPrivateKey(o.pem ?? key.privateKeyPem));
    };
    const replayed = `Bearer ${await sign({})}`;
    const okMd = new grpc.Metadata();
    okMd.set(AUTH_METADATA_KEY, replayed);
    await verifySiteToken(okMd, { federationId: FED, directory: dir });
    const now = Math.floor(Date.now() / 1000);
    const cases: [string, string][] = [
      [await authMessage(undefined, dir), 'missing_token'],
      [await authMessage('Basic abc', dir), 'malformed_token'],
      [await authMessage('Bearer not-a-jwt', dir), 'malformed_token'],
      [await authMessage(`Bearer ${await sign({ site: 'nobody' })}`, dir), 'unknown_site'],
      [await authMessage(`Bearer ${await sign({ pem: other.privateKeyPem })}`, dir), 'bad_signature'],
      [await authMessage(`Bearer ${await sign({ iat: now - 1000, exp: now - 900 })}`, dir), 'expired'],
      [await authMessage(replayed, dir), 'replayed'],
      [await authMessage(`Bearer ${await signSiteToken({ siteName: 'site-r', federationId: FED, privateKey: key.privateKeyPem })}`, dir), 'revoked'],
      [await authMessage(`Bearer ${await sign({ aud: 'another-federation' })}`, dir), 'wrong_federation'],
      [await authMessage(`Bearer ${await sign({ iat: now, exp: now + 3600 })}`, dir), 'invalid_claims'],
    ];
    for (const [message, label] of cases) expect(authFailureReason(message), message).toBe(label);
    expect(authFailureReason('something nobody wrote')).toBe('other');
    for (const [, label] of cases) expect(AUTH_FAILURE_REASONS).toContain(label);
  });
});

describe('update rejection reasons, from the validators and the upload receiver', () => {
  const specs = [{ name: 'w', dtype: 'F32' as const, shape: [2] }];
  const bundle = (a: number, b: number) => makeBundle([{ name: 'w', dtype: 'F32', shape: [2], data: Float32Array.from([a, b]) }]);

  it('labels each kind of refusal', () => {
    const receiver = new UploadReceiver(mkdtempSync(join(tmpdir(), 'medfl-reasons-')), specs, 1000);
    const headerProblem = (h: object) => {
      try {
        receiver.parseHeader(h);
      } catch (e) {
        return (e as Error).message;
      }
      throw new Error('header accepted');
    };
    const header = { updateId: 'update-0001', round: 1, taskId: 't', baseModelHash: 'a'.repeat(64), totalSize: 10, sha256: '', numSamples: 4 };
    const cases: [string | undefined, string][] = [
      [nonFiniteProblem(bundle(Number.NaN, 1)), 'non_finite'],
      [valueBoundProblem(bundle(5e6, 1), 1e6), 'value_bound'],
      [normProblem(100, { ...DEFAULT_RULES, maxNorm: 10 }, []), 'norm'],
      [shapeAndSamplesProblem(bundle(1, 1), { site: 's', numSamples: 0 }, specs, DEFAULT_RULES), 'samples'],
      [shapeAndSamplesProblem(makeBundle([{ name: 'w', dtype: 'F32', shape: [3], data: new Float32Array(3) }]), { site: 's', numSamples: 4 }, specs, DEFAULT_RULES), 'layout'],
      [headerProblem({ ...header, totalSize: 5000 }), 'too_large'],
      [headerProblem({ ...header, updateId: '../x' }), 'protocol'],
      ['round 3 is not the open round 4; drop this update and take the current task', 'not_admitted'],
      ["site 'site-a' already reported an update for round 2", 'not_admitted'],
      ['hash mismatch: received bytes hash to 0123…, the trailer says 4567…', 'integrity'],
      ['upload failed: storing it failed: ENOSPC: no space left on device', 'storage'],
    ];
    for (const [message, label] of cases) {
      expect(message, label).toBeTypeOf('string');
      expect(updateRejectionReason(message!), message).toBe(label);
      expect(UPDATE_REJECTION_REASONS).toContain(label);
    }
    expect(updateRejectionReason('upload failed: something unexpected')).toBe('other');
  });

  it('labels round failures by cause', () => {
    expect(roundFailureCause({ reason: 'deadline reached without quorum: 1 of 3 selected sites reported, 2 needed' })).toBe('deadline');
    expect(roundFailureCause({ reason: 'aggregate not published: …', cause: 'aggregate' })).toBe('aggregate');
    expect(roundFailureCause({ reason: "secure aggregation failed: round deadline reached in phase 'masked'" })).toBe('secure_aggregation');
    expect(roundFailureCause({ reason: 'the coordinator restarted during a secure-aggregation round; its session is not kept' })).toBe('restart');
    expect(roundFailureCause({})).toBe('other');
  });
});

describe('admin endpoint settings', () => {
  it('knows loopback from every-interface and other addresses', () => {
    for (const h of ['127.0.0.1', '127.1.2.3', '::1', '[::1]', '::ffff:127.0.0.1', 'localhost', 'LOCALHOST']) expect(isLoopbackHost(h), h).toBe(true);
    for (const h of ['0.0.0.0', '::', '10.0.0.5', '::ffff:10.0.0.5', '192.168.1.1', 'example.org', 'localhost.example.org']) expect(isLoopbackHost(h), h).toBe(false);
  });

  it('defaults to loopback and a 1 GiB free-space threshold, and refuses what it cannot allow', () => {
    expect(parseAdminHttpOptions({ port: 9464 })).toEqual({ host: '127.0.0.1', port: 9464, minFreeBytes: DEFAULT_MIN_FREE_BYTES });
    const token = 'x'.repeat(16);
    expect(parseAdminHttpOptions({ host: '0.0.0.0', port: 0, token }).token).toBe(token);
    expect(() => parseAdminHttpOptions({ host: '10.0.0.5', port: 9464 })).toThrow(/only with an admin token/);
    expect(() => parseAdminHttpOptions({ port: 70_000 })).toThrow(/port/);
    expect(() => parseAdminHttpOptions({ port: 1, token: 'has space in it 123' })).toThrow(/printable ASCII/);
    expect(() => parseAdminHttpOptions({ port: 1, minFreeBytes: -1 })).toThrow(/minFreeBytes/);
  });
});
