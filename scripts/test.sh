#!/usr/bin/env bash
# Sets up .venv and runs the default test suite (slow tests too when RUN_SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${RUN_SLOW:-0}" = "1" ]; then
  exec .venv/bin/python -m pytest -q -m "" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
