#!/usr/bin/env bash
# Install everything the test suite needs, then run it. This is the README's
# test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Programs the suite drives besides Python: headless Chromium
# (tests/test_player.py), nginx in front of blobd (tests/test_reverse_proxy.py),
# tus-js-client under Node (tests/test_tus_clients.py), openssl for the TLS
# tests and systemd-analyze for the unit file. A missing one fails its tests
# (Chromium's skips with a hint outside CI), so install what is missing here
# when we can (as root, with apt-get).
missing=()
need() {  # need PACKAGE COMMAND...: the package is wanted if a command is missing
    local package=$1 cmd
    shift
    for cmd in "$@"; do
        if ! command -v "$cmd" >/dev/null && ! [ -x "/usr/sbin/$cmd" ]; then
            missing+=("$package")
            return
        fi
    done
}
need chromium chromium chromedriver
if [ "${#missing[@]}" -gt 0 ] && command -v chromium-browser >/dev/null \
        && command -v chromedriver >/dev/null; then
    missing=()  # Ubuntu's name for it
fi
[ "${#missing[@]}" -eq 0 ] || missing+=(chromium-driver)
need nginx nginx
need nodejs node
need npm npm
need openssl openssl
need systemd systemd-analyze
need strace strace
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "tests/run.sh: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # Installed to be run by the tests, not as services: keep apt from
        # starting nginx on port 80.
        policy=
        if ! [ -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
            trap 'rm -f "$policy"' EXIT
        fi
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
    else
        echo "tests/run.sh: the suite needs ${missing[*]}; install with" \
             "'sudo apt-get install ${missing[*]}'" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
