#!/usr/bin/env bash
# Create .venv and install pinned dependencies (idempotent: reinstalls only when the
# requirement files change). Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=requirements.txt
[ "${1:-}" = dev ] && want=requirements-dev.txt
stamp=.venv/.installed-$(cat requirements.txt "$want" | sha256sum | cut -c1-16)-${1:-run}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$want"
  touch "$stamp"
fi
