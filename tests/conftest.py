"""Shared test set-up: 8 CPU-emulated devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Subprocesses the tests start (`python -m t5x_like.train` from a tmp dir, data workers)
# import t5x_like and tasks from this checkout, not from wherever the interpreter's
# environment installed them (a venv shared between worktrees points at one of them).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
