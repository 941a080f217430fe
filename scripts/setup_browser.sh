#!/usr/bin/env bash
# A headless browser for the report test (tests/test_bench.py): Debian's chromium, installed once
# where apt-get and root allow; elsewhere the test is skipped and says why. Never fails the set-up.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the report's browser test (once)..."
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "could not install chromium; the browser test will be skipped"
else
    echo "no chromium and no root apt-get: the report's browser test will be skipped"
fi
exit 0
