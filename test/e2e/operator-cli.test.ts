/**
 * The operator's CLI as people run it (real processes): `coordinator export-metrics` in both formats against what the
 * store holds; unknown options and out-of-range or unlisted values refused with a message naming the option; and a
 * coordinator that ends by itself after its last planned round (plan afterLastRound: exit), also when restarted on a
 * federation that is already finished.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MEDFL_BIN } from '../../cli/processes.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';

const medfl = (...args: string[]) => {
  const r = spawnSync(process.execPath, [MEDFL_BIN, ...args], { encoding: 'utf8', env: { ...process.env, MEDFL_LOG_LEVEL: 'warn' }, timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

const work = mkdtempSync(join(tmpdir(), 'medfl-operator-cli-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('medfl coordinator export-metrics', () => {
  const dir = join(work, 'coord');

  it('writes every round × site × metric from the store, as CSV and as JSON', () => {
    expect(medfl('coordinator', 'init', '--dir', dir).code).toBe(0);
    const store = new CoordinatorStore(new CoordinatorHome(dir).dbPath);
    store.recordMetrics(2, 'site-b', { val_dice_mean: 0.7123456789012345, num_val: 0 });
    store.recordMetrics(1, 'site-b', { train_loss: 0.5, val_dice_class_1: 0.25 });
    store.recordMetrics(1, 'site-a', { train_loss: 1 / 3, teacher_val_dice: Infinity });
    const rows = store.listMetrics();
    store.close();

    const csv = medfl('coordinator', 'export-metrics', '--dir', dir, '--format', 'csv');
    expect(csv.code, csv.err).toBe(0);
    expect(csv.out.split('\n')).toEqual([
      'round,site,metric,value',
      '1,site-a,teacher_val_dice,Infinity',
      `1,site-a,train_loss,${1 / 3}`,
      '1,site-b,train_loss,0.5',
      '1,site-b,val_dice_class_1,0.25',
      '2,site-b,num_val,0',
      '2,site-b,val_dice_mean,0.7123456789012345',
      '',
    ]);
    // CSV is the default.
    expect(medfl('coordinator', 'export-metrics', '--dir', dir).out).toBe(csv.out);

    const out = join(work, 'metrics.json');
    const j = medfl('coordinator', 'export-metrics', '--dir', dir, '--format', 'json', '--out', out);
    expect(j.code, j.err).toBe(0);
    expect(j.out).toBe(`wrote 6 metric values (2 rounds × 2 sites) to ${out}\n`);
    const doc = JSON.parse(readFileSync(out, 'utf8')) as { schema: number; federationId: string; metrics: { round: number; site: string; metric: string; value: number | null }[] };
    expect(doc.schema).toBe(1);
    expect(doc.federationId).toBe(new CoordinatorHome(dir).config().federationId);
    expect(doc.metrics).toHaveLength(rows.length);
    for (const r of rows) {
      expect(doc.metrics).toContainEqual({ round: r.round, site: r.site, metric: r.key, value: Number.isFinite(r.value) ? r.value : null });
    }
  });

  it('refuses an unknown format and a directory that is not a coordinator', () => {
    const bad = medfl('coordinator', 'export-metrics', '--dir', dir, '--format', 'xml');
    expect(bad.code).toBe(1);
    expect(bad.err).toContain("option '--format <format>' argument 'xml' is invalid. Allowed choices are csv, json.");
    expect(medfl('coordinator', 'export-metrics', '--dir', join(work, 'nowhere')).err).toMatch(/not a coordinator directory/);
  });
});

describe('option checking', () => {
  it('refuses unknown options, and values outside a range or a list, naming the option', () => {
    const dir = join(work, 'opts');
    expect(medfl('coordinator', 'init', '--dir', dir).code).toBe(0);
    const cases: Array<[string[], string]> = [
      [['status', '--dir', dir, '--jsno'], "error: unknown option '--jsno'"],
      [['coordinator', 'start', '--dir', dir, '--admin-prot', '9464'], "error: unknown option '--admin-prot'"],
      [['status', '--dir', dir, 'extra'], "error: too many arguments for 'status'"],
      [['coordinator', 'start', '--dir', dir, '--admin-port', '70000'], 'error: option \'--admin-port <port>\' argument \'70000\' is invalid. --admin-port must be an integer from 0 to 65535, got "70000"'],
      [['coordinator', 'start', '--dir', dir, '--ready-min-free-mb', '-1'], '--ready-min-free-mb must be an integer from 0 to 100000000'],
      [['coordinator', 'start', '--dir', dir, '--max-uploads-per-site', '0'], '--max-uploads-per-site must be an integer from 1 to 64, got "0"'],
      [['site', 'run', '--dir', dir, '--data', dir, '--metrics-port', 'abc'], '--metrics-port must be an integer from 0 to 65535, got "abc"'],
      [['site', 'run', '--dir', dir, '--data', dir, '--engine', 'gpu'], "option '--engine <name>' argument 'gpu' is invalid. Allowed choices are auto, tfjs-node-gpu, tfjs-node, wasm, cpu."],
      [['site', 'run', '--dir', dir, '--data', dir, '--kernels', 'cuda'], "option '--kernels <name>' argument 'cuda' is invalid."],
      [['model', 'import', 'x.pth', '--arch', 'resnet11', '--out', join(work, 'x.safetensors')], "option '--arch <arch>' argument 'resnet11' is invalid. Allowed choices are resnet10, resnet18, resnet34, resnet50, resnet101."],
      [['model', 'import', 'x.pth', '--arch', 'resnet10', '--shortcut', 'C', '--out', join(work, 'x.safetensors')], "option '--shortcut <type>' argument 'C' is invalid. Allowed choices are A, B."],
      [['model', 'embed', '--model', 'm', '--input', 'i', '--out', 'o', '--arch', 'vgg'], "option '--arch <arch>' argument 'vgg' is invalid."],
    ];
    for (const [args, message] of cases) {
      const r = medfl(...args);
      expect(r.code, `${args.join(' ')}: ${r.err}`).toBe(1);
      expect(r.err, args.join(' ')).toContain(message);
    }
  });
});

describe('after the last planned round (plan afterLastRound: exit)', () => {
  let fed: TestFederation;
  afterAll(() => fed?.killAll());

  it('the coordinator tells the site, waits finishGraceSeconds and exits with status 0; restarted, it exits again', async () => {
    fed = await makeFederation({ sites: 1, plan: `${TEST_PLAN({ rounds: 1, minSites: 1, gather: 0, steps: 2 })}finishGraceSeconds: 2\n` });
    const coordinator = await fed.startCoordinator();
    await fed.enrollAll();
    const site = fed.startSite('site-a');
    expect(await exited(site, 120_000)).toBe(0);
    const t0 = Date.now();
    expect(await exited(coordinator, 60_000)).toBe(0);
    const log = readFileSync(fed.logPath('coordinator'), 'utf8');
    expect(log).toContain('federation finished: 1 rounds closed; exiting in 2 s (plan afterLastRound: exit, finishGraceSeconds: 2)');
    expect(log).toContain('federation finished: stopping coordinator');
    expect(Date.now() - t0).toBeLessThan(30_000);
    const store = fed.store();
    expect(store.closedRoundCount()).toBe(1);
    store.close();
    // The site heard the finish before the coordinator went.
    expect(readFileSync(fed.logPath('site-a'), 'utf8')).toContain('"msg":"federation finished"');

    // Started again on the finished federation: nothing to do, so it says so and ends the same way.
    const again = await fed.startCoordinator();
    expect(await exited(again, 60_000)).toBe(0);
    const second = readFileSync(fed.logPath('coordinator'), 'utf8').slice(log.length);
    expect(second).toContain('federation finished: 1 rounds closed; exiting in 2 s');
  }, 240_000);
});
