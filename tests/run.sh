#!/usr/bin/env bash
# Install everything the test suite needs, then run it. This is the README's
# test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser test (tests/test_player.py) drives headless Chromium. It skips
# with a hint when Chromium is missing, except under CI, where it fails: so
# install it here when we can (as root, with apt-get), and only if missing.
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null \
        || command -v chromium-browser >/dev/null; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "tests/run.sh: installing chromium and chromium-driver" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "tests/run.sh: the browser test needs Chromium; install it with" \
             "'sudo apt-get install chromium chromium-driver'" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
