#!/usr/bin/env bash
# MaxText's own ahead-of-time compile of the step bench/tpu_aot.sh compiles for us:
# Llama 3 8B (MaxText's model_name=llama3-8b) at 8,192 tokens on a v5p-8 (= v5p 2x2x1:
# 4 chips, FSDP over the 4 by MaxText's default ici_fsdp_parallelism=-1), full remat,
# per_device_batch_size rows per chip, attention=flash (on TPU: splash kernels), all
# compiled by the TPU compiler on this CPU host with MaxText's train_compile.py. No TPU
# is used: this is the compiler's view of the step, not a run on chips.
#   bash bench/maxtext_aot.sh                       # 1 row per chip, 32 layers
#   ROWS=11 bash bench/maxtext_aot.sh               # per_device_batch_size=11
#   ATTENTION=dot_product bash bench/maxtext_aot.sh # MaxText without its kernels
#   LAYERS=4 bash bench/maxtext_aot.sh              # fewer layers (a slow host)
# Writes to $OUT (default /tmp/maxtext_aot): <name>.json (the compiler's memory stats,
# peak_memory_in_bytes among them, its cost analysis, the versions) and <name>.hlo
# (compiled.as_text() of the train step), and prints per chip: the compiler's peak,
# optimal_seconds, bytes accessed and the collectives per step counted by our parser
# (t5x_like/planning/collectives.parse, as the planner counts them for ours: each
# collective's executions, the trip counts of the loops around it included).
# A step the compiler refuses prints its RESOURCE_EXHAUSTED line and exits 3.
#
# Set-up, once: a venv of its own, bench/.maxtext-aot-venv (git-ignored; not
# bench/.maxtext-venv, which bench/maxtext_compare.sh keeps at maxtext 0.2.4 with jax
# 0.10.2), Python >= 3.12, maxtext 0.2.5 (needs jax >= 0.11.1) with the packages of its
# `tpu` extra (the plain package installs none), jax and jaxlib pinned to 0.12.1 and
# libtpu to 0.0.52: the same JAX and TPU compiler as our .venv, so both steps go
# through the same XLA. Measured with: maxtext 0.2.5, jax/jaxlib 0.12.1, libtpu 0.0.52,
# flax 0.12.12, tokamax 0.0.17, Python 3.12.1 (docs/PERFORMANCE.md, "Fused attention on
# a TPU slice, compiled ahead of time").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAXTEXT_VENV:-bench/.maxtext-aot-venv}
OUT=${OUT:-${TMPDIR:-/tmp}/maxtext_aot}
ROWS=${ROWS:-1}
LAYERS=${LAYERS:-32}
ATTENTION=${ATTENTION:-flash}
OURS=${OURS_PYTHON:-.venv/bin/python}
if [ -z "${PY312:-}" ]; then  # the first python3.12 that runs (a pyenv shim may not)
  for candidate in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "import sys" 2>/dev/null; then PY312=$candidate; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import maxtext.trainers.pre_train.train_compile" 2>/dev/null; then
  [ -n "${PY312:-}" ] || { echo "MaxText needs Python >= 3.12: set PY312=/path/to/python3.12"; exit 1; }
  "$PY312" -m venv "$VENV"
  PINS=("jax==0.12.1" "jaxlib==0.12.1" "libtpu==0.0.52")
  "$VENV/bin/pip" install -q "maxtext==0.2.5" "${PINS[@]}"
  META=$(ls -d "$VENV"/lib/python3.*/site-packages/maxtext-*.dist-info)/METADATA
  grep "extra == 'tpu'" "$META" | sed -E "s/^Requires-Dist: //; s/;.*//; s/[<>=!~].*//" \
    | grep -viE "^(jax|jaxlib|libtpu)$" > "$VENV/requirements-tpu-nojax.txt"
  "$VENV/bin/pip" install -q -r "$VENV/requirements-tpu-nojax.txt" "${PINS[@]}"
fi
MAXTEXT_DIR=$("$VENV/bin/python" -c "import maxtext, os; print(os.path.dirname(maxtext.__file__))")
mkdir -p "$OUT"
NAME=llama3_8b_v5p8_maxtext_${ATTENTION}_${LAYERS}l_${ROWS}r
ARGS=(model_name=llama3-8b compile_topology=v5p-8 compile_topology_num_slices=1
      max_target_length=8192 per_device_batch_size="$ROWS" remat_policy=full
      attention="$ATTENTION" run_name="$NAME" base_output_directory="$OUT")
if [ "$LAYERS" != 32 ]; then ARGS+=(override_model_config=true base_num_decoder_layers="$LAYERS"); fi

# MaxText's train_compile.main, unchanged, with its compile call wrapped to keep the
# executable: its memory_analysis(), cost_analysis() and as_text() are what our planner
# reads from ours.
status=0
JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 "$VENV/bin/python" - "$OUT/$NAME" \
  "$MAXTEXT_DIR/configs/base.yml" "${ARGS[@]}" \
  > "$OUT/$NAME.log" 2>&1 <<'PY' || status=$?
import importlib.metadata as md, json, sys, time
from absl import app
from maxtext.trainers.pre_train import train_compile
stem, argv = sys.argv[1], sys.argv[1:]
argv[0] = "train_compile"
kept = {}
compile_step = train_compile.jit_and_compile
def keep(*args, **kwargs):
    kept["compiled"] = compile_step(*args, **kwargs)
    return kept["compiled"]
train_compile.jit_and_compile = keep
result = {"argv": argv[1:], "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
          "versions": {p: md.version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu", "flax")}}
started = time.perf_counter()
try:
    app.run(train_compile.main, argv=argv)
except SystemExit as done:
    if done.code not in (None, 0):
        raise
except Exception as error:  # the compiler's refusal: record it, exit 3
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
        raise
    result.update(compiled=False, error=next(l for l in message.splitlines()
                                             if "RESOURCE_EXHAUSTED" in l))
    json.dump(result, open(stem + ".json", "w"), indent=1)
    print(result["error"])
    sys.exit(3)
compiled = kept["compiled"]
stats = compiled.memory_analysis()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
result.update(compiled=True, compile_s=time.perf_counter() - started, memory={
    k: getattr(stats, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
    "alias_size_in_bytes", "temp_size_in_bytes", "peak_memory_in_bytes")},
    cost={k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if k in cost})
open(stem + ".hlo", "w").write(compiled.as_text())
json.dump(result, open(stem + ".json", "w"), indent=1)
PY
if [ "$status" = 3 ]; then tail -1 "$OUT/$NAME.log"; exit 3; fi
[ "$status" = 0 ] || { echo "MaxText's compile failed ($status): $OUT/$NAME.log"; tail -5 "$OUT/$NAME.log"; exit 1; }

# Our parser on MaxText's HLO: the same functions the planner applies to our step.
"$OURS" - "$OUT/$NAME" "$LAYERS" "$ROWS" "$ATTENTION" 2> "$OUT/$NAME.parse.log" <<'PY' \
  || { echo "parsing failed: $OUT/$NAME.parse.log"; tail -5 "$OUT/$NAME.parse.log"; exit 1; }
import json, sys
from t5x_like.planning import collectives, planner
stem, layers, rows, attention = sys.argv[1:]
r = json.load(open(stem + ".json"))
hlo = open(stem + ".hlo").read()
rows_ = planner.collective_rows(collectives.parse(hlo, {"fsdp": 4}))
scores = [a for a in collectives.largest_arrays(hlo, None)
          if sum(d == 8192 for d in a["shape"]) >= 2]
big = collectives.largest_arrays(hlo, 3)
r["collectives"] = rows_
r["collectives_per_step"] = sum(row["count"] for row in rows_)
r["score_arrays"] = len(scores)
r["largest_arrays"] = big
r["kernel_calls"] = hlo.count('custom_call_target="tpu_custom_call"')
json.dump(r, open(stem + ".json", "w"), indent=1)
GiB, m, c = 2**30, r["memory"], r["cost"]
print(f"MaxText {r['versions']['maxtext']} (jax {r['versions']['jax']}, libtpu "
      f"{r['versions']['libtpu']}): Llama 3 8B ({layers} layers), 8,192 tokens, v5p-8, "
      f"fsdp 4, remat full, attention={attention}, {rows} row(s)/chip, compiled in "
      f"{r['compile_s']:.0f} s")
print(f"  peak_memory_in_bytes {m['peak_memory_in_bytes'] / GiB:.2f} GiB; args "
      f"{m['argument_size_in_bytes'] / GiB:.2f}, temps {m['temp_size_in_bytes'] / GiB:.2f} GiB")
print(f"  optimal_seconds {c.get('optimal_seconds', float('nan')):.5f}; bytes accessed "
      f"{c['bytes accessed']:.3e}; flops {c['flops']:.3e} (a loop body once)")
print(f"  collectives per step {r['collectives_per_step']}: " + ", ".join(
    f"{row['count']} {row['dtype']} {row['op']}" for row in rows_))
print(f"  kernel calls {r['kernel_calls']}; score-shaped arrays {len(scores)}; largest: " +
      "; ".join(f"{a['dtype']}{a['shape']} {a['bytes'] / GiB:.2f} GiB" for a in big))
PY
