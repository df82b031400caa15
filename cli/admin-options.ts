/**
 * `medfl coordinator start` options of the admin HTTP endpoint (coordinator/admin-http/). The token comes from a
 * file or the environment, never from the command line, where `ps` would show it to every local user.
 */
import { readFileSync } from 'node:fs';
import type { AdminHttpSettings } from '../coordinator/admin-http/options.ts';

export const ADMIN_TOKEN_ENV = 'MEDFL_ADMIN_TOKEN';

export interface AdminCliOptions {
  adminPort?: number;
  adminHost: string;
  adminTokenFile?: string;
  readyMinFreeMb: number;
}

/** The coordinator's `admin` setting, or undefined without --admin-port. Validation proper is the coordinator's (zod). */
export function adminSettings(o: AdminCliOptions, env: NodeJS.ProcessEnv = process.env): AdminHttpSettings | undefined {
  if (o.adminPort === undefined) {
    if (o.adminTokenFile !== undefined) throw new Error('--admin-token-file needs --admin-port (the admin endpoint is off without it)');
    return undefined;
  }
  let token: string | undefined;
  if (o.adminTokenFile !== undefined) {
    try {
      token = readFileSync(o.adminTokenFile, 'utf8').trim();
    } catch (e) {
      throw new Error(`cannot read --admin-token-file ${o.adminTokenFile}: ${(e as Error).message}`);
    }
  } else if (env[ADMIN_TOKEN_ENV]) {
    token = env[ADMIN_TOKEN_ENV]!.trim();
  }
  return { host: o.adminHost, port: o.adminPort, token, minFreeBytes: o.readyMinFreeMb * 1024 * 1024 };
}
