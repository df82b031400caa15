#!/usr/bin/env bash
# Packs a previous release's `medfl` CLI (coordinator and site agent) for test/e2e/compatibility.test.ts:
# the TypeScript sources its CLI imports (found by esbuild's metafile), bin/, proto/ and package.json, as tar.xz.
# It runs with the current node_modules. Usage: scripts/previous-release-fixture.sh [COMMIT] (default 3b6b42d).
set -euo pipefail
commit="${1:-3b6b42d}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/test/fixtures/previous-release/medfl-$commit.tar.xz"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git -C "$repo" archive "$commit" | tar -x -C "$tmp"
(cd "$tmp" && "$repo/node_modules/.bin/esbuild" cli/medfl.ts --bundle --platform=node --format=esm --packages=external \
  --metafile=meta.json --outfile=/dev/null --log-level=warning)
node -e 'console.log(Object.keys(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).inputs).join("\n"))' "$tmp/meta.json" > "$tmp/files.txt"
# Fixed order, owner and times, so the same commit always packs to the same bytes.
tar -C "$tmp" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' -cf - -T "$tmp/files.txt" bin proto package.json | xz -9e > "$out"
echo "$out: $(wc -c < "$out") bytes, $(wc -l < "$tmp/files.txt") source files"
