"""Mixtures with learned rates: every mixture file in gin_configs/mixtures/ (what
`python -m t5x_like.doremi` writes, e.g. reka_mix_doremi.gin) and those a parent process
recorded for its workers (`t5x_like.data.mixtures.record_registration`, as DoReMi does with
the files it writes), registered over the tasks and mixtures of reka_mix.py
(`t5x_like.data.mixtures.register_mixture_files`). A run trains on one by
including its file: `--gin_file=mixtures/reka_mix_doremi.gin`."""
import pathlib

from t5x_like.data import mixtures
from tasks import reka_mix  # noqa: F401  (the parts the learned mixtures weight)

MIXTURES_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin_configs" / "mixtures"

REGISTERED = mixtures.register_mixture_files(
    [str(p) for p in sorted(MIXTURES_DIR.glob("*.gin"))])
