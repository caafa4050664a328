#!/usr/bin/env bash
# Creates .venv (Python 3.12 or newer) and installs t5x_like with its pinned dependencies.
#   bash scripts/setup.sh        what the demo and the library need, nothing more
#   bash scripts/setup.sh test   that, plus the test tools, Apache Beam (prepare --runner,
#                                t5x_like.data.dedup) and, on Linux x86_64, libtpu (the TPU
#                                compiler: the tests that plan a TPU slice ahead of time);
#                                INTEROP=1 adds the interop extra (torch and transformers: the
#                                live Hugging Face tests)
# Idempotent: a second run only checks that everything is installed. A .venv of an older
# Python (made by an earlier version of this script) is made anew.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-demo}
case "$MODE" in
  demo) EXTRAS= ;;
  test) EXTRAS="[test,beam${INTEROP:+,interop}]" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
BEAM=apache-beam==2.78.0

supported() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    supported "$PYTHON" && { echo "$PYTHON"; return; }
    echo "PYTHON=$PYTHON is not a Python 3.12 or newer." >&2; return 1
  fi
  local c
  for c in python3.12 python3.13 python3; do
    command -v "$c" >/dev/null 2>&1 && supported "$c" && { echo "$c"; return; }
  done
  # pyenv installs versions that its shims only run when selected.
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3; do
    [ -x "$c" ] && supported "$c" && { echo "$c"; return; }
  done
  echo "t5x_like needs Python 3.12 or newer (jax 0.12 has no wheel for 3.11); none was" \
       "found. Install one, or name it: PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
  return 1
}

# Drops two notices that say nothing about this project: pip's warning about find-links
# folders (named by some machines' pip configs) that do not exist, and setuptools' notice
# that an editable install is one.
quiet_pip() {
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" \
    | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' >&2)
}

if [ -x .venv/bin/python ] && ! supported .venv/bin/python; then
  echo "setup: .venv is $(.venv/bin/python --version 2>&1); making it anew with Python 3.12+" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  "$PY" -m venv .venv
  quiet_pip install -q --upgrade pip
fi
quiet_pip install -q -e ".$EXTRAS"
if [ "$MODE" = test ]; then
  # Beam without its own requirements: it pins protobuf<7, which would break seqio's
  # import of sentencepiece (pyproject.toml, the beam extra, says why).
  quiet_pip install -q --no-deps "$BEAM"
fi
