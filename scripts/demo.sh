#!/usr/bin/env bash
# Sets up .venv and runs the README demo: a tiny Reka/UL2-style encoder-decoder trained
# on reka_mix_ul2 (5 domains x 7 UL2 denoisers) on 8 CPU-emulated devices with FSDP.
# Extra arguments go to the trainer, e.g. --gin.TRAIN_STEPS=100.
# Started again, it resumes from the newest checkpoint in runs/demo_encdec_ul2;
# delete that directory for a fresh run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# TensorFlow's tokenizer op logs one INFO line per SentencePiece load from C++, where no
# Python setting reaches; keep the console to our own lines.
exec .venv/bin/python -m t5x_like.train \
  --gin_file=experiments/demo_encdec_ul2.gin "$@" \
  2> >(grep --line-buffered -v -e 'precompiled_charsmap is empty' -e 'cuInit' \
         -e 'absl::InitializeLog' -e 'oneDNN custom operations' -e 'Could not find cuda' >&2)
