#!/usr/bin/env bash
# Sets up and runs MedFL's whole test suite on a fresh machine (README's second command; CI runs exactly this).
# Installs what the tests need: the Debian packages nats-server (tests start their own on a free port), libdnnl-dev g++ make
# python3-torch and chromium, and npm packages.
set -uo pipefail
cd "$(dirname "$0")/.."

# libdnnl-dev, g++ and make: `npm ci` builds the oneDNN conv engine (native/) with them; its tests require it.
# python3-torch: the PyTorch export test loads the exported file into MedicalNet's module with /usr/bin/python3.
# chromium: the dashboard test drives the coordinator's dashboard in a real browser (puppeteer-core, no bundled browser).
if ! command -v nats-server >/dev/null 2>&1 || [ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ] || ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import torch' >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian packages: nats-server (event-bus tests), libdnnl-dev g++ make (oneDNN conv engine), python3-torch (export test), chromium (dashboard browser test)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nats-server libdnnl-dev g++ make python3-torch chromium >/dev/null || { echo "could not install nats-server libdnnl-dev g++ make python3-torch chromium"; exit 1; }
fi

# @tensorflow/tfjs-node(-gpu) are optional: without internet their install fails and npm drops them;
# the engine then falls back to the pure-JS backend and says so.
npm ci --no-audit --no-fund || { echo "npm ci failed"; exit 1; }

typecheck=0
npx tsc -p tsconfig.json --noEmit || typecheck=$?

# Biome, lint rules only (biome.jsonc; it never reformats). Warnings count as failures.
lint=0
npx biome lint --error-on-warnings || lint=$?

results=.vitest-results.json
rm -f "$results"
npx vitest run --reporter=default --reporter=json --outputFile="$results"
tests=$?

node scripts/test-summary.mjs "$results" "$typecheck" "$lint"
summary=$?
if [ "$typecheck" -ne 0 ]; then echo "typecheck failed (tsc exit $typecheck)"; exit 1; fi
if [ "$lint" -ne 0 ]; then echo "lint failed (biome exit $lint; run npm run lint)"; exit 1; fi
[ "$tests" -ne 0 ] && exit "$tests"
exit "$summary"
