/**
 * Storage faults: the disk is full, over quota, read-only or failing, or SQLite says so. They are conditions of
 * the machine, not of the request, and usually pass (an admin frees space): callers report them as retryable
 * and try again later instead of refusing for good or crashing.
 */

/** Node errno codes of a filesystem that cannot take the write now. */
const FS_CODES = new Set(['ENOSPC', 'EDQUOT', 'EFBIG', 'EROFS', 'EIO']);

/** SQLite result codes (better-sqlite3 SqliteError.code, extended codes included) of the same conditions. */
const SQLITE_PATTERN = /^SQLITE_(FULL|IOERR|READONLY|BUSY|LOCKED|CANTOPEN|PROTOCOL)(_|$)/;

/**
 * The same in a message, for errors that lost their code on the way (the file-writer thread passes on only
 * messages such as "ENOSPC: no space left on device, write").
 */
const MESSAGE_PATTERN = /\b(ENOSPC|EDQUOT|EFBIG|EROFS)\b|database or disk is full|disk I\/O error/;

/** True when `e` (or its cause) is a storage fault, by its error code or, failing that, its message. */
export function isStorageFault(e: unknown, depth = 0): boolean {
  if (typeof e !== 'object' || e === null || depth > 3) return false;
  const code = (e as { code?: unknown }).code;
  if (typeof code === 'string' && (FS_CODES.has(code) || SQLITE_PATTERN.test(code))) return true;
  if (e instanceof Error && MESSAGE_PATTERN.test(e.message)) return true;
  return isStorageFault((e as { cause?: unknown }).cause, depth + 1);
}

/** A short description of a storage fault for logs and for the retryable status sent to sites. */
export function describeStorageFault(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  const message = e instanceof Error ? e.message : String(e);
  return typeof code === 'string' && !message.includes(code) ? `${code}: ${message}` : message;
}
