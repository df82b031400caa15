#!/usr/bin/env bash
# Prepares gpu-pack/ (git-ignored) for scripts/gpu-check.sh on a GPU machine that has no Node and no internet
# (docs/gpu.md): this Node binary xz-compressed, its headers (to build the addon there), and bench/gpu-check.ts
# bundled with every dependency into one ES module. Run it here, then carry gpu-pack to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=gpu-pack
rm -rf "$PACK" && mkdir -p "$PACK"
NODE_BIN=$(readlink -f "$(command -v node)")
# The carried binary must not need libraries the GPU machine may lack (Debian's node links libnode and others).
if ldd "$NODE_BIN" | grep -qvE 'linux-vdso|libdl|libstdc\+\+|libm\.|libgcc_s|libpthread|libc\.|ld-linux'; then
  echo "gpu-pack: $NODE_BIN links libraries beyond libc/libstdc++; use an official Node 20 build" >&2
  exit 1
fi
nice -n 10 xz -T1 -6 -c "$NODE_BIN" > "$PACK/node.xz"
# Node headers: the official layout (bin/../include/node) or the distribution's /usr/include/node.
INC=$(dirname "$NODE_BIN")/../include
[ -f "$INC/node/node_api.h" ] || INC=/usr/include
# Node-API needs these four (the whole folder is ~50 MB of V8 and OpenSSL headers).
tar -C "$INC" -cJf "$PACK/node-include.tar.xz" node/node_api.h node/node_api_types.h node/js_native_api.h node/js_native_api_types.h
npx esbuild bench/gpu-check.ts --bundle --platform=node --format=esm --target=node20 --log-level=warning \
  --banner:js="import { createRequire as __medflRequire } from 'node:module'; const require = __medflRequire(import.meta.url);" \
  --outfile="$PACK/gpu-check.mjs"
du -ch "$PACK"/* | sed 's/^/gpu-pack: /'
