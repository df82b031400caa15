/**
 * deploy/ stays true to the code: every `medfl` command line in the systemd units and in deploy/README.md names
 * a real subcommand with real options (checked against the CLI's own --help), the units' variables are defined
 * by the env examples, every MEDFL_* variable those set is read by the code, the units keep their hardening, and
 * the NATS configuration is one nats-server accepts.
 */
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(fileURLToPath(import.meta.url), '..', '..', '..');
const DEPLOY = join(ROOT, 'deploy');
const read = (...p: string[]) => readFileSync(join(DEPLOY, ...p), 'utf8');

/** `[Section]` → key → values (a key may repeat). */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const sections = new Map<string, Map<string, string[]>>();
  let current: Map<string, string[]> | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const section = /^\[(.+)\]$/.exec(line);
    if (section) {
      current = new Map();
      sections.set(section[1]!, current);
      continue;
    }
    const eq = line.indexOf('=');
    if (!current || eq < 0) throw new Error(`not a unit line: ${line}`);
    const key = line.slice(0, eq);
    current.set(key, [...(current.get(key) ?? []), line.slice(eq + 1)]);
  }
  return sections;
}

const helpCache = new Map<string, string>();
/** The CLI's own help for a subcommand path (e.g. ['coordinator', 'start']). */
function help(words: string[]): string {
  const key = words.join(' ');
  if (!helpCache.has(key)) {
    const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'medfl.js'), ...words, '--help'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, `medfl ${key} --help failed: ${r.stderr}`).toBe(0);
    helpCache.set(key, r.stdout);
  }
  return helpCache.get(key)!;
}

/** Checks one `… medfl.js word word --opt value …` command line against the CLI; returns what it checked. */
function checkCommandLine(line: string): { command: string; options: string[] } {
  const tokens = line.trim().split(/\s+/);
  const at = tokens.findIndex((t) => t.endsWith('medfl.js'));
  expect(at, `no medfl.js in: ${line}`).toBeGreaterThanOrEqual(0);
  const rest = tokens.slice(at + 1);
  const words: string[] = [];
  for (const t of rest) {
    if (t.startsWith('-') || t.startsWith('$')) break;
    // Subcommands are words the parent's help lists; the first other word is an argument (e.g. a site name).
    const parent = help(words);
    if (!new RegExp(`^\\s+${t}\\b`, 'm').test(parent.split('Commands:')[1] ?? '')) break;
    words.push(t);
  }
  expect(words.length, `no medfl subcommand in: ${line}`).toBeGreaterThan(0);
  const text = help(words);
  const options = rest.filter((t) => /^--[a-z]/.test(t)).map((t) => t.split('=')[0]!);
  for (const o of options) expect(new RegExp(`${o}(?![\\w-])`).test(text), `medfl ${words.join(' ')} has no option ${o} (used in: ${line.trim()})`).toBe(true);
  return { command: words.join(' '), options };
}

function envVars(text: string): Map<string, string> {
  const vars = new Map<string, string>();
  for (const raw of text.split('\n')) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(raw.trim());
    if (m) vars.set(m[1]!, m[2]!);
  }
  return vars;
}

const units = [
  { file: 'medfl-coordinator.service', env: 'coordinator.env.example', state: 'coordinator', command: 'coordinator start' },
  { file: 'medfl-site.service', env: 'site.env.example', state: 'site', command: 'site run' },
];

describe('systemd units', () => {
  for (const u of units) {
    it(`${u.file}: a real command with real options, its variables defined, its state directory, hardened`, () => {
      const unit = parseUnit(read('systemd', u.file));
      const service = unit.get('Service')!;
      const exec = service.get('ExecStart')!;
      expect(exec).toHaveLength(1);
      const checked = checkCommandLine(exec[0]!);
      expect(checked.command).toBe(u.command);
      expect(exec[0]).toContain(`--dir /var/lib/medfl/${u.state}`);
      expect(service.get('StateDirectory')).toEqual([`medfl/${u.state}`]);
      expect(service.get('StateDirectoryMode')).toEqual(['0700']);

      const env = envVars(read('env', u.env));
      for (const m of exec[0]!.matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?/g)) expect(env.has(m[1]!), `${m[1]} is not set in env/${u.env}`).toBe(true);
      if (env.has('MEDFL_COORDINATOR_ARGS')) checkCommandLine(`medfl.js coordinator start ${env.get('MEDFL_COORDINATOR_ARGS')}`);

      expect(service.get('User')).toEqual(['medfl']);
      for (const [k, v] of [['NoNewPrivileges', 'yes'], ['ProtectSystem', 'strict'], ['PrivateTmp', 'yes'], ['Restart', 'on-failure']]) expect(service.get(k!), k).toEqual([v]);
      expect(service.get('CapabilityBoundingSet')).toEqual(['']);
      // V8 compiles code at run time: this would kill the process at start.
      expect(service.has('MemoryDenyWriteExecute')).toBe(false);
      expect(unit.get('Install')?.get('WantedBy')).toEqual(['multi-user.target']);
    });
  }
});

describe('env examples', () => {
  it('set only MEDFL_* variables the code reads', () => {
    const sources = [join(ROOT, 'cli'), join(ROOT, 'site-agent'), join(ROOT, 'coordinator'), join(ROOT, 'shared')].flatMap((d) =>
      (readdirSync(d, { recursive: true }) as string[]).filter((f) => f.endsWith('.ts')).map((f) => readFileSync(join(d, f), 'utf8')),
    );
    const all = sources.join('\n');
    for (const file of readdirSync(join(DEPLOY, 'env'))) {
      for (const name of envVars(read('env', file)).keys()) {
        if (!name.startsWith('MEDFL_') || name === 'MEDFL_COORDINATOR_ARGS' || name === 'MEDFL_DATA_DIR') continue; // read by the units
        expect(all, `${name} (env/${file}) is read nowhere in the code`).toContain(name);
      }
    }
  });
});

describe('deploy/README.md', () => {
  it('every medfl command it shows exists with the options it uses', () => {
    const lines = read('README.md').split('\n').filter((l) => l.includes('/opt/medfl/bin/medfl.js'));
    expect(lines.length).toBeGreaterThanOrEqual(6);
    const commands = new Set(lines.map((l) => checkCommandLine(l).command));
    for (const c of ['coordinator init', 'coordinator site add', 'coordinator site revoke', 'status', 'site check-data', 'site enroll']) expect(commands).toContain(c);
  });
});

describe('nats/nats-server.conf', () => {
  it('is a configuration nats-server accepts', () => {
    const r = spawnSync('nats-server', ['-c', join(DEPLOY, 'nats', 'nats-server.conf'), '-t'], { encoding: 'utf8' });
    expect(r.error, 'nats-server is not installed (scripts/test.sh installs it)').toBeUndefined();
    expect(`${r.stdout}${r.stderr}`).toMatch(/is valid/);
    expect(r.status).toBe(0);
  });
});
