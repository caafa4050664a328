#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs t5x_like with its pinned dependencies.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# Some machines' pip configs name find-links folders that do not exist; pip warns once
# per package about them, which says nothing about this project.
quiet_pip() {
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2)
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  quiet_pip install -q --upgrade pip
fi
quiet_pip install -q -e '.[test]'
