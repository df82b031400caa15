/**
 * The dashboard's three files (dashboard/): served as they are in the repository, with no build step, so what a
 * hospital audits is what its browser runs.
 */
import { readFileSync } from 'node:fs';

export interface DashboardAsset {
  body: string;
  contentType: string;
}

export interface DashboardAssets {
  html: DashboardAsset;
  js: DashboardAsset;
  css: DashboardAsset;
}

/**
 * Only the endpoint's own files may run or load, nothing inline and nothing from elsewhere: a site name or an event
 * reason shown on the page can never become markup or script, and the page cannot be framed.
 */
export const SECURITY_HEADERS: Record<string, string> = {
  'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
};

export function loadDashboardAssets(): DashboardAssets {
  const read = (name: string) => readFileSync(new URL(`./dashboard/${name}`, import.meta.url), 'utf8');
  return {
    html: { body: read('index.html'), contentType: 'text/html; charset=utf-8' },
    js: { body: read('dashboard.js'), contentType: 'text/javascript; charset=utf-8' },
    css: { body: read('dashboard.css'), contentType: 'text/css; charset=utf-8' },
  };
}
