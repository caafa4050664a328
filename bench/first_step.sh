#!/usr/bin/env bash
# Time from launch to the demo's first training step, alternating settings in one sitting.
#   bash bench/first_step.sh [ROUNDS] [CHECKOUT ...]
# Each round trains the demo (evaluation off) to step 1 and exits, once for every
# CHECKOUT (default: this one; each with its own .venv, so an older commit on its own
# stack can be timed against this one: `git worktree add ../old REV && bash
# ../old/scripts/setup.sh`) and every TRAIN_STEPS in $STEPS (default "300 1000000": the
# start-up must not grow with the run's length). Prints each run's wall time and the
# time the trainer logged for its first step, then each setting's median of the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
checkouts=("$@")
[ ${#checkouts[@]} -gt 0 ] || checkouts=("$PWD")
steps_list=${STEPS:-300 1000000}
tmp=$(mktemp -d)
declare -A walls
for ((r = 0; r < rounds; r++)); do
  for checkout in "${checkouts[@]}"; do
    for steps in $steps_list; do
      key="$checkout TRAIN_STEPS=$steps"
      dir="$tmp/run_$(echo "$key" | tr -c 'a-zA-Z0-9' _)$r"
      start=$(date +%s.%N)
      (cd "$checkout" && .venv/bin/python -m t5x_like.train \
        --gin_file=experiments/demo_encdec_ul2.gin --gin.TRAIN_STEPS="$steps" \
        --gin.MODEL_DIR="'$dir'" --gin.train.train.stop_at_step=1 \
        --gin.evaluate.EvalConfig.enabled=False) > "$dir.log" 2>&1
      wall=$(echo "$(date +%s.%N) - $start" | bc)
      walls[$key]="${walls[$key]:-} $wall"
      echo "round $r $key: $wall s to step 1 and exit;" \
        "$(grep -o 'first step (compilation included) took [0-9.]*s' "$dir.log")"
    done
  done
done
for key in "${!walls[@]}"; do
  echo "$key: median of ${walls[$key]} -> $(echo ${walls[$key]} | tr ' ' '\n' |
    sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}') s"
done
rm -rf "$tmp"
