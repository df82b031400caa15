#!/usr/bin/env node
// Builds the oneDNN convolution addon (native/) with node-gyp, and the CUDA one where nvcc and cuDNN are (build-cuda.mjs). Run by `npm ci` / `npm install`
// (postinstall) and by `npm run build:native`. When a prerequisite is missing it prints ONE line saying
// what and how to fix it, and exits 0, so installing never fails because of the optional native engine.
// MEDFL_NATIVE_STRICT=1 makes a failed build exit 1 (for `npm run build:native` in CI-like checks).
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildCuda } from './build-cuda.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');
const FIX = 'apt-get install -y libdnnl-dev g++ make';
const strict = process.env.MEDFL_NATIVE_STRICT === '1';

// The CUDA device addon is built last (node-gyp's rebuild clears native/build), with its own line, whatever
// happened to oneDNN; its failure never fails the install.
function finish(code) {
  try {
    console.log(buildCuda().line);
  } catch (e) {
    console.log(`medfl: cuda engine not built (${e instanceof Error ? e.message : String(e)}); Med3D trains on the CPU engines`);
  }
  process.exit(code);
}

function skip(why) {
  console.log(`medfl: oneDNN conv engine not built: ${why}; fix: ${FIX} && npm run build:native (training falls back to the JS kernels)`);
  finish(strict ? 1 : 0);
}

if (process.env.MEDFL_SKIP_NATIVE === '1') skip('MEDFL_SKIP_NATIVE=1');
if (!existsSync(join(nativeDir, 'binding.gyp'))) skip('native/binding.gyp is missing');

const has = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
const missing = [];
if (!existsSync('/usr/include/oneapi/dnnl/dnnl.hpp')) missing.push('oneDNN headers (/usr/include/oneapi/dnnl/dnnl.hpp, package libdnnl-dev)');
if (!has('g++')) missing.push('g++');
if (!has('make')) missing.push('make');
if (!has('python3')) missing.push('python3');
if (missing.length) skip(`missing ${missing.join(', ')}`);

// node-gyp: the one npm ships (npm sets npm_config_node_gyp for lifecycle scripts), else next to node.
const candidates = [
  process.env.npm_config_node_gyp,
  join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
].filter(Boolean);
const nodeGyp = candidates.find((p) => existsSync(p));
if (!nodeGyp) skip('node-gyp not found (it ships with npm)');

// Build against the local Node headers when they are installed (no download); npm's own config may say so too.
const args = [nodeGyp, 'rebuild', '--directory', nativeDir];
const nodedir = process.env.npm_config_nodedir || (existsSync('/usr/include/node/node_api.h') ? '/usr' : undefined);
if (nodedir) args.push(`--nodedir=${nodedir}`);
const r = spawnSync(process.execPath, args, { cwd: nativeDir, encoding: 'utf8', env: process.env });
if (r.status !== 0) {
  const out = `${r.stdout ?? ''}\n${r.stderr ?? ''}`;
  const firstError = out.split('\n').find((l) => /error/i.test(l) && !/gyp ERR! (stack|cwd|node|System|command|not ok)/.test(l));
  rmSync(join(nativeDir, 'build', 'Release', 'medfl_onednn.node'), { force: true });
  skip(`node-gyp build failed (${(firstError ?? `exit ${r.status}`).trim().slice(0, 200)})`);
}
// Load it once in a child: a missing runtime library or a bad build shows here, at install, not at the first round.
const addonPath = join(nativeDir, 'build', 'Release', 'medfl_onednn.node');
const probe = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(addonPath)}).info()`], { encoding: 'utf8' });
if (probe.status !== 0) {
  const why = (probe.stderr ?? '').split('\n').find((l) => /Error|error:/.test(l)) ?? (probe.signal ? `killed by ${probe.signal}` : `exit ${probe.status}`);
  skip(`built, but it does not load here (${why.trim().slice(0, 200)})`);
}
console.log(`medfl: oneDNN conv engine built (native/build/Release/medfl_onednn.node; portable: x86-64-v2 baseline on x64)`);
finish(0);
