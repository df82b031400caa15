/**
 * The interceptor keeps site keys as KeyObjects between calls (coordinator/auth/interceptor.ts, siteKey): the cache
 * must follow the key the directory holds now, so a site re-enrolled with a new key is checked against the new one
 * at once and tokens of its old key are refused.
 */
import * as grpc from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { verifySiteToken } from '../../coordinator/auth/interceptor.ts';
import { AUTH_METADATA_KEY } from '../../shared/protocol/grpc.ts';
import { generateSiteKeyPair, signSiteToken } from '../../shared/security/site-identity.ts';
import { MemorySiteDirectory } from '../helpers/memory-site-directory.ts';

const FED = 'fed-key-cache';
const bearer = (token: string) => {
  const md = new grpc.Metadata();
  md.set(AUTH_METADATA_KEY, `Bearer ${token}`);
  return md;
};

describe('site keys kept between calls', () => {
  it('a site re-enrolled with a new key: its old key\'s tokens are refused and the new key\'s accepted at once', async () => {
    const directory = new MemorySiteDirectory();
    const first = generateSiteKeyPair();
    directory.addSite('site-k', first.publicKeyRaw);
    const tokenOf = (pem: string) => signSiteToken({ siteName: 'site-k', federationId: FED, privateKey: pem });
    // Twice with the first key, so it is cached before the key changes.
    await expect(verifySiteToken(bearer(await tokenOf(first.privateKeyPem)), { federationId: FED, directory })).resolves.toBe('site-k');
    await expect(verifySiteToken(bearer(await tokenOf(first.privateKeyPem)), { federationId: FED, directory })).resolves.toBe('site-k');

    const second = generateSiteKeyPair();
    directory.addSite('site-k', second.publicKeyRaw);
    await expect(verifySiteToken(bearer(await tokenOf(first.privateKeyPem)), { federationId: FED, directory })).rejects.toThrow(/signature does not verify/);
    await expect(verifySiteToken(bearer(await tokenOf(second.privateKeyPem)), { federationId: FED, directory })).resolves.toBe('site-k');

    // And back: a key seen before is still checked against what the directory holds now.
    directory.addSite('site-k', first.publicKeyRaw);
    await expect(verifySiteToken(bearer(await tokenOf(second.privateKeyPem)), { federationId: FED, directory })).rejects.toThrow(/signature does not verify/);
  });
});
