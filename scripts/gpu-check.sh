#!/usr/bin/env bash
# The GPU check (docs/gpu.md), run from the repository root on a GPU machine with CUDA (nvcc), cuDNN (system or
# the nvidia-cudnn-cu* Python wheel) and PyTorch, no internet and possibly no Node: it takes Node and the bundled
# check from gpu-pack/ (scripts/gpu-pack.sh), builds the CUDA addon, then runs bench/gpu-check.ts — parity of the
# training step with the PyTorch fixtures and the host engine, then step times against PyTorch on the same GPU.
#   bash scripts/gpu-check.sh [--parity-only] [--steps N] [--sizes 64,128]
# Exit: 0 all parity checks passed; 1 a check failed; 2 no usable GPU; 3 the addon did not build.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=gpu-pack
WORK=${TMPDIR:-/tmp}/medfl-gpu
PY=${PYTHON:-python3}
mkdir -p "$WORK/bin"
export PYTHON=$PY

if command -v node >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  NODE=$(command -v node)
else
  # Python's lzma: xz-utils may be missing there.
  "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$PACK/node.xz" "$WORK/bin/node"
  chmod +x "$WORK/bin/node"
  NODE=$WORK/bin/node
fi
export PATH="$(dirname "$NODE"):$PATH:/usr/local/cuda/bin"
echo "node $("$NODE" --version) at $NODE"

if [ ! -f /usr/include/node/node_api.h ] && [ ! -f "$(dirname "$NODE")/../include/node/node_api.h" ]; then
  "$PY" -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$PACK/node-include.tar.xz" "$WORK/include"
  export npm_config_nodedir=$WORK
fi

# The CUDA libraries of the Python wheels (cuDNN loads its engine libraries, and they load cuBLAS, by name).
NVLIBS=$("$PY" -c "import os, nvidia; print(':'.join(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, 'lib'))))" 2>/dev/null || true)
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -1 || true
# H100 and H200 are sm_90: one target keeps the build short.
MEDFL_CUDA_ARCH=${MEDFL_CUDA_ARCH:-"-gencode arch=compute_90,code=sm_90"} "$NODE" scripts/build-cuda.mjs
[ -f native/build/Release/medfl_cuda.node ] || exit 3

if [ -f "$PACK/gpu-check.mjs" ]; then
  "$NODE" "$PACK/gpu-check.mjs" "$@"
else
  "$NODE" --import tsx bench/gpu-check.ts "$@"
fi
