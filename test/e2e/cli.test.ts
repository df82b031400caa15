/**
 * The `medfl` command as people use it: real processes, real files, the messages they read.
 */
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MEDFL_BIN } from '../../cli/processes.ts';

const medfl = (...args: string[]) => {
  const r = spawnSync(process.execPath, [MEDFL_BIN, ...args], { encoding: 'utf8', env: { ...process.env, MEDFL_LOG_LEVEL: 'warn' }, timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

describe('medfl CLI', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-cli-'));
  const dir = join(work, 'coord');

  it('init, site add / list / revoke, status', () => {
    const init = medfl('coordinator', 'init', '--dir', dir);
    expect(init.code).toBe(0);
    expect(init.out).toMatch(/CA fingerprint\s+([0-9A-F]{2}:){31}[0-9A-F]{2}/);
    expect(medfl('coordinator', 'init', '--dir', dir).err).toMatch(/already holds a coordinator/);

    const add = medfl('coordinator', 'site', 'add', 'st-marys', '--dir', dir);
    expect(add.code).toBe(0);
    expect(add.out).toMatch(/token\s+st-marys\.[A-Za-z0-9_-]{20,}/);
    expect(add.out).toMatch(/medfl site enroll --coordinator HOST:PORT --token st-marys\./);
    expect(medfl('coordinator', 'site', 'add', 'Bad Name', '--dir', dir).err).toMatch(/not allowed/);

    expect(medfl('coordinator', 'site', 'list', '--dir', dir).out).toMatch(/st-marys\s*│\s*invited/);
    expect(medfl('coordinator', 'site', 'revoke', 'st-marys', '--dir', dir).code).toBe(0);
    expect(medfl('coordinator', 'site', 'list', '--dir', dir).out).toMatch(/st-marys\s*│\s*revoked/);
    expect(medfl('coordinator', 'site', 'revoke', 'nobody', '--dir', dir).err).toMatch(/no site named 'nobody'/);

    const status = medfl('status', '--dir', dir);
    expect(status.code).toBe(0);
    expect(status.out).toMatch(/federation fed-[0-9a-f]{16}/);
    expect(medfl('status', '--dir', join(work, 'nowhere')).err).toMatch(/not a coordinator directory: run `medfl coordinator init/);
  });

  it('reports an invalid plan with its line, and refuses to start on it', () => {
    const bad = join(work, 'bad.yaml');
    writeFileSync(bad, 'rounds: 2\nminSites: 0\nshare:\n  parts: [encoder, tail]\n');
    const check = medfl('coordinator', 'check-plan', bad);
    expect(check.code).toBe(1);
    expect(check.err).toContain(`${bad}:2: minSites`);
    expect(check.err).toMatch(/bad\.yaml:4: share\.parts\.1: /);
    const start = medfl('coordinator', 'start', '--dir', dir, '--plan', bad, '--port', '0');
    expect(start.code).toBe(1);
    expect(start.err).toContain(`${bad}:2: minSites`);
  });

  it('site enroll names the fault: mangled token, unreachable coordinator', () => {
    expect(medfl('site', 'enroll', '--coordinator', 'localhost:1', '--token', 'nodot', '--ca-fingerprint', 'AB', '--dir', join(work, 's1')).err).toMatch(/not a MedFL enrolment token/);
    const r = medfl('site', 'enroll', '--coordinator', '127.0.0.1:1', '--token', `site-a.${'x'.repeat(30)}`, '--ca-fingerprint', 'AB:'.repeat(31) + 'AB', '--dir', join(work, 's2'));
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/127\.0\.0\.1:1/);
  });

  it('--version prints the package version', () => {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    const r = medfl('--version');
    expect(r.code).toBe(0);
    expect(r.out.trim()).toBe(pkg.version);
  });

  it('numeric options are checked where they are parsed: the message names the option and the value', () => {
    const vdir = join(work, 'validate');
    expect(medfl('coordinator', 'init', '--dir', vdir).code).toBe(0);
    const cases: Array<[string[], string, string]> = [
      [['coordinator', 'site', 'add', 'site-t', '--dir', vdir, '--ttl', 'abc'], '--ttl', 'abc'],
      [['coordinator', 'site', 'add', 'site-t', '--dir', vdir, '--ttl', '0'], '--ttl', '0'],
      [['coordinator', 'site', 'add', 'site-t', '--dir', vdir, '--ttl', '1e9'], '--ttl', '1e9'],
      [['coordinator', 'init', '--dir', join(work, 'validate-2'), '--port', '0'], '--port', '0'],
      [['coordinator', 'start', '--dir', vdir, '--port', 'abc'], '--port', 'abc'],
      [['coordinator', 'start', '--dir', vdir, '--port', '70000'], '--port', '70000'],
      [['demo', '--dir', join(work, 'demo-bad'), '--rounds', 'abc'], '--rounds', 'abc'],
      [['demo', '--dir', join(work, 'demo-bad'), '--sites', '0'], '--sites', '0'],
      [['demo', '--dir', join(work, 'demo-bad'), '--steps', '2.5'], '--steps', '2.5'],
      [['model', 'import', 'x.pth', '--arch', 'resnet10', '--out', join(work, 'x.safetensors'), '--classes', 'two'], '--classes', 'two'],
      [['model', 'embed', '--model', 'm', '--input', 'i', '--out', 'o', '--width', '-'], '--width', '-'],
    ];
    for (const [args, flag, value] of cases) {
      const r = medfl(...args);
      expect(r.code, `${args.join(' ')}: ${r.err}`).toBe(1);
      expect(r.err, args.join(' ')).toContain(`${flag} must be`);
      expect(r.err, args.join(' ')).toContain(`got "${value}"`);
    }
    // Refused before anything was written: no half-made invitation.
    expect(medfl('coordinator', 'site', 'list', '--dir', vdir).out).not.toMatch(/site-t/);
    // Fractions of an hour are fine.
    expect(medfl('coordinator', 'site', 'add', 'site-t', '--dir', vdir, '--ttl', '0.5').code).toBe(0);
  });

  it('runs the demo end to end (README\'s first command, shortened); status --json reads back the same federation', () => {
    const r = medfl('demo', '--dir', join(work, 'demo'), '--rounds', '1', '--steps', '2');
    expect(r.code, r.out + r.err).toBe(0);
    expect(r.out).toMatch(/global model after 1 rounds: [0-9a-f]{64}/);
    expect(r.out).toMatch(/site-a\s*│\s*6\s*│/);

    const model = /global model after 1 rounds: ([0-9a-f]{64})/.exec(r.out)![1];
    const st = medfl('status', '--dir', join(work, 'demo', 'coordinator'), '--json');
    expect(st.code, st.err).toBe(0);
    const j = JSON.parse(st.out) as {
      federationId: string;
      currentModel: string;
      roundsClosed: number;
      sites: Array<{ name: string; state: string }>;
      rounds: Array<{ round: number; state: string; resultModel: string; selected: string[] }>;
      metrics: Array<{ round: number; site: string; values: Record<string, number> }>;
    };
    expect(j.federationId).toMatch(/^fed-[0-9a-f]{16}$/);
    expect(j.currentModel).toBe(model);
    expect(j.roundsClosed).toBe(1);
    expect(j.sites.map((s) => [s.name, s.state])).toEqual([['site-a', 'enrolled'], ['site-b', 'enrolled'], ['site-c', 'enrolled']]);
    expect(j.rounds).toHaveLength(1);
    expect(j.rounds[0]).toMatchObject({ round: 1, state: 'closed', resultModel: model });
    expect(j.metrics.find((m) => m.round === 1 && m.site === 'site-a')?.values.num_train).toBe(6);
  });
});
