#!/usr/bin/env bash
# Llama 3 8B at 8,192 tokens on a v5p 2x2x1 slice (4 chips, FSDP over the 4, full remat,
# 1 row per chip), compiled ahead of time by the TPU compiler on this CPU host (the
# [tpu] extra: libtpu), once per attention implementation: 'xla' (materialised float32
# [B, H, L, L] scores) and 'auto' (under the TPU platform: splash attention). Writes
# the plans as JSON to $OUT (default /tmp/tpu_aot) and prints, for each, the TPU
# compiler's own peak memory per chip, its cost analysis (optimal_seconds, bytes
# accessed; the plan's cost_per_device), the collectives per step and the largest arrays
# of the compiled step (docs/PERFORMANCE.md, Measurements; docs/PLANNING.md, TPU
# slices). MaxText's own compile of the same step: bench/maxtext_aot.sh.
#   bash bench/tpu_aot.sh                 # all 32 layers
#   LAYERS=4 bash bench/tpu_aot.sh        # fewer layers (a slow host)
#   ROWS=19 CHUNK=1024 IMPLS=auto bash bench/tpu_aot.sh   # 19 rows per chip, loss in
#                                         # chunks of 1,024 positions (the most that fit)
#   FUSED=True IMPLS=auto bash bench/tpu_aot.sh   # the fused loss in one chunk; the
#                                         # default (fused_loss=None) is, on TPU without
#                                         # chunks, the plain loss: XLA fuses the logits
#                                         # into the loss, as MaxText's
#   HLO=1 IMPLS=auto bash bench/tpu_aot.sh  # also write the compiled step's
#                                         # HLO text beside the plan (bench/hlo_bytes.py)
#   KERNEL_COST=1 IMPLS= bash bench/tpu_aot.sh   # only: does the compiler's cost analysis
#                                         # price a splash kernel? (one chip, a few seconds)
# No TPU was used: this is the compiler's view of the step, not a run on chips.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/tpu_aot}
LAYERS=${LAYERS:-32}
IMPLS=${IMPLS-xla auto}  # empty: none (with KERNEL_COST=1)
ROWS=${ROWS:-1}    # rows per chip
CHUNK=${CHUNK:-0}  # TransformerConfig.loss_chunk_length (0: the whole length at once)
FUSED=${FUSED:-None}  # TransformerConfig.fused_loss (None: the model's default, families.fuses_loss)
TAG=$(case "$FUSED" in True) echo _fused;; False) echo _unfused;; esac)$([ "$CHUNK" = 0 ] || echo "_chunk$CHUNK")
mkdir -p "$OUT"
if [ "${KERNEL_COST:-0}" = 1 ]; then
  # jax's splash kernel alone against the same causal attention in XLA, on one v5p chip:
  # the FLOPs, bytes and optimal_seconds the TPU compiler's cost analysis gives each.
  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv/bin/python - <<'PY' 2>/dev/null
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
chip = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[:1]
H, L, D = 32, 8192, 128
kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([sa.CausalMask((L, L))] * H))
def xla(q, k, v):
    s = jnp.einsum("hld,hmd->hlm", q, k).astype(jnp.float32)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e30)
    return jnp.einsum("hlm,hmd->hld", jax.nn.softmax(s).astype(q.dtype), v)
grad = lambda f: jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), (0, 1, 2))
arg = jax.ShapeDtypeStruct((H, L, D), jnp.bfloat16,
                           sharding=NamedSharding(Mesh(np.array(chip), ("x",)), P()))
print(f"causal attention, {H} heads x {L} positions x {D}, bf16, one v5p chip")
for name, f in (("splash", kernel), ("xla", xla), ("splash + grad", grad(kernel)),
                ("xla + grad", grad(xla))):
    cost = jax.jit(f).lower(arg, arg, arg).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"  {name:<14} flops {cost.get('flops', 0):.3e}  bytes accessed "
          f"{cost.get('bytes accessed', 0):.3e}  optimal_seconds {cost.get('optimal_seconds', 0):.5f}")
PY
fi
[ -n "$IMPLS" ] || exit 0
for impl in $IMPLS; do
  JAX_PLATFORMS=cpu .venv/bin/python -m t5x_like.plan \
    --gin_file=experiments/llama3_8b_h100_node.gin \
    --gin.partitioning.MeshConfig.shape="{'fsdp': 4}" --gin.partitioning.MeshConfig.devices_per_node=4 \
    --gin.planner.PlanConfig.tpu_topology="'v5p:2x2x1'" \
    --gin.BATCH_SIZE=$((4 * ROWS)) --gin.NUM_MICROBATCHES=1 \
    --gin.layers.TransformerConfig.loss_chunk_length="$CHUNK" \
    --gin.layers.TransformerConfig.fused_loss="$FUSED" \
    --gin.layers.TransformerConfig.remat_policy="'full'" \
    --gin.layers.TransformerConfig.num_decoder_layers="$LAYERS" \
    --gin.layers.TransformerConfig.attention_impl="'$impl'" \
    ${HLO:+--gin.planner.PlanConfig.hlo_output="'$OUT/llama3_8b_v5p8_${impl}_${LAYERS}l_${ROWS}r$TAG.hlo'"} \
    --output="$OUT/llama3_8b_v5p8_${impl}_${LAYERS}l_${ROWS}r$TAG.json" > "$OUT/llama3_8b_v5p8_${impl}_${LAYERS}l_${ROWS}r$TAG.txt"
done
.venv/bin/python - "$OUT" "$LAYERS" "$ROWS" "$TAG" "$FUSED" "$CHUNK" $IMPLS <<'PY'
import json, sys
out, layers, rows, tag, fused, chunk = sys.argv[1:7]
impls = sys.argv[7:]
GiB = 2**30
print(f"Llama 3 8B ({layers} layers), 8,192 tokens, v5p 2x2x1, fsdp 4, full remat, "
      f"{rows} row(s)/chip, "
      f"{ {'True': 'fused loss', 'False': 'plain loss'}.get(fused, 'default loss')}"
      f"{', loss in chunks of ' + chunk if chunk != '0' else ''}")
print("peak: the TPU compiler's peak_memory_in_bytes per chip; sum: arguments + outputs -"
      " aliased + temporaries; scores: arrays of the step with two 8,192-long dimensions")
print("optimal s, bytes accessed: the compiler's cost analysis per chip (the scan's body"
      " counted once); collectives: executions per step (the planner's count)")
print(f"{'attention_impl':<15}{'compiled':<10}{'peak GiB':>9}{'sum GiB':>9}{'temp GiB':>9}"
      f"{'scores':>7}{'GiB':>6}{'optimal s':>10}{'bytes acc':>10}{'collectives':>12}"
      "  largest array")
for impl in impls:
    r = json.load(open(f"{out}/llama3_8b_v5p8_{impl}_{layers}l_{rows}r{tag}.json"))
    c, a = r["memory_per_device"]["compiled"], r["attention"]
    cost = r.get("cost_per_device") or {}
    big = r["largest_arrays"][0]
    print(f"{impl:<15}{a['compiled']:<10}{c['compiler_peak'] / GiB:>9.2f}{c['peak'] / GiB:>9.2f}"
          f"{c['temporaries'] / GiB:>9.2f}{a['score_arrays']:>7}"
          f"{a['largest_score_array'] / GiB:>6.2f}{cost.get('optimal_seconds') or 0:>10.5f}"
          f"{cost.get('bytes_accessed') or 0:>10.2e}"
          f"{sum(row['count'] for row in r['collectives']):>12}  {big['dtype']}{big['shape']} "
          f"{big['bytes'] / GiB:.2f} GiB")
PY
