#!/usr/bin/env bash
# The dashboard's browser tests: a real `multiagents serve`, HTTP workers
# and headless Chromium driven by playwright-core (ui-tests/).
#
#   scripts/ui-test.sh [path/to/multiagents]
#
# Installs Debian's chromium and chromium-driver with apt-get when missing
# (as root), and playwright-core from npm (pinned in ui-tests/package-lock.json)
# when ui-tests/node_modules lacks it. Screenshots go to $SCREENSHOTS
# (default target/ui-screenshots).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/multiagents}

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >&2
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "error: the browser tests need chromium (apt-get install chromium chromium-driver)" >&2
  exit 1
fi
if ! command -v node >/dev/null 2>&1; then
  echo "error: the browser tests need Node.js (20 or later)" >&2
  exit 1
fi
if [ ! -f ui-tests/node_modules/playwright-core/package.json ]; then
  (cd ui-tests && npm ci --no-audit --no-fund --loglevel=error)
fi
MULTIAGENTS_BIN="$PWD/$bin" CHROMIUM="$(command -v chromium)" \
  node --test --test-concurrency=1 ui-tests/dashboard.test.mjs
