#!/usr/bin/env bash
# Install what pyhv and its tests need on a fresh Debian 12 machine:
# Debian packages (assembler/compiler for test guests, QEMU's tools as interop and
# performance peers, busybox for the Linux guest's initramfs, mmdebstrap for the Debian
# root disk of `pyhv guest fetch debian`, Chromium for the web console's browser test),
# a virtualenv, and the web console's xterm.js from the npm registry (with the
# machine's Node.js and npm; src/pyhv/hostd/web/package-lock.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="gcc binutils qemu-utils qemu-system-x86 busybox-static cpio mmdebstrap chromium"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[dev]'
if command -v npm >/dev/null 2>&1; then
  (cd src/pyhv/hostd/web && npm ci --no-audit --no-fund --silent) ||
    echo "setup: npm ci failed: the web console falls back to a plain-text console"
else
  echo "setup: no npm: the web console falls back to a plain-text console (no xterm.js)"
fi
echo "setup: ready (.venv/bin/pyhv)"
