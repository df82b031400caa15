/**
 * The dashboard in a real browser (Debian's chromium, driven by puppeteer-core) against a real federation: a
 * coordinator process with its admin endpoint behind a token, three site-agent processes that train two rounds under
 * client-level DP, one of them without validation cases. The page is opened before the sites start, so every round
 * event it shows arrived over its live event stream. Then the curves must carry exactly the numbers the store holds,
 * at the heights those numbers give, and the sites, models, ε and ledger must match the store and the ledger file.
 * Screenshots go to test-artifacts/dashboard/.
 *
 * Chromium is required, not optional: scripts/test.sh installs it. Without it this test fails and says how to install it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { freePort } from '../../cli/processes.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import type { MetricRow } from '../../coordinator/store/store.ts';
import { PRIVACY_KEY } from '../../coordinator/rounds/round-engine.ts';
import { medflVersion } from '../../shared/util/version.ts';

const ARTIFACTS = resolve(import.meta.dirname, '..', '..', 'test-artifacts', 'dashboard');
const TOKEN = 'browser-test-admin-token-5d1e7c2a9b';

/** Debian's chromium (or MEDFL_CHROMIUM); a clear failure naming the fix when it is not there. */
function chromiumPath(): string {
  const candidates = [process.env.MEDFL_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].filter((p): p is string => !!p);
  for (const p of candidates) if (existsSync(p)) return p;
  try {
    return execFileSync('sh', ['-c', 'command -v chromium || command -v chromium-browser'], { encoding: 'utf8' }).trim();
  } catch {
    throw new Error('the dashboard browser test needs Chromium and found none: install it with `apt-get install -y chromium` (scripts/test.sh does), or set MEDFL_CHROMIUM to its path');
  }
}

interface Point {
  metric: string;
  round: number;
  value: number;
  cy: number;
  top: number;
  height: number;
  yMin: number;
  yMax: number;
}

describe('the dashboard in Chromium, against a coordinator and three training sites', () => {
  let fed: TestFederation;
  let browser: Browser;
  let page: Page;
  let base: string;
  const problems: string[] = [];
  let eventsAtLoad: string[] = [];
  let metrics: MetricRow[] = [];
  let sitesExitedAt = 0;

  beforeAll(async () => {
    const executablePath = chromiumPath();
    mkdirSync(ARTIFACTS, { recursive: true });
    const plan = `${TEST_PLAN({ rounds: 2, minSites: 3, steps: 2, gather: 10 })}afterLastRound: idle\naggregation: { dp: { clipNorm: 0.2, noiseMultiplier: 0.5, delta: 0.00001 } }\n`;
    fed = await makeFederation({
      sites: 3,
      plan,
      // site-c: four labelled training cases and no imagesTs/labelsTs — too few to hold any back, so no validation.
      writeData: (dir, name, i) => writePhantomSite(dir, { siteName: name, cases: 4, valCases: i === 2 ? 0 : 2, size: [16, 16, 16], seed: 100 + i, intensityShift: 20 * i }).then(() => undefined),
    });
    const adminPort = await freePort();
    base = `http://127.0.0.1:${adminPort}`;
    const tokenFile = join(fed.work, 'admin-token');
    writeFileSync(tokenFile, TOKEN, { mode: 0o600 });
    await fed.startCoordinator(['--admin-port', String(adminPort), '--admin-token-file', tokenFile]);
    await fed.enrollAll();

    browser = await puppeteer.launch({ executablePath, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
    page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 1000 });
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(`console: ${m.text()} (${m.location().url ?? ''})`);
    });
    page.on('pageerror', (e) => problems.push(`page error: ${(e as Error).message}`));
    page.on('response', (r) => {
      // 401 is the challenge the browser answers with the credentials given above; a wrong token would show as no data.
      if (r.status() >= 400 && r.status() !== 401) problems.push(`HTTP ${r.status()} for ${r.url()}`);
    });
    // The token as a browser sends it: HTTP Basic, any user name.
    await page.authenticate({ username: 'operator', password: TOKEN });
    await page.goto(`${base}/`, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('body[data-loaded="status"]', { timeout: 30_000 });
    // Expressions evaluated in the page (this file is type-checked without the DOM library).
    await page.waitForFunction("document.getElementById('events-state')?.textContent === 'live'", { timeout: 30_000 });
    const store = fed.store();
    eventsAtLoad = store.listOutbox('event').map((r) => (JSON.parse(r.body) as { type: string }).type);
    store.close();
    await page.screenshot({ path: join(ARTIFACTS, '1-waiting-for-sites.png'), fullPage: true });

    const codes = await Promise.all(fed.sites.map((s) => exited(fed.startSite(s), 200_000)));
    expect(codes).toEqual([0, 0, 0]);
    sitesExitedAt = Date.now();
    await page.waitForSelector('#phase[data-phase="finished"]', { timeout: 30_000 });
    await page.waitForSelector('#events li[data-type="federation.finished"]', { timeout: 30_000 });
    const s = fed.store();
    metrics = s.listMetrics();
    s.close();
  }, 300_000);

  afterAll(async () => {
    await browser?.close();
    fed?.killAll();
  });

  it('loads without a script error or a content-security-policy violation', () => {
    expect(problems).toEqual([]);
  });

  it('received the rounds live over server-sent events', async () => {
    // None of these had happened when the page connected: the stream brought them.
    for (const type of ['round.started', 'round.closed', 'federation.finished']) expect(eventsAtLoad).not.toContain(type);
    const shown = await page.$$eval('#events li', (lis) => lis.map((li) => li.getAttribute('data-type')));
    expect(shown.filter((t) => t === 'round.closed')).toHaveLength(2);
    expect(shown.filter((t) => t === 'update.accepted')).toHaveLength(6);
    expect(shown).toContain('federation.finished');
    await page.screenshot({ path: join(ARTIFACTS, '2-finished.png'), fullPage: true });
  });

  it('draws each site\'s curves from the stored numbers, at the heights those numbers give', async () => {
    for (const site of ['site-a', 'site-b']) {
      const points = await page.$$eval(`svg.chart[data-site="${site}"] circle`, (circles) =>
        circles.map((c) => {
          const svg = c.closest('svg')!;
          return {
            metric: c.parentElement!.getAttribute('data-metric')!,
            round: Number(c.getAttribute('data-round')),
            value: Number(c.getAttribute('data-value')),
            cy: Number(c.getAttribute('cy')),
            top: Number(svg.getAttribute('data-plot-top')),
            height: Number(svg.getAttribute('data-plot-height')),
            yMin: Number(svg.getAttribute('data-y-min')),
            yMax: Number(svg.getAttribute('data-y-max')),
          };
        }),
      ) as Point[];
      for (const metric of ['val_dice_mean', 'val_dice_class_1', 'train_loss']) {
        const stored = metrics.filter((m) => m.site === site && m.key === metric).map((m) => [m.round, m.value]);
        expect(stored, `${site} ${metric} in the store`).toHaveLength(2);
        const drawn = points.filter((p) => p.metric === metric);
        expect(drawn.map((p) => [p.round, p.value]), `${site} ${metric}`).toEqual(stored);
        for (const p of drawn) expect(p.cy).toBeCloseTo(p.top + (1 - (p.value - p.yMin) / (p.yMax - p.yMin)) * p.height, 1);
      }
    }
  });

  it('shows the site without validation cases as such, and its agent warned at start', async () => {
    const cell = await page.$eval('#sites tr[data-site="site-c"] td[data-field="validation"]', (td) => td.textContent);
    expect(cell).toBe('no validation data');
    // Each site's MedFL release, as its heartbeats named it.
    const versions = await page.$$eval('#sites tbody tr', (trs) => trs.map((tr) => tr.querySelector('td[data-field="version"]')!.textContent));
    expect(versions).toEqual([medflVersion(), medflVersion(), medflVersion()]);
    expect(await page.$$('svg.chart[data-site="site-c"][data-kind="dice"]')).toHaveLength(0);
    expect(await page.$eval('.site-curves[data-site="site-c"] [data-field="no-dice"]', (p) => p.textContent)).toMatch(/^no validation data/);
    expect(metrics.filter((m) => m.site === 'site-c' && m.key === 'num_val').map((m) => m.value)).toEqual([0, 0]);
    const warning = readFileSync(fed.logPath('site-c'), 'utf8').split('\n').find((l) => l.includes('no validation cases in'));
    expect(warning, 'site-c warns at start').toBeDefined();
    expect(JSON.parse(warning!)).toMatchObject({ level: 40, validationCases: 0, trainingCases: 4 });
    expect(readFileSync(fed.logPath('site-a'), 'utf8')).not.toContain('no validation cases in');
  });

  it('lists the model versions, ε against the plan and the verified ledger head, as stored', async () => {
    const store = fed.store();
    const models = store.listModels();
    const privacy = JSON.parse(store.getMeta(PRIVACY_KEY)!) as { epsilon: number };
    store.close();
    const shownModels = await page.$$eval('#models tbody tr', (trs) => trs.map((tr) => tr.getAttribute('data-model')));
    expect(shownModels).toEqual(models.map((m) => m.hash).reverse());
    const eps = await page.$eval('#epsilon', (p) => ({ spent: Number(p.getAttribute('data-spent')), planned: Number(p.getAttribute('data-planned')) }));
    expect(eps.spent).toBe(privacy.epsilon);
    expect(eps.spent).toBeGreaterThan(0);
    // Both planned rounds are released: nothing is left to spend.
    expect(eps.planned).toBeCloseTo(eps.spent, 10);
    await page.waitForFunction("document.getElementById('ledger-verdict')?.textContent === 'verified'", { timeout: 40_000 });
    const lines = readFileSync(join(fed.coordDir, 'ledger.jsonl'), 'utf8').trim().split('\n');
    const last = JSON.parse(lines.at(-1)!) as { seq: number; hash: string };
    expect(last.seq).toBe(6);
    await page.waitForFunction(`document.getElementById('ledger-head')?.textContent === ${JSON.stringify(`${last.seq}:${last.hash}`)}`, { timeout: 40_000 });
  });

  it('shows sites that ended with the federation as finished, not offline', async () => {
    const allFinished = `[...document.querySelectorAll('#sites td[data-field="status"]')].every((td) => td.textContent === 'finished')`;
    // At once: the coordinator knows they left a finished federation.
    await page.waitForFunction(allFinished, { timeout: 30_000 });
    // And still once their last heartbeat is older than the 15 s that make a site offline: they went quiet because
    // the federation was over (the store's view, as `medfl status` has it too).
    await new Promise((r) => setTimeout(r, Math.max(0, sitesExitedAt + 17_000 - Date.now())));
    await page.reload({ waitUntil: 'domcontentloaded' });
    await page.waitForSelector('body[data-loaded="status"]', { timeout: 30_000 });
    const statuses = await page.$$eval('#sites tbody tr', (trs) => trs.map((tr) => [tr.getAttribute('data-site'), tr.querySelector('td[data-field="status"]')!.textContent]));
    expect(statuses).toEqual([['site-a', 'finished'], ['site-b', 'finished'], ['site-c', 'finished']]);
    expect(await page.$eval('#phase', (e) => e.textContent)).toBe('finished');
    // Plan afterLastRound: idle — the coordinator is still up and says why.
    expect(readFileSync(fed.logPath('coordinator'), 'utf8')).toContain('federation finished: 2 rounds closed; the coordinator stays up, idle (plan afterLastRound: idle)');
    await page.screenshot({ path: join(ARTIFACTS, '3-sites-finished.png'), fullPage: true });
    expect(problems).toEqual([]);
  });
});
