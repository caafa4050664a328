#!/usr/bin/env bash
# The accelerator check (issue 26; docs/PERFORMANCE.md "Accelerator check"): on a machine
# with one GPU or TPU, in under 10 minutes, (1) the kernel-equality tests of
# tests/test_attention.py on the device, (2) a tiny model trained a few steps with the
# production train step, (3) tokens/s and MFU of a ~1.2B Llama (Llama 3.2 1B's shape) at
# 2,048 and 8,192 tokens for each attention implementation the backend has. Writes
# bench/results/accelerator_check-<time>.json and prints a table.
#   bash bench/accelerator_check.sh                 # the whole check
#   bash bench/accelerator_check.sh --cpu-smoke     # a tiny version on CPU (< 60 s)
#   bash bench/accelerator_check.sh --lengths 8192 --implementations xla,cudnn
# Python: $PYTHON, else this checkout's .venv, else python3 on the PATH (the lent GPU
# machines' own Python 3.12 with JAX 0.11, which has no TensorFlow, SeqIO, grain or gin:
# nothing here imports them). Needs no package beyond jax, flax, optax and numpy.
# No GPU or TPU was available where this was written: only --cpu-smoke has run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
# One process holds the device: let it use most of the memory (jax's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The sections' budgets add up to 540 s, each with its own guard; this is the last word.
exec timeout --signal=TERM --kill-after=10 590 "$py" bench/accelerator_check.py "$@"
