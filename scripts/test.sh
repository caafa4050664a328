#!/usr/bin/env bash
# Sets up .venv with the test tools and runs the test suite: the default suite (about 5 min
# on 2 cores), plus the tests marked slow (about 25 min more) when RUN_SLOW=1 or under CI
# (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "${RUN_SLOW:-0}" = "1" ] || [ "${CI:-false}" = "true" ]; then
  exec .venv/bin/python -m pytest -q -m "" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
