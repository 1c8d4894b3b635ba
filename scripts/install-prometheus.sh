#!/bin/sh
# Install a real Prometheus server (Debian's `prometheus` package) for the end-to-end test
# tests/test_prometheus_e2e.py. Idempotent: does nothing when `prometheus` and `promtool` are on PATH.
#
# The package's maintainer scripts would start the prometheus service (on :9090). A temporary
# policy-rc.d (exit 101 = "action forbidden") keeps them from starting anything; without systemd the
# start would fail or leave a stray daemon behind, neither of which the tests want.
set -eu

PATH="$PATH:/usr/sbin:/usr/bin:/sbin:/bin"
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: already installed ($(prometheus --version 2>&1 | head -n1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: prometheus is missing and apt-get is not available; install Prometheus >= 2.x by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-prometheus: prometheus is missing; run as root (or with sudo): apt-get install prometheus" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Refresh the package lists only when apt does not know an installable candidate yet.
updated=""
candidate=$(apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: *//p')
if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    $SUDO apt-get update -qq
    updated=" (after apt-get update)"
fi

POLICY=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    own_policy=1
fi
cleanup() { if [ -n "$own_policy" ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT INT TERM

log=$(mktemp)
if ! $SUDO apt-get install -y -q --no-install-recommends prometheus >"$log" 2>&1; then
    # A maintainer script that failed only because no init system runs leaves the package
    # half-configured; the binaries are usable all the same.
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install-prometheus: apt-get install prometheus failed" >&2
        exit 1
    fi
fi
rm -f "$log"

echo "install-prometheus: installed prometheus${updated}: $(prometheus --version 2>&1 | head -n1)"
