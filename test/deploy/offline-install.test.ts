/**
 * deploy/README.md's offline install, done as written on the target: `npm pack` of the project and the lockfile,
 * unpacked into an empty folder, `npm ci --omit=dev --offline --cache npm-cache` with the registry unreachable; the
 * installed copy must answer `--version` and check a generated MSD folder. "The machine with internet" is played
 * by the local npm cache: every tarball the lockfile names is copied from it, byte for byte (found by its integrity
 * hash), into the release's cache, and the release's lockfile gets the registry URLs that a default npm config
 * writes (a real `npm ci --cache …` on the build machine caches the registry's metadata for them instead).
 * Install scripts are not run here: better-sqlite3 would compile SQLite (minutes on a busy machine); the README
 * says what the target needs for them.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeNifti } from '../../site-agent/data/nifti.ts';

const ROOT = join(fileURLToPath(import.meta.url), '..', '..', '..');
const tmp = mkdtempSync(join(tmpdir(), 'medfl-offline-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Runs a command to completion, failing the test with its output. */
async function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<{ stdout: string; stderr: string }> {
  try {
    return await promisify(execFile)(cmd, args, { cwd, encoding: 'utf8', timeout: 300_000, maxBuffer: 64 * 2 ** 20, env: { ...process.env, ...env } });
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(' ')} (in ${cwd}) failed: ${err.message}\n${err.stdout ?? ''}\n${err.stderr ?? ''}`);
  }
}

interface LockEntry {
  version?: string;
  integrity?: string;
  resolved?: string;
  dev?: boolean;
  link?: boolean;
}

/** A tarball's place in an npm cache directory (cacache's content-v2 layout), from its `sha512-…` integrity. */
function cachedTarball(npmCacheDir: string, integrity: string): string {
  const [algorithm, b64] = integrity.split('-', 2) as [string, string];
  const hex = Buffer.from(b64, 'base64').toString('hex');
  return join(npmCacheDir, '_cacache', 'content-v2', algorithm, hex.slice(0, 2), hex.slice(2, 4), hex.slice(4));
}

/**
 * The build machine's part: copies every non-dev tarball of the lockfile from `fromCache` into `toCache` and writes
 * the lockfile with registry URLs to `lockOut`. Returns the entries whose tarball the local cache lacks.
 */
function fillReleaseCache(lockfile: string, fromCache: string, toCache: string, lockOut: string): string[] {
  const lock = JSON.parse(readFileSync(lockfile, 'utf8')) as { packages: Record<string, LockEntry> };
  const missing: string[] = [];
  for (const [key, e] of Object.entries(lock.packages)) {
    if (!key || e.link || !e.version || !e.integrity) continue;
    const name = key.slice(key.lastIndexOf('node_modules/') + 'node_modules/'.length);
    e.resolved ??= `https://registry.npmjs.org/${name}/-/${name.split('/').pop()}-${e.version}.tgz`;
    if (e.dev) continue;
    const from = cachedTarball(fromCache, e.integrity);
    if (!existsSync(from)) {
      missing.push(key);
      continue;
    }
    const to = cachedTarball(toCache, e.integrity);
    mkdirSync(dirname(to), { recursive: true });
    copyFileSync(from, to);
  }
  writeFileSync(lockOut, JSON.stringify(lock, null, 2));
  return missing;
}

/** Unpacks the release tarball and the lockfile into an empty folder, as the README's target step does. */
async function unpackRelease(release: string, into: string, tarball: string): Promise<void> {
  mkdirSync(into, { recursive: true });
  await run('tar', ['-xzf', join(release, tarball), '-C', into, '--strip-components=1'], release);
  copyFileSync(join(release, 'package-lock.json'), join(into, 'package-lock.json'));
}

describe('offline install from a packed release (deploy/README.md)', () => {
  it('installs into an empty folder with no registry and runs --version and check-data', async () => {
    const { version } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const release = join(tmp, 'release');
    mkdirSync(release);

    // The machine with internet: npm pack, the lockfile beside it, an npm cache with every production tarball.
    await run('npm', ['pack', '--ignore-scripts', '--pack-destination', release], ROOT);
    const tarball = readdirSync(release).find((f) => f.endsWith('.tgz'))!;
    expect(tarball).toBe(`medfl-${version}.tgz`);
    const userCache = (await run('npm', ['config', 'get', 'cache'], ROOT)).stdout.trim();
    const missing = fillReleaseCache(join(ROOT, 'package-lock.json'), userCache, join(release, 'npm-cache'), join(release, 'package-lock.json'));
    // Platform packages of other systems (fsevents, other esbuild binaries) were never downloaded here.
    expect(missing.filter((k) => !/fsevents|@esbuild\//.test(k))).toEqual([]);

    // The target: an empty folder, no registry (nothing listens at the one configured), --offline.
    const app = join(tmp, 'app');
    await unpackRelease(release, app, tarball);
    expect(existsSync(join(app, 'node_modules'))).toBe(false);
    const install = await run(
      'npm',
      ['ci', '--omit=dev', '--offline', '--ignore-scripts', '--no-audit', '--no-fund', '--cache', join(release, 'npm-cache'), '--registry', 'http://127.0.0.1:9/'],
      app,
    );
    expect(install.stdout + install.stderr).not.toMatch(/ENOTCACHED|ECONNREFUSED|failed optional/);
    expect(existsSync(join(app, 'node_modules', '@esbuild', 'linux-x64')) || process.arch !== 'x64').toBe(true);
    for (const dev of ['vitest', 'typescript', 'onnxruntime-node', '@biomejs/biome']) {
      expect(existsSync(join(app, 'node_modules', dev)), `dev dependency ${dev} installed`).toBe(false);
    }

    const bin = join(app, 'bin', 'medfl.js');
    expect((await run(process.execPath, [bin, '--version'], app)).stdout.trim()).toBe(version);

    const data = join(tmp, 'msd');
    const dims = [8, 7, 6] as const;
    const n = dims[0] * dims[1] * dims[2];
    for (const name of ['a', 'b']) {
      await writeNifti(join(data, 'imagesTr', `${name}_0000.nii.gz`), { data: Float32Array.from({ length: n }, (_, i) => i % 11), dims, spacing: [1, 1, 2] });
      await writeNifti(join(data, 'labelsTr', `${name}.nii.gz`), { data: Uint8Array.from({ length: n }, (_, i) => (i % 5 === 0 ? 1 : 0)), dims, spacing: [1, 1, 2] });
    }
    writeFileSync(join(data, 'dataset.json'), JSON.stringify({ name: 'offline', modality: { '0': 'CT' }, labels: { '0': 'background', '1': 'organ' }, numTraining: 2 }));
    const check = await run(process.execPath, [bin, 'site', 'check-data', data], app);
    expect(check.stdout).toMatch(/dataset 'offline'/);
    expect(check.stdout).toMatch(/usable: 2 training/);
  }, 420_000);
});
