// Builds the CUDA device addon (native/cuda/ → native/build/Release/medfl_cuda.node) with nvcc, where nvcc and
// cuDNN's headers are found; called by build-native.mjs (install) and runnable alone. Prints ONE line saying
// what was built or what is missing, and never fails the install: CUDA is optional, the CPU engines remain.
// Where cuDNN is looked for: MEDFL_CUDNN_DIR (a folder with include/ and lib/), the system's CUDA/Debian paths,
// then the Python wheel nvidia-cudnn-cu* (`import nvidia.cudnn`). nvcc: MEDFL_NVCC, PATH, /usr/local/cuda/bin.
// MEDFL_CUDA_ARCH replaces the default targets (sm_80 and sm_90 code, compute_90 PTX for newer GPUs).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const srcDir = join(root, 'native', 'cuda');
const outDir = join(root, 'native', 'build', 'Release');
export const CUDA_ADDON = join(outDir, 'medfl_cuda.node');
// The one line of a build that did not happen, for the engine selection's log (shared/engine/cuda-device.ts).
const NOTE = join(outDir, 'medfl_cuda.reason');
const DEFAULT_ARCH = ['-gencode', 'arch=compute_80,code=sm_80', '-gencode', 'arch=compute_90,code=sm_90', '-gencode', 'arch=compute_90,code=compute_90'];

const sh = (cmd) => spawnSync('sh', ['-c', cmd], { encoding: 'utf8' });

function findNvcc() {
  if (process.env.MEDFL_NVCC) return existsSync(process.env.MEDFL_NVCC) ? process.env.MEDFL_NVCC : undefined;
  const onPath = sh('command -v nvcc').stdout?.trim();
  if (onPath) return onPath;
  return ['/usr/local/cuda/bin/nvcc'].find((p) => existsSync(p));
}

/** A folder pair { include, lib } holding cudnn.h and libcudnn.so*, or undefined. */
export function findCudnn() {
  const candidates = [];
  if (process.env.MEDFL_CUDNN_DIR) candidates.push({ include: join(process.env.MEDFL_CUDNN_DIR, 'include'), lib: join(process.env.MEDFL_CUDNN_DIR, 'lib') });
  candidates.push(
    { include: '/usr/include', lib: '/usr/lib/x86_64-linux-gnu' },
    { include: '/usr/include/x86_64-linux-gnu', lib: '/usr/lib/x86_64-linux-gnu' },
    { include: '/usr/local/cuda/include', lib: '/usr/local/cuda/lib64' },
  );
  const py = sh(`${process.env.PYTHON ?? 'python3'} -c "import nvidia.cudnn as m; print(list(m.__path__)[0])" 2>/dev/null`).stdout?.trim();
  if (py) candidates.push({ include: join(py, 'include'), lib: join(py, 'lib') });
  for (const c of candidates) {
    if (!existsSync(join(c.include, 'cudnn.h')) || !existsSync(c.lib)) continue;
    const libs = readdirSync(c.lib).filter((f) => /^libcudnn\.so(\.\d+)?$/.test(f));
    if (libs.length) return { ...c, link: libs.includes('libcudnn.so') ? '-lcudnn' : `-l:${libs.sort()[0]}` };
  }
  return undefined;
}

function nodeHeaders() {
  const dirs = [process.env.npm_config_nodedir && join(process.env.npm_config_nodedir, 'include', 'node'), join(dirname(process.execPath), '..', 'include', 'node'), '/usr/include/node'];
  return dirs.filter(Boolean).find((d) => existsSync(join(d, 'node_api.h')));
}

/** Builds the addon; returns { built: boolean, line: string } (the one line to print). */
export function buildCuda() {
  const r = build();
  mkdirSync(outDir, { recursive: true });
  if (r.built) rmSync(NOTE, { force: true });
  else writeFileSync(NOTE, `${r.line}\n`);
  return r;
}

function build() {
  const not = (why) => ({ built: false, line: `medfl: cuda engine not built (${why}); Med3D trains on the CPU engines` });
  if (process.env.MEDFL_SKIP_CUDA === '1') return not('MEDFL_SKIP_CUDA=1');
  const nvcc = findNvcc();
  if (!nvcc) return not('no nvcc: install the CUDA toolkit, or set MEDFL_NVCC');
  const dnn = findCudnn();
  if (!dnn) return not('no cuDNN headers (cudnn.h): install cuDNN 9 or the nvidia-cudnn-cu13 wheel, or set MEDFL_CUDNN_DIR');
  const nodeInc = nodeHeaders();
  if (!nodeInc) return not('no Node headers (node_api.h)');
  const tmp = join(root, 'native', 'build', 'cuda-tmp');
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  mkdirSync(outDir, { recursive: true });
  const arch = process.env.MEDFL_CUDA_ARCH ? process.env.MEDFL_CUDA_ARCH.split(/\s+/).filter(Boolean) : DEFAULT_ARCH;
  const common = ['-std=c++17', '-O3', '--extended-lambda', ...arch, '-Xcompiler', '-fPIC', `-I${dnn.include}`];
  const steps = [
    [...common, '-c', join(srcDir, 'ops.cu'), '-o', join(tmp, 'ops.o')],
    [...common, '-x', 'cu', '-DNAPI_VERSION=8', '-DNODE_GYP_MODULE_NAME=medfl_cuda', `-I${nodeInc}`, '-c', join(srcDir, 'addon.cc'), '-o', join(tmp, 'addon.o')],
    ['-shared', ...arch, '-o', join(tmp, 'medfl_cuda.node'), join(tmp, 'addon.o'), join(tmp, 'ops.o'), `-L${dnn.lib}`, dnn.link, '-Xlinker', `-rpath,${dnn.lib}`],
  ];
  for (const args of steps) {
    const r = spawnSync(nvcc, args, { encoding: 'utf8' });
    if (r.status !== 0) {
      const out = `${r.stdout ?? ''}\n${r.stderr ?? ''}`;
      const first = out.split('\n').find((l) => /error/i.test(l)) ?? `exit ${r.status}`;
      rmSync(tmp, { recursive: true, force: true });
      return not(`nvcc failed: ${first.trim().slice(0, 200)}`);
    }
  }
  renameSync(join(tmp, 'medfl_cuda.node'), CUDA_ADDON);
  rmSync(tmp, { recursive: true, force: true });
  // Loading needs no GPU (the CUDA runtime is linked statically); a missing cuDNN library shows here.
  const probe = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(CUDA_ADDON)})`], { encoding: 'utf8' });
  if (probe.status !== 0) {
    rmSync(CUDA_ADDON, { force: true });
    const why = (probe.stderr ?? '').split('\n').find((l) => /Error|error:/.test(l)) ?? `exit ${probe.status}`;
    return not(`built, but it does not load here: ${why.trim().slice(0, 200)}`);
  }
  return { built: true, line: `medfl: cuda engine built (native/build/Release/medfl_cuda.node; cuDNN from ${dnn.include})` };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const r = buildCuda();
  console.log(r.line);
  process.exit(!r.built && process.env.MEDFL_NATIVE_STRICT === '1' ? 1 : 0);
}
