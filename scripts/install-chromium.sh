#!/bin/sh
# Install a real headless browser (Debian's `chromium` and `chromium-driver` packages) for
# tests/test_report_html.py, which renders the HTML report and measures it. Idempotent: does nothing
# when `chromium` and `chromedriver` are on PATH.
set -eu

PATH="$PATH:/usr/sbin:/usr/bin:/sbin:/bin"
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install-chromium: already installed ($(chromium --version 2>/dev/null | head -n1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: chromium or chromedriver is missing and apt-get is not available;" \
         "install Chromium and its matching chromedriver by hand (or set SHADOWLENS_SKIP_BROWSER=1 to skip the browser test)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-chromium: chromium is missing; run as root (or with sudo): apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Refresh the package lists only when apt does not know an installable candidate yet.
updated=""
candidate=$(apt-cache policy chromium-driver 2>/dev/null | sed -n 's/^ *Candidate: *//p')
if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    $SUDO apt-get update -qq
    updated=" (after apt-get update)"
fi

log=$(mktemp)
# chromium-driver depends on the chromium of the same version, so both come from one source.
if ! $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install-chromium: apt-get install chromium chromium-driver failed" >&2
    exit 1
fi
rm -f "$log"

echo "install-chromium: installed${updated}: $(chromium --version 2>/dev/null | head -n1)"
