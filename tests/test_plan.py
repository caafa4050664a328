"""`python -m t5x_like.plan`: the whole path on a tiny model in this process, a mesh
planned at full size and with fewer data replicas agreeing, the errors raised before
anything is compiled, and (slow) the plans of full-size models in docs/PLANNING.md, each a fresh
process timed against the 5-minute budget."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
from test_configs import factory, model_config
from tiny import assert_no_compile_while

from t5x_like.model import families, hardware, partitioning
from t5x_like.planning import collectives, memory, planner
from t5x_like.training import optimizers

REPO = pathlib.Path(__file__).resolve().parent.parent


def collective_rows_of(hlo: str):
    return planner.collective_rows(collectives.parse(hlo, {"fsdp": 8}))


def _tiny_plan(mesh_config, tmp_path=None, cfg=None, **config):
    model = families.model_for(cfg or model_config("tiny_llama"))
    output = str(tmp_path / "plan.json") if tmp_path else None
    return planner.plan(model=model, mesh_config=mesh_config,
                     optimizer=optimizers.adamw_llama2(1e-3, 10, 100), batch_size=8,
                     task_feature_lengths={"targets": 64}, train_tokens=1e9,
                     config=planner.PlanConfig(**config), output=output)


def test_the_whole_plan_of_a_tiny_model(tmp_path, capsys):
    mesh_config = partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp")
    report = _tiny_plan(mesh_config, tmp_path, hlo_output=str(tmp_path / "step.hlo"))
    # tiny_llama: every parameter split 8 ways on its embed dimension but the 5 norm
    # scales of 128, replicated
    n, norms = 2_491_008, 5 * 128
    param_bytes = (n - norms) * 4 / 8 + norms * 4
    memory = report["memory_per_device"]
    assert memory["analytic"]["parameters"] == param_bytes
    assert memory["analytic"]["optimizer"] == pytest.approx(2 * param_bytes, abs=64)
    compiled = memory["compiled"]
    state = memory["analytic"]["parameters"] + memory["analytic"]["optimizer"]
    # The compiled step's arguments: the state and one device's rows of the batch.
    assert compiled["arguments"] == pytest.approx(state + memory["analytic"]["inputs"],
                                                  abs=64)
    assert compiled["backend"] == "XLA:CPU" and compiled["peak"] > compiled["arguments"]
    assert "the planned mesh itself" in report["method"]
    assert report["collectives"] and all(r["axes"] == ["fsdp"] for r in report["collectives"]
                                         if r["bytes_per_step"] > 1024)
    kinds = [d["kind"] for d in report["devices"]]
    assert kinds == list(hardware.DEFAULT_PLAN_DEVICES)
    for d in report["devices"]:
        assert d["fits"] and d["suggestions"] == []
        steps = 1e9 / report["batch"]["tokens_per_step"]
        assert d["days"] == pytest.approx(steps * d["step_s"] / 86_400)
        assert d["step_s"] >= d["compute_s"] > 0
    h100 = next(d for d in report["devices"] if d["kind"] == "H100 80GB")
    flops = report["flops"]["model_per_step"]["palm"]
    assert h100["compute_s"] == pytest.approx(flops / (8 * 494e12 * 0.4))  # float32: TF32
    printed = capsys.readouterr().out
    assert "== plan: DecoderOnlyModel, 2,491,008 parameters" in printed
    assert "collectives per step" in printed and "H200 141GB" in printed
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["memory_per_device"]["analytic"]["parameters"] == param_bytes
    hlo = (tmp_path / "step.hlo").read_text()  # the step the collectives were read from
    assert hlo.startswith("HloModule") and collective_rows_of(hlo) == report["collectives"]
    # The row lookup: no extra FLOPs or one-hot rows, and its gradient moves row data
    # (the rows' cotangents exchanged all-to-all over fsdp; the matmul form's does not,
    # test_the_matmul_embedding_is_planned_from_its_compiled_step).
    assert report["flops"]["embedding_matmul_per_step"] == 0
    assert memory["analytic"]["activation_parts"]["embedding"] == 0
    assert any(r["op"] == "all-to-all" for r in report["collectives"])


def test_the_matmul_embedding_is_planned_from_its_compiled_step():
    """embed_lookup='matmul' on fsdp 8: its one-hot matmuls are priced as extra compute
    (4·T·V·D per step, at the assumed MFU, lowering the MFU of model FLOPs), its one-hot
    rows as activations, and the compiled step it plans moves no row data: every
    collective is a weight's (float32 table or layer), none exchanges rows."""
    cfg = dataclasses.replace(model_config("tiny_llama"), embed_lookup="matmul")
    report = _tiny_plan(partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp"), cfg=cfg)
    extra = 4 * 8 * 64 * cfg.vocab_size * cfg.emb_dim  # batch 8 x 64 positions
    assert report["flops"]["embedding_matmul_per_step"] == extra
    parts = report["memory_per_device"]["analytic"]["activation_parts"]
    assert parts["embedding"] == 1 * 64 * cfg.vocab_size * 4  # a row per device, float32
    assert not [r for r in report["collectives"]
                if r["op"] == "all-to-all" or r["dtype"] != "f32"]
    h100 = next(d for d in report["devices"] if d["kind"] == "H100 80GB")
    palm = report["flops"]["model_per_step"]["palm"]
    assert h100["compute_s"] == pytest.approx((palm + extra) / (8 * 494e12 * 0.4))
    assert h100["mfu"] == pytest.approx(palm / (8 * 494e12) / h100["step_s"])
    assert h100["mfu"] < 0.4 * palm / (palm + extra) * 1.0001


def test_sequence_parallel_and_kv_heads_in_the_activation_estimate():
    """Llama 3 70B on fsdp 8 x tensor 8, a row of 8,192 per device (nothing compiled):
    the _sp presets keep 1/8 of each saved layer input, fsdp_tp_kv 1/8 of the k and v
    projections; fsdp_tp neither."""
    cfg = model_config("llama3_70b")
    sizes = {"data": 1, "fsdp": 8, "tensor": 8}
    presets = ("fsdp_tp", "fsdp_tp_kv", "fsdp_tp_kv_sp")
    splits = {r: memory.Split.of(r, sizes, 8) for r in presets}
    assert [(s.rows, s.tensor, s.kv_tensor, s.length) for s in splits.values()] == [
        (1, 8, 1, 1), (1, 8, 8, 1), (1, 8, 8, 8)]
    act = {r: memory.activation_bytes(cfg, s, {"decoder": 8192}, "full")
           for r, s in splits.items()}
    c = 2  # bfloat16
    layer_input = 8192 * cfg.emb_dim * c
    assert act["fsdp_tp"]["saved"] == act["fsdp_tp_kv"]["saved"] == 80 * layer_input
    assert act["fsdp_tp_kv_sp"]["saved"] == 80 * layer_input // 8
    kv = 2 * 8192 * cfg.num_kv_heads * cfg.head_dim * c  # k and v, all kv heads
    # k and v are dot outputs, and the RoPE'd k is as large as one of them: 1.5 kv.
    assert act["fsdp_tp"]["working"] - act["fsdp_tp_kv"]["working"] == 1.5 * kv * 7 / 8
    assert act["fsdp_tp_kv"]["working"] - act["fsdp_tp_kv_sp"]["working"] == (
        layer_input * 7 / 8)


@pytest.mark.slow
def test_a_mesh_planned_with_fewer_data_replicas_agrees_with_the_full_compile():
    """data 4 across 4 nodes x fsdp 2 inside: compiled whole (8 devices) and with data
    cut to 2 (4 devices, data-parallel collectives scaled back to 4)."""
    mesh_config = partitioning.MeshConfig(shape={"fsdp": 2}, dcn_shape={"data": 4},
                                          rules="fsdp", num_nodes=4, devices_per_node=2)
    full = _tiny_plan(mesh_config, max_compile_devices=8)
    reduced = _tiny_plan(mesh_config, max_compile_devices=4)
    assert "the planned mesh itself" in full["method"]
    assert "data 2 instead of 4" in reduced["method"] and "on 4 XLA:CPU" in reduced["method"]
    a, b = full["memory_per_device"], reduced["memory_per_device"]
    assert a["analytic"] == b["analytic"]
    assert a["compiled"]["arguments"] == b["compiled"]["arguments"]  # state + rows: exact
    assert b["compiled"]["peak"] == pytest.approx(a["compiled"]["peak"], rel=0.05)

    def by_axes(report):
        table = {}
        for row in report["collectives"]:
            key = (row["priced_as"], tuple(row["axes"]), row["group_size"], row["where"])
            table[key] = table.get(key, 0) + row["bytes_per_step"]
        return table

    full_rows, reduced_rows = by_axes(full), by_axes(reduced)
    data_rows = {k: v for k, v in full_rows.items() if "data" in k[1] and v > 1024}
    assert data_rows  # gradients all-reduced across the 4 nodes
    for key, nbytes in data_rows.items():
        assert reduced_rows.get(key) == pytest.approx(nbytes, rel=0.05), key
    for x, y in zip(full["devices"], reduced["devices"]):
        assert y["step_s"] == pytest.approx(x["step_s"], rel=0.05)


@pytest.mark.parametrize("mesh_kwargs,plan_kwargs,match", [
    (dict(shape={"fsdp": 8}), dict(batch_size=6),
     r"batch size 6 .* not divisible by 8"),
    (dict(shape={"fsdp": 8}), dict(batch_size=8, num_microbatches=3),
     r"BATCH_SIZE=8 must split into NUM_MICROBATCHES=3"),
    (dict(shape={"fsdp": 1, "tensor": 8}, rules="fsdp_tp"), dict(batch_size=8),
     r"num_heads=4 is not divisible by 8"),
    (dict(shape={"fsdp": 16}), dict(batch_size=16),
     r"compiles on 16 emulated CPU devices but jax started with 8"),
])
def test_errors_come_before_any_compile(mesh_kwargs, plan_kwargs, match):
    mesh_config = partitioning.MeshConfig(**{"rules": "fsdp", **mesh_kwargs})
    model = families.model_for(model_config("tiny_llama"))

    def run():
        with pytest.raises(ValueError, match=match):
            planner.plan(model=model, mesh_config=mesh_config,
                      optimizer=optimizers.adamw_llama2(1e-3, 10, 100),
                      task_feature_lengths={"targets": 64}, **plan_kwargs)

    assert_no_compile_while(run)


def test_an_unknown_device_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown device kind 'H100 94GB'; known: "
                                         r"\['A100 80GB', 'A100 40GB'"):
        planner.PlanConfig(device_kinds=("H100 80GB", "H100 94GB"))


def test_suggestions_take_the_first_fit_of_each_kind_of_change():
    base = planner.Variant({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1},
                        "fsdp", "minimal", 8)
    options = planner.candidates(base, devices_per_node=8, batch_size=64)
    labels = [(category, label) for category, label, _, _ in options]
    assert labels[:2] == [("remat", "remat_policy 'full'"), ("microbatches", "NUM_MICROBATCHES=16")]
    assert ("tensor", "tensor 8 inside a node (fsdp_tp)") in labels
    # Given the model's kv heads, tensor splits them where they divide (fsdp_tp_kv).
    gqa = [label for category, label, _, _ in planner.candidates(base, 8, 64, num_kv_heads=2)
           if category == "tensor"]
    assert gqa == ["tensor 2 inside a node (fsdp_tp_kv)", "tensor 4 inside a node (fsdp_tp)",
                   "tensor 8 inside a node (fsdp_tp)"]
    assert ("nodes", "8 nodes (64 devices), fsdp 64") in labels
    nodes = {label: v for category, label, _, v in options if category == "nodes"}
    # 8 microbatches of 64 rows no longer give each of 64 FSDP ranks a whole row: 1.
    assert nodes["8 nodes (64 devices), fsdp 64"].num_microbatches == 1
    both = [v for category, _, _, v in options if category == "tensor+nodes"]
    assert [v.num_devices for v in both] == sorted(v.num_devices for v in both)
    h100 = hardware.spec("H100 80GB")
    picked = planner._suggestions(h100, [("remat", "a", "", 90e9), ("remat", "b", "", 70e9),
                                      ("nodes", "c", "", 60e9), ("nodes", "d", "", 50e9)],
                               0.9)  # usable: 72 GB
    assert [s["change"] for s in picked] == ["b", "c"]


def test_a_tpu_slice_is_planned_with_the_tpu_compiler():
    """v5e:2x2 (4 chips) compiled by libtpu on this CPU host (the [tpu] extra, which
    `bash scripts/setup.sh test` installs): fit judged on the compiler's own peak, the
    TPU kernel compiled for 'auto' attention (64 positions: below splash's 128-position
    tile, so 'auto' falls back to XLA), its collectives (it casts FSDP's weights to
    bfloat16 before gathering them)."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra "
                        "(bash scripts/setup.sh test installs it)")
    mesh_config = partitioning.MeshConfig(shape={"fsdp": 4}, rules="fsdp")
    report = _tiny_plan(mesh_config, tpu_topology="v5e:2x2")
    compiled = report["memory_per_device"]["compiled"]
    assert compiled["backend"] == "TPU compiler" and compiled["compiler_peak"] > 0
    assert "on 4 TPU compiler devices" in report["method"]
    assert [d["kind"] for d in report["devices"]] == ["TPU v5e"]
    assert report["devices"][0]["need_gb"] * 1e9 == compiled["compiler_peak"]
    attention = report["attention"]
    assert (attention["analytic"], attention["configured"], attention["platform"],
            attention["compiled"], attention["kernel_calls"]) == (
        {"decoder": "xla"}, "auto", "tpu", "xla", 0)
    assert attention["score_arrays"] > 0  # XLA's [rows, heads, 64, 64] scores
    assert any(r["op"] == "all-gather" and r["dtype"] == "bf16" and r["axes"] == ["fsdp"]
               for r in report["collectives"])
    with pytest.raises(ValueError, match=r"'v5e:2x2' has 4 chips but the mesh needs 8"):
        _tiny_plan(partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp"),
                   tpu_topology="v5e:2x2")


def _tpu_plan(attention_impl: str, length: int):
    cfg = dataclasses.replace(model_config("tiny_llama"), attention_impl=attention_impl)
    return planner.plan(model=families.model_for(cfg),
                        mesh_config=partitioning.MeshConfig(shape={"fsdp": 4}, rules="fsdp"),
                        optimizer=optimizers.adamw_llama2(1e-3, 10, 100), batch_size=8,
                        task_feature_lengths={"targets": length},
                        config=planner.PlanConfig(tpu_topology="v5e:2x2"))


def test_a_step_the_tpu_compiler_refuses_is_one_paragraph():
    """tiny_llama with XLA attention at 32,768 positions: 2 rows x 4 heads x 32,768²
    float32 scores (34 GB) on a 16 GiB v5e chip. The compiler's RESOURCE_EXHAUSTED comes
    back as the config error naming what to change."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra "
                        "(bash scripts/setup.sh test installs it)")
    with pytest.raises(ValueError, match=r"(?s)does not fit v5e:2x2's chips: the TPU "
                       r"compiler says .*RESOURCE_EXHAUSTED.*fewer rows.*loss_chunk_length"):
        _tpu_plan("xla", 32768)


@pytest.mark.slow  # two TPU compiles with splash kernels: 20-150 s here, by load
def test_a_tpu_plan_compiles_splash_attention_and_holds_no_scores():
    """'auto' planned for a TPU slice lowers splash attention (attention.platform_for),
    though this host is a CPU: its Mosaic kernel calls are in the compiled step, and no
    array of the step has the [.., L, .., L] shape of scores, where 'xla''s largest
    array is its [rows, heads, L, L] scores; the analytic estimate says the same."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra "
                        "(bash scripts/setup.sh test installs it)")
    length = 1024

    def has_scores(array):
        return array["shape"].count(length) >= 2

    fused, xla = _tpu_plan("auto", length), _tpu_plan("xla", length)
    assert fused["attention"]["compiled"] == "splash" and fused["attention"]["kernel_calls"]
    assert fused["attention"]["analytic"] == {"decoder": "splash"}
    assert (xla["attention"]["compiled"], xla["attention"]["kernel_calls"]) == ("xla", 0)
    assert has_scores(xla["largest_arrays"][0])
    assert not any(has_scores(a) for a in fused["largest_arrays"])
    assert fused["attention"]["score_arrays"] == 0 < xla["attention"]["score_arrays"]
    assert xla["attention"]["largest_score_array"] >= 2 * 4 * length**2 * 2  # >= bf16
    # 2 rows x 4 heads x 1024² float32 scores (8 MiB each): the compiler's peak drops.
    peak = {name: r["memory_per_device"]["compiled"]["compiler_peak"]
            for name, r in (("fused", fused), ("xla", xla))}
    assert peak["xla"] - peak["fused"] > 8 * 2**20, peak
    activations = {name: r["memory_per_device"]["analytic"]["activations"]
                   for name, r in (("fused", fused), ("xla", xla))}
    assert activations["xla"] > activations["fused"]


# What the TPU compiler prints for Llama 3 8B on v5p (abridged from a compiled step): the
# embedding gather offloaded to a SparseCore, whose computations close with
# `}, execution_thread="sparsecore"`, and metadata quoting names inside a mesh collective.
_TPU_HLO = """HloModule jit_step_fn

%fused_computation.clone (p0: bf16[1024,64], p1: s32[512]) -> bf16[512,64] {
  %p0 = bf16[1024,64]{1,0} parameter(0)
  %p1 = s32[512]{0} parameter(1)
  ROOT %gather.1 = bf16[512,64]{1,0} gather(%p0, %p1), offset_dims={1}, slice_sizes={1,64}
}, execution_thread="sparsecore"

%called_computation (q0: bf16[1024,64], q1: s32[512]) -> bf16[512,64] {
  %q0 = bf16[1024,64]{1,0} parameter(0)
  %q1 = s32[512]{0} parameter(1)
  ROOT %gather_offload = bf16[512,64]{1,0} fusion(%q0, %q1), kind=kCustom, calls=%fused_computation.clone
}, execution_thread="sparsecore"

%fused_scores (s0: bf16[4,512,64]) -> f32[4,512,512] {
  %s0 = bf16[4,512,64]{2,1,0} parameter(0)
  ROOT %dot.1 = f32[4,512,512]{2,1,0} dot(%s0, %s0), lhs_contracting_dims={2}, rhs_contracting_dims={2}, lhs_batch_dims={0}, rhs_batch_dims={0}
}

ENTRY %main (a: bf16[1024,64], b: s32[512], w: bf16[256,64]) -> bf16[512,64] {
  %a = bf16[1024,64]{1,0} parameter(0)
  %b = s32[512]{0} parameter(1)
  %w = bf16[256,64]{1,0} parameter(2)
  %call = bf16[512,64]{1,0} call(%a, %b), to_apply=%called_computation
  %all-gather.1 = bf16[1024,64]{1,0} all-gather(%w), channel_id=1, replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={0}, use_global_device_ids=true, metadata={op_name="state[\\'model\\'][\\'embed\\']"}
  %x = bf16[4,512,64]{2,1,0} reshape(%call)
  %scores = f32[4,512,512]{2,1,0} fusion(%x), kind=kOutput, calls=%fused_scores
  ROOT %out = bf16[512,64]{1,0} add(%call, %call)
}
"""


def test_the_parser_reads_the_tpu_compilers_sparsecore_computations():
    """Before, `}, execution_thread="sparsecore"` did not close a computation (the next
    one was read into it, and the call graph looped forever) and a quoted name in
    metadata was read as a mesh axis. The largest arrays leave fusions' insides out."""
    found = collectives.parse(_TPU_HLO, {"data": 1, "fsdp": 4, "tensor": 1})
    assert [(c.op, c.group_size, c.count) for c in found] == [("all-gather", 4, 1)]
    largest = collectives.largest_arrays(_TPU_HLO, 3)
    assert [(a["name"], a["shape"], a["bytes"]) for a in largest] == [
        ("scores", [4, 512, 512], 4 * 512 * 512 * 4), ("x", [4, 512, 64], 262144),
        ("all-gather.1", [1024, 64], 131072)]


# ------------------------------------------------------------------ docs/PLANNING.md's plans


def _cli_plan(tmp_path, *gin_args):
    output = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the plan sets its own device count
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.plan", *gin_args, f"--output={output}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), seconds


_TENSOR_AXES = {"fsdp": set(), "fsdp_tp": {"heads", "mlp", "vocab"},
                "fsdp_tp_kv": {"heads", "kv_heads", "mlp", "vocab"}}


def _arithmetic_state_bytes(model_name, sizes, rules, bytes_per_param=12):
    """Parameter count x bytes per parameter / shards, with what the preset keeps
    whole along tensor added back: every parameter is split along fsdp (its embed
    axis), and along tensor when it has a head, MLP or vocabulary axis."""
    cfg = model_config(model_name)
    shapes = partitioning.param_shapes(factory(cfg))
    logical = partitioning.logical_specs(factory(cfg))
    total = 0.0
    for name, shape in shapes.items():
        ways = sizes["fsdp"] * (sizes["tensor"] if _TENSOR_AXES[rules] & set(logical[name])
                                else 1)
        total += math.prod(shape) * bytes_per_param / ways
    return total


@pytest.mark.slow
@pytest.mark.parametrize("experiment,model_name,kind", [
    ("llama3_8b_h100_node", "llama3_8b", "H100 80GB"),
    ("llama3_70b_h100_8nodes", "llama3_70b", "H100 80GB"),
    ("reka_edge_7b_a100_node", "reka_edge_7b_encdec", "A100 80GB"),
    ("palm_62b_h100_2496", "palm_62b", "H100 80GB"),
])
def test_readme_plans_run_here_in_under_five_minutes(tmp_path, experiment, model_name, kind):
    report, seconds = _cli_plan(tmp_path, f"--gin_file=experiments/{experiment}.gin")
    assert seconds < 300, seconds
    sizes, rules = report["mesh"]["global"], report["mesh"]["rules"]
    memory = report["memory_per_device"]["analytic"]
    state = memory["parameters"] + memory["optimizer"]
    assert state == pytest.approx(_arithmetic_state_bytes(model_name, sizes, rules), rel=0.01)
    assert report["memory_per_device"]["compiled"]["arguments"] >= state
    assert next(d for d in report["devices"] if d["kind"] == kind)["fits"]  # its hardware
    if experiment == "palm_62b_h100_2496":
        assert report["mesh"]["devices"] == 2496
        assert "data 2 instead of 39" in report["method"]
        assert any("data" in row["axes"] and row["where"] == "across nodes"
                   for row in report["collectives"])
    if experiment == "llama3_70b_h100_8nodes":
        assert all(d["fits"] for d in report["devices"] if d["kind"] != "A100 40GB")
        assert any(row["axes"] == ["tensor"] and row["where"] == "inside a node"
                   for row in report["collectives"])


@pytest.mark.slow
def test_llama3_70b_with_plain_fsdp_on_one_node_does_not_fit(tmp_path):
    report, seconds = _cli_plan(tmp_path, "--gin_file=experiments/llama3_70b_h100_8nodes.gin",
                                "--gin_file=meshes/h100_node.gin")
    assert seconds < 300
    assert report["mesh"]["global"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # 70.55B x (4 + 4 + 8) bytes / 8: 141 GB of state alone per GPU.
    memory = report["memory_per_device"]["analytic"]
    assert memory["parameters"] + memory["optimizer"] == pytest.approx(
        _arithmetic_state_bytes("llama3_70b", report["mesh"]["global"], "fsdp"), rel=0.01)
    assert not any(d["fits"] for d in report["devices"])
    h100 = next(d for d in report["devices"] if d["kind"] == "H100 80GB")
    assert h100["suggestions"] and all("nodes" in s["change"] for s in h100["suggestions"])
