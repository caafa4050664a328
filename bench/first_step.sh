#!/usr/bin/env bash
# Time to the first training step against the run's length (issue: start-up must not grow
# with TRAIN_STEPS). Trains the demo with TRAIN_STEPS=300 and =1,000,000, alternating
# (ROUNDS pairs, default 3), each stopped after step 1 with evaluation off, and prints the
# wall time of each run and the median of each setting.
#   bash bench/first_step.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
tmp=$(mktemp -d)
declare -A walls
for ((r = 0; r < rounds; r++)); do
  for steps in 300 1000000; do
    dir="$tmp/run_${steps}_$r"
    start=$(date +%s.%N)
    .venv/bin/python -m t5x_like.train --gin_file=experiments/demo_encdec_ul2.gin \
      --gin.TRAIN_STEPS=$steps --gin.MODEL_DIR="'$dir'" --gin.train.train.stop_at_step=1 \
      --gin.evaluation.EvalConfig.enabled=False > "$dir.log" 2>&1
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    walls[$steps]="${walls[$steps]:-} $wall"
    echo "round $r TRAIN_STEPS=$steps: $wall s to step 1 and exit;" \
      "$(grep -o 'first step (compilation included) took [0-9.]*s' "$dir.log")"
  done
done
for steps in 300 1000000; do
  echo "TRAIN_STEPS=$steps median ${walls[$steps]} -> $(echo ${walls[$steps]} | tr ' ' '\n' |
    sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}') s"
done
rm -rf "$tmp"
