#!/usr/bin/env bash
# Sets up and runs MedFL's whole test suite on a fresh machine (README's second command; CI runs exactly this).
# Installs what the tests need: the Debian package nats-server (tests start their own on a free port) and npm packages.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (Debian package) for the event-bus tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nats-server >/dev/null || { echo "could not install nats-server"; exit 1; }
fi

# @tensorflow/tfjs-node(-gpu) are optional: without internet their install fails and npm drops them;
# the engine then falls back to the pure-JS backend and says so.
npm ci --no-audit --no-fund || { echo "npm ci failed"; exit 1; }

typecheck=0
npx tsc -p tsconfig.json --noEmit || typecheck=$?

results=.vitest-results.json
rm -f "$results"
npx vitest run --reporter=default --reporter=json --outputFile="$results"
tests=$?

node scripts/test-summary.mjs "$results" "$typecheck"
summary=$?
if [ "$typecheck" -ne 0 ]; then echo "typecheck failed (tsc exit $typecheck)"; exit 1; fi
[ "$tests" -ne 0 ] && exit "$tests"
exit "$summary"
