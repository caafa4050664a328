#!/usr/bin/env bash
# MaxText's trainer against ours on MaxText's CPU reference model, in one sitting.
#
#   bash bench/maxtext_compare.sh [ROUNDS=3] [STEPS=15]
#
# The model (decoder-only, 4 layers, width 256, 4x64 heads, SwiGLU 1024, vocabulary
# 32,000 untied, sequence 256, 8 sequences per step; bench/reference_llama.gin is ours).
# Set-up, once: a venv of its own, bench/.maxtext-venv (git-ignored), with Python >= 3.12
# (MaxText needs it), maxtext 0.2.4 with jax/jaxlib pinned to 0.10.2 (with JAX 0.12
# MaxText ran about 2x slower on this CPU). Not the newest maxtext: 0.2.5 needs
# jax >= 0.11 (`from jax.experimental.xla_metadata import must_fuse_call` fails on
# 0.10.2); 0.2.4's `tpu` extra is the newest that admits jax 0.10.2. The plain package
# installs no dependencies, so the packages of that extra are installed too, except
# jax, jaxlib and libtpu, their versions left to pip.
# Each round runs MaxText's trainer (synthetic data, no checkpoints) twice, as it ships
# and with the huge-page tunable our entry points set (GLIBC_TUNABLES=
# glibc.malloc.hugetlb=1, t5x_like/__init__.py: it speeds any XLA CPU program whose
# buffers are large, so MaxText gets it too for a like-for-like ratio), and then our step
# (bench/speed.py --only reference --devices 1) for each dtype, alternating. MaxText's
# tokens/s: its logged steps after the first 3 (compile, warm-up), their tokens over
# their seconds (it logs each step's time one step late and unevenly, so a median of
# its lines misleads); ours: bench/speed.py's median step.
# The result: the median over rounds of each and their ratio, printed and written to
# bench/results/maxtext_compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
STEPS=${2:-15}
VENV=bench/.maxtext-venv
if [ -z "${PY312:-}" ]; then  # the first python3.12 that runs (a pyenv shim may not)
  for candidate in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "import sys" 2>/dev/null; then PY312=$candidate; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "MaxText needs Python >= 3.12: set PY312=/path/to/python3.12"; exit 1; }
OURS=${OURS_PYTHON:-.venv/bin/python}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import maxtext.trainers.pre_train.train" 2>/dev/null; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "maxtext==0.2.4" "jax==0.10.2" "jaxlib==0.10.2"
  META=$(ls -d "$VENV"/lib/python3.*/site-packages/maxtext-*.dist-info)/METADATA
  grep "extra == 'tpu'" "$META" | sed -E "s/^Requires-Dist: //; s/;.*//; s/[<>=!~].*//" \
    | grep -viE "^(jax|jaxlib|libtpu)$" > "$VENV/requirements-tpu-nojax.txt"
  "$VENV/bin/pip" install -q -r "$VENV/requirements-tpu-nojax.txt" "jax==0.10.2" "jaxlib==0.10.2"
fi

MAXTEXT_DIR=$("$VENV/bin/python" -c "import maxtext, os; print(os.path.dirname(maxtext.__file__))")
OUT=bench/results
mkdir -p "$OUT" /tmp/maxtext_compare
run_maxtext() {  # $1 dtype, $2 GLIBC_TUNABLES -> prints its tokens/s after the first 3 steps
  GLIBC_TUNABLES=$2 JAX_PLATFORMS=cpu "$VENV/bin/python" -m maxtext.trainers.pre_train.train \
    "$MAXTEXT_DIR/configs/base.yml" run_name="compare_$1" \
    base_output_directory=/tmp/maxtext_compare hardware=cpu dataset_type=synthetic \
    steps="$STEPS" per_device_batch_size=8 max_target_length=256 base_emb_dim=256 \
    base_num_query_heads=4 base_num_kv_heads=4 head_dim=64 base_mlp_dim=1024 \
    base_num_decoder_layers=4 vocab_size=32000 logits_via_embedding=false \
    enable_checkpointing=false enable_tensorboard=false skip_jax_distributed_system=true \
    dtype="$1" \
    > "/tmp/maxtext_compare/maxtext_$1.log" 2>&1
  # MaxText logs each step's seconds one step late and unevenly (dispatch vs wait), so
  # its rate is the steady steps' tokens over their seconds, not a median of lines.
  grep -o "seconds: [0-9.]*, TFLOP/s/device: [0-9.]*, Tokens/s/device: [0-9.]*" \
    "/tmp/maxtext_compare/maxtext_$1.log" | tail -n +4 \
    | awk '{s += $2; t += $2 * $6} END {if (s == 0) exit 1; print t / s}'
}
run_ours() {  # $1 dtype -> prints our bare step's tokens/s on the same model
  "$OURS" bench/speed.py --only reference --devices 1 --dtypes "$1" --steps 10 \
    --out "/tmp/maxtext_compare/ours_$1.json" > "/tmp/maxtext_compare/ours_$1.log" 2>&1
  "$OURS" -c "import json; print(json.load(open('/tmp/maxtext_compare/ours_$1.json'))['results'][0]['rows'][0]['tokens_per_s'])"
}
: > /tmp/maxtext_compare/rounds.txt
for round in $(seq "$ROUNDS"); do
  for dtype in float32 bfloat16; do
    mt=$(run_maxtext "$dtype" "") || { echo "MaxText failed: /tmp/maxtext_compare/maxtext_$dtype.log"; tail -5 "/tmp/maxtext_compare/maxtext_$dtype.log"; exit 1; }
    mt_hp=$(run_maxtext "$dtype" glibc.malloc.hugetlb=1) || { echo "MaxText failed: /tmp/maxtext_compare/maxtext_$dtype.log"; exit 1; }
    ours=$(run_ours "$dtype")
    echo "$round $dtype $mt $ours $mt_hp" | tee -a /tmp/maxtext_compare/rounds.txt
  done
done
"$OURS" - "$OUT/maxtext_compare.json" <<'PY'
import json, statistics, sys, time
rows = [line.split() for line in open("/tmp/maxtext_compare/rounds.txt")]
result = {"time_utc": time.strftime("%Y%m%d-%H%M%S", time.gmtime()), "rounds": rows}
for dtype in ("float32", "bfloat16"):
    mt, ours, mt_hp = (statistics.median(float(r[i]) for r in rows if r[1] == dtype)
                       for i in (2, 3, 4))
    result[dtype] = {"maxtext_tokens_per_s": mt, "ours_tokens_per_s": ours, "ratio": ours / mt,
                     "maxtext_huge_pages_tokens_per_s": mt_hp, "ratio_huge_pages": ours / mt_hp}
    print(f"{dtype:<9} MaxText {mt:8.0f} tok/s (with huge pages {mt_hp:8.0f})   ours {ours:8.0f}"
          f" tok/s   ours/MaxText {ours / mt:.2f}x ({ours / mt_hp:.2f}x)")
best = max(result[d]["ours_tokens_per_s"] for d in ("float32", "bfloat16"))
for key, name in (("maxtext_tokens_per_s", "faster_dtype_ratio"),
                  ("maxtext_huge_pages_tokens_per_s", "faster_dtype_ratio_huge_pages")):
    result[name] = best / max(result[d][key] for d in ("float32", "bfloat16"))
print(f"each in its faster dtype: ours/MaxText {result['faster_dtype_ratio']:.2f}x; against "
      f"MaxText with huge pages too {result['faster_dtype_ratio_huge_pages']:.2f}x")
json.dump(result, open(sys.argv[1], "w"), indent=1)
PY
