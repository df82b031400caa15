import { createRequire } from 'node:module';

/** Whether an (optional) npm package resolves from this checkout. */
export function isInstalled(pkg: string): boolean {
  try {
    createRequire(import.meta.url).resolve(pkg);
    return true;
  } catch {
    return false;
  }
}
