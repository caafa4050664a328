"""The speed a user gets (`python -m t5x_like.train`) against the bare train step.

    .venv/bin/python bench/cli_speed.py                 # 3 rounds, float32
    .venv/bin/python bench/cli_speed.py --rounds 5 --cli_steps 60

Alternates, in one sitting, two measurements of MaxText's CPU reference model on one
device, so that load from other processes falls on both alike:
- the bare jitted step (bench/speed.py's row `reference@1`: random tokens already on the
  device, metrics fetched one step late; the median of `--steps` steady steps), and
- the CLI (`bench/reference_train.gin`: streamed reka_mix_causal from a grain worker,
  metrics, logging, the asynchronous checkpoint at the end) for `--cli_steps` steps, its
  steady-state tokens/s being the median of the windows it logged after step
  `--cli_warmup` (`train/tokens_per_s` in metrics.jsonl, what the log line prints).
Prints each round and the ratio of medians (CLI ÷ bare step); writes the JSON to
bench/results/cli_speed-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402  (bench/speed.py)


def cli_tokens_per_s(steps: int, warmup: int, dtype: str, log_every: int) -> list[float]:
    """Logged tokens/s of the windows of one CLI run that end after step `warmup`."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "t5x_like.train",
               "--gin_file=bench/reference_train.gin", f"--gin.TRAIN_STEPS={steps}",
               f"--gin.MODEL_DIR='{model_dir}'",
               f"--gin.train.train.log_every_steps={log_every}",
               f"--gin.layers.TransformerConfig.dtype='{dtype}'"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [speed.REPO, os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, cwd=speed.REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return [r["train/tokens_per_s"] for r in rows
            if "train/tokens_per_s" in r and r["step"] > warmup]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10, help="bare-step steady steps")
    parser.add_argument("--cli_steps", type=int, default=40)
    parser.add_argument("--cli_warmup", type=int, default=10,
                        help="CLI windows ending at or before this step are not counted")
    parser.add_argument("--log_every", type=int, default=5)
    args = parser.parse_args(argv)

    rounds = []
    for r in range(args.rounds):
        bare_row = speed.spawn(1, ["reference@1"], [args.dtype], args.steps)["rows"][0]
        cli = cli_tokens_per_s(args.cli_steps, args.cli_warmup, args.dtype, args.log_every)
        rounds.append({"bare_tokens_per_s": bare_row["tokens_per_s"],
                       "cli_tokens_per_s": statistics.median(cli), "cli_windows": cli})
        print(f"round {r}: bare step {bare_row['tokens_per_s']:.0f} tok/s, CLI "
              f"{rounds[-1]['cli_tokens_per_s']:.0f} tok/s (windows "
              f"{', '.join(f'{x:.0f}' for x in cli)})", flush=True)
    bare = statistics.median(x["bare_tokens_per_s"] for x in rounds)
    cli = statistics.median(x["cli_tokens_per_s"] for x in rounds)
    print(f"medians over {args.rounds} rounds: bare step {bare:.0f} tok/s, CLI {cli:.0f} "
          f"tok/s, CLI / bare = {cli / bare:.3f}")
    result = {"args": vars(args), "rounds": rounds, "bare_tokens_per_s": bare,
              "cli_tokens_per_s": cli, "cli_over_bare": cli / bare}
    speed.save_json("cli_speed", result)
    return result


if __name__ == "__main__":
    main()
