#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs t5x_like with its pinned dependencies, the
# test tools, the interop extra (torch, transformers: the reference of tests/test_hf.py)
# and the beam extra (Apache Beam, for t5x_like.dedup).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# Drops notices that say nothing about this project: pip's warning about find-links
# folders (named by some machines' pip configs) that do not exist, setuptools' notice
# that an editable install is one, and pip's report of Beam's protobuf pin (below).
quiet_pip() {
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" \
    | grep -v "^ERROR: pip's dependency resolver does not\|^apache-beam .* requires protobuf" \
    | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' >&2)
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  quiet_pip install -q --upgrade pip
fi
quiet_pip install -q -e '.[test,interop]'
# Apache Beam (the [beam] extra, for t5x_like.dedup) pins protobuf < 7 and would take the
# protobuf 7 runtime away that sentencepiece's generated code (imported by seqio) needs:
# install it once, then put that protobuf back (pip then reports Beam's pin as unmet;
# Beam runs on protobuf 7, tests/test_dedup.py).
PROTOBUF=$(.venv/bin/python -c "from importlib.metadata import version; print(version('protobuf'))")
if ! .venv/bin/python -c "import apache_beam" 2>/dev/null; then
  quiet_pip install -q -e '.[beam]'
  quiet_pip install -q "protobuf==$PROTOBUF"
fi
