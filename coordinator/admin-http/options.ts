/**
 * The admin endpoint's settings, checked where they come in (CLI or library caller) before anything listens.
 * Rule: it listens on loopback unless an admin token is configured; with a token every request must carry it.
 */
import { BlockList, isIPv4, isIPv6 } from 'node:net';
import { z } from 'zod';

/** Below this much free space on the coordinator directory's file system, /readyz says not ready (1 GiB: a few updates). */
export const DEFAULT_MIN_FREE_BYTES = 1024 ** 3;
/** Shorter tokens are guessable; 16 printable characters is already ~100 bits when random. */
export const MIN_ADMIN_TOKEN_CHARS = 16;

const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** Loopback only: 127.0.0.0/8, ::1 (also IPv4-mapped) and the name localhost. 0.0.0.0 and :: mean every interface. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (h === 'localhost') return true;
  if (isIPv4(h)) return LOOPBACK.check(h, 'ipv4');
  if (isIPv6(h)) return LOOPBACK.check(h, 'ipv6');
  return false;
}

export const AdminHttpOptionsSchema = z
  .object({
    host: z.string().trim().min(1).default('127.0.0.1'),
    port: z.number().int().min(0).max(65_535),
    token: z
      .string()
      .min(MIN_ADMIN_TOKEN_CHARS, `the admin token must be at least ${MIN_ADMIN_TOKEN_CHARS} characters`)
      .max(4096, 'the admin token must be at most 4096 characters')
      .regex(/^[\x21-\x7e]+$/, 'the admin token must be printable ASCII without spaces')
      .optional(),
    minFreeBytes: z.number().int().nonnegative().default(DEFAULT_MIN_FREE_BYTES),
  })
  .strict()
  .superRefine((o, ctx) => {
    if (!isLoopbackHost(o.host) && o.token === undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['host'],
        message: `the admin endpoint may listen on '${o.host}' (not loopback) only with an admin token: set MEDFL_ADMIN_TOKEN or --admin-token-file, or keep --admin-host 127.0.0.1`,
      });
    }
  });

export type AdminHttpOptions = z.output<typeof AdminHttpOptionsSchema>;
export type AdminHttpSettings = z.input<typeof AdminHttpOptionsSchema>;

/** Validated settings, or an Error naming every problem. */
export function parseAdminHttpOptions(raw: AdminHttpSettings): AdminHttpOptions {
  const r = AdminHttpOptionsSchema.safeParse(raw);
  if (!r.success) throw new Error(`admin endpoint: ${r.error.issues.map((i) => (i.path.length ? `${i.path.join('.')}: ` : '') + i.message).join('; ')}`);
  return r.data;
}
