#!/usr/bin/env bash
# MaxText's trainer against ours on MaxText's CPU reference model, in one sitting.
#
#   bash bench/maxtext_compare.sh [ROUNDS=3] [STEPS=15]
#
# The model (decoder-only, 4 layers, width 256, 4x64 heads, SwiGLU 1024, vocabulary
# 32,000 untied, sequence 256, 8 sequences per step; bench/reference_llama.gin is ours).
# Set-up, once: a venv of its own, bench/.maxtext-venv (git-ignored), with Python >= 3.12
# (MaxText needs it), `pip install maxtext` with jax/jaxlib pinned to 0.10.2 (with
# JAX 0.12 MaxText ran about 2x slower on this CPU), then the packages of MaxText's `tpu`
# extra except jax, jaxlib and libtpu (that extra asks for jax >= 0.11.1; the plain
# package installs no dependencies at all), their versions left to pip.
# Each round runs MaxText's trainer (synthetic data, no checkpoints) and then our step
# (bench/speed.py --only reference) for each dtype, alternating; MaxText's tokens/s is
# the median of its logged "Tokens/s/device" after its first 3 steps (compile and warm-up).
# The result: the median over rounds of each and their ratio, printed and written to
# bench/results/maxtext_compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-15}
VENV=bench/.maxtext-venv
PY312=${PY312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
OURS=${OURS_PYTHON:-.venv/bin/python}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import maxtext.trainers.pre_train.train" 2>/dev/null; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q maxtext "jax==0.10.2" "jaxlib==0.10.2"
  META=$(ls -d "$VENV"/lib/python3.*/site-packages/maxtext-*.dist-info)/METADATA
  grep "extra == 'tpu'" "$META" | sed -E "s/^Requires-Dist: //; s/;.*//; s/[<>=!~].*//" \
    | grep -viE "^(jax|jaxlib|libtpu)$" > "$VENV/requirements-tpu-nojax.txt"
  "$VENV/bin/pip" install -q -r "$VENV/requirements-tpu-nojax.txt" "jax==0.10.2" "jaxlib==0.10.2"
fi
