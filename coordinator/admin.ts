/**
 * Admin operations on a coordinator directory. They work on the shared SQLite state, so a running
 * coordinator sees a new or revoked site on its next call: no restart.
 */
import { randomBytes } from 'node:crypto';
import { CoordinatorStore, type SiteRow } from './store/store.ts';
import { CoordinatorHome } from './home.ts';
import { sha256Hex } from '../shared/util/hash.ts';
import { SITE_NAME_PATTERN } from '../shared/protocol/site-names.ts';

export const DEFAULT_INVITE_TTL_SECONDS = 24 * 3600;

export interface Invitation {
  site: string;
  token: string;
  expiresAt: Date;
  caFingerprint: string;
  federationId: string;
}

export function addSite(dir: string, name: string, opts: { ttlSeconds?: number } = {}): Invitation {
  if (!SITE_NAME_PATTERN.test(name)) throw new Error(`site name '${name}' is not allowed: use 1–64 characters of [a-z0-9-], starting with a letter`);
  const home = new CoordinatorHome(dir);
  const config = home.config();
  // The token names its site (before the dot), so `medfl site enroll` needs nothing else; the secret part is random.
  const token = `${name}.${randomBytes(24).toString('base64url')}`;
  const expiresAt = new Date(Date.now() + (opts.ttlSeconds ?? DEFAULT_INVITE_TTL_SECONDS) * 1000);
  withStore(home, (s) => s.inviteSite(name, sha256Hex(token), expiresAt.getTime()));
  return { site: name, token, expiresAt, caFingerprint: home.caFingerprint(), federationId: config.federationId };
}

export function revokeSite(dir: string, name: string): void {
  const home = new CoordinatorHome(dir);
  home.config();
  const found = withStore(home, (s) => s.revokeSite(name));
  if (!found) throw new Error(`no site named '${name}'; \`medfl coordinator site list --dir ${dir}\` shows the sites`);
}

export function listSites(dir: string): SiteRow[] {
  const home = new CoordinatorHome(dir);
  home.config();
  return withStore(home, (s) => s.listSites());
}

export function withStore<T>(home: CoordinatorHome, fn: (s: CoordinatorStore) => T): T {
  const store = new CoordinatorStore(home.dbPath);
  try {
    return fn(store);
  } finally {
    store.close();
  }
}
