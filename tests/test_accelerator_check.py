"""bench/accelerator_check.sh: what it imports, the kernel tests it runs, a CPU smoke run.

The lent GPU machines hold their own Python with JAX but no TensorFlow, SeqIO, grain,
gin-config (and perhaps no pytest): the model, the train step and the check must import
without them. Each test here runs a real subprocess in which an import hook refuses those
packages (an import of one raises ImportError, as on that machine) and then checks that
none of them was loaded.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "seqio", "grain", "gin", "tensorflow_datasets", "apache_beam")

# Prepended to every subprocess: refuse BLOCKED (and pytest when asked), and at exit say
# which blocked names were asked for and loaded.
_HOOK = textwrap.dedent(f"""
    import atexit, importlib.abc, os, sys
    BLOCKED = {BLOCKED!r} + (("pytest",) if os.environ.get("BLOCK_PYTEST") else ())
    asked = []
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                asked.append(name)
                raise ImportError(f"{{name}} is not installed on the device machine")
    sys.meta_path.insert(0, Refuse())
    def report():  # pytest, when refused, is the check's own stand-in module
        loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED
                        and not getattr(mod, "__accelerator_check_stand_in__", False))
        asked_for = sorted(set(a for a in asked if a.split(".")[0] != "pytest"))
        print("BLOCKED-ASKED", asked_for, "BLOCKED-LOADED", loaded, flush=True)
    atexit.register(report)
    sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "bench")!r}, {os.path.join(REPO, "tests")!r}]
""")


def _run(code: str, env=None, timeout=120) -> str:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    full_env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
    proc = subprocess.run([sys.executable, "-c", _HOOK + textwrap.dedent(code)], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BLOCKED-ASKED [] BLOCKED-LOADED []" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout


def test_the_model_the_train_step_and_the_check_import_without_tensorflow_seqio_grain_gin():
    """Importing them and building a model, its train state and its jitted step asks for
    none of the refused packages."""
    out = _run("""
        import accelerator_check as ac
        from t5x_like.model import attention, decoding, families, flops, hardware, layers
        from t5x_like.model import network, partitioning
        from t5x_like.training import optimizers, train_state
        cfg = layers.TransformerConfig(**ac.TINY, dtype="float32")
        model = ac.unpadded_rows_model(cfg)
        state, step, mesh, sharding = ac._compiled_step(model, 10, 1e-3)
        batch = ac.synthetic_batch(2, 16, cfg.vocab_size)
        print("PARAMS", model.num_params, "STEP", callable(step))
    """)
    assert "PARAMS" in out and "STEP True" in out


def test_the_decode_configs_eos_is_the_vocabularys():
    """DecodeConfig's special ids default to the task vocabulary's (resolved where it is
    known): the shipped SentencePiece vocabulary's EOS and SeqIO's start token 0."""
    from t5x_like.data import vocabulary
    from t5x_like.model import decoding
    resolved = vocabulary.resolve_decode(decoding.DecodeConfig(), vocabulary.get_vocabulary())
    assert (resolved.eos_id, resolved.bos_id) == (vocabulary.EOS_ID, 0)


def test_without_pytest_the_check_runs_the_same_kernel_test_cases_pytest_collects():
    """The stand-in pytest module the check installs on a machine without pytest gives
    every test of tests/test_attention.py the cases (ids, arguments, marks) that the
    real pytest's marks give."""
    lister = """
        import accelerator_check as ac, json
        try:
            import pytest
        except ImportError:
            sys.modules["pytest"] = ac._pytest_stand_in()
        import test_attention
        cases = [[n, c, repr(kw), sorted(m)] for n, f in sorted(vars(test_attention).items())
                 if n.startswith("test_") for c, kw, m in ac._cases(f)]
        print("STAND-IN", hasattr(sys.modules["pytest"], "__accelerator_check_stand_in__"))
        print("CASES", json.dumps(cases))
    """
    parse = lambda out: json.loads(out.split("CASES ", 1)[1].splitlines()[0])  # noqa: E731
    real, stand_in = _run(lister), _run(lister, env={"BLOCK_PYTEST": "1"})
    assert "STAND-IN False" in real and "STAND-IN True" in stand_in
    with_pytest, without = parse(real), parse(stand_in)
    assert with_pytest == without
    ids = {f"{n}[{c}]" for n, c, _, _ in with_pytest}
    # pytest's own ids (`pytest --collect-only tests/test_attention.py`):
    assert {"test_cudnn_equals_xla_on_a_gpu[causal-8-2]",
            "test_splash_equals_xla_on_packed_causal_rows[mqa]",
            "test_splash_equals_xla_for_more_head_layouts_and_longer_rows[bidirectional-4-1]",
            } <= ids
    assert ["test_on_a_mesh_splash_runs_per_device_rows_and_heads_and_equals_xla",
            "fsdp_tp_kv-4", "{'rules': 'fsdp_tp_kv', 'kv_heads': 4}", ["slow"]] in without


@pytest.mark.slow
def test_the_cpu_smoke_run_of_the_script_passes_every_section(tmp_path):
    """`bash bench/accelerator_check.sh --cpu-smoke` with TensorFlow, SeqIO, grain, gin and
    pytest refused: a splash kernel-equality case (interpret mode) passes, the tiny model's
    loss falls (packed rows), and the bench measures 'xla' and 'splash' on unpadded rows
    and 'splash' on packed ones; JSON and table written.
    60-110 s on the shared 2-core machine."""
    runner = tmp_path / "python_without_tf.py"
    runner.write_text(_HOOK + textwrap.dedent("""
        import runpy
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {runner} \"$@\"\n")
    wrapper.chmod(0o755)
    out_json = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": str(wrapper), "BLOCK_PYTEST": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    # Budgets above the smoke defaults: 6 agents share 2 cores here, and a compile took
    # from 10 to 30 s from one run to the next.
    proc = subprocess.run(["bash", "bench/accelerator_check.sh", "--cpu-smoke", "--out",
                           str(out_json), "--kernel-budget", "120", "--train-budget", "120",
                           "--bench-budget", "240"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=560)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "BLOCKED-ASKED [] BLOCKED-LOADED []" in proc.stdout, log
    data = json.loads(out_json.read_text())
    kernels, train, bench = (data["sections"][k] for k in ("kernels", "train", "bench"))
    assert kernels["status"] == "passed", kernels
    passed = [u["test"] for u in kernels["units"] if u["status"] == "passed"]
    assert len(passed) == 1 and passed[0].startswith("test_splash_equals_xla"), kernels
    assert train["status"] == "passed" and train["units"][0]["attention"] == "xla"
    losses = train["units"][0]["losses"]
    assert losses[-1] < 0.9 * losses[0]
    rows = {(r["attention"], r["length"], r["documents"]): r for r in bench["units"]}
    # Both on unpadded rows; the kernel again on packed rows (two documents a row).
    assert set(rows) == {("xla", 128, 1), ("splash", 128, 1), ("splash", 128, 2)}, bench
    for row in rows.values():
        assert row["status"] == "passed" and row["tokens_per_s"] > 0 and row["mfu_palm"] > 0
        assert row["rows"] * row["length"] == 512
    # Same parameters, same batch: the two implementations' losses agree.
    assert rows["xla", 128, 1]["loss"] == pytest.approx(rows["splash", 128, 1]["loss"],
                                                         rel=1e-4)
    assert "MFU palm" in proc.stdout and str(out_json) in proc.stdout
