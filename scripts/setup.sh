#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs t5x_like with its pinned dependencies, the
# test tools, the interop extra (torch, transformers: the reference of tests/test_hf.py)
# and Apache Beam (prepare --runner, t5x_like.dedup).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# Drops two notices that say nothing about this project: pip's warning about find-links
# folders (named by some machines' pip configs) that do not exist, and setuptools' notice
# that an editable install is one.
quiet_pip() {
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" \
    | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' >&2)
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  quiet_pip install -q --upgrade pip
fi
quiet_pip install -q -e '.[test,interop,beam]'
# Beam without its own requirements: it pins protobuf<7, which would break seqio's
# import of sentencepiece (pyproject.toml, the beam extra, says why).
quiet_pip install -q --no-deps apache-beam==2.77.0
