"""Settings of one bench/speed.py row, run as separate processes, alternating, in rounds.

    .venv/bin/python bench/alternate.py --rounds 3 \
        --setting 4k:GLIBC_TUNABLES=glibc.malloc.hugetlb=0 --setting huge: \
        [--setting before@2af8dc8:] [--only reference --devices 1 --dtype float32]

A setting is `name[@git-rev]:ENV=value,...`: environment variables for the process, and
optionally another commit, checked out once into a temporary git worktree whose own
bench/speed.py runs (so a change's before and after are timed in one sitting). The key
PYTHON names the interpreter instead of an environment variable: another commit on its
own stack, e.g. `--setting old@6e1e8c8:PYTHON=../old/.venv/bin/python --setting new:`
(a venv made by that commit's scripts/setup.sh). What
one process cannot switch (glibc tunables, XLA flags, the code itself) is compared this
way; config variants of one model are better timed in one process (bench/ab.py).
Prints each round's tokens/s, then each setting's median and its ratio to the first
setting's (> 1: faster), and writes bench/results/alternate-<time>.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402

REPO = speed.REPO


def parse_setting(text: str):
    head, _, env = text.partition(":")
    name, _, rev = head.partition("@")
    return name, rev or None, dict(kv.split("=", 1) for kv in env.split(",") if kv)


def run_once(tree: str, env: dict, args, out: str) -> dict:
    env = dict(env)
    python = os.path.abspath(env.pop("PYTHON")) if "PYTHON" in env else sys.executable
    subprocess.run(
        [python, os.path.join(tree, "bench", "speed.py"), "--only", args.only,
         "--devices", str(args.devices), "--dtypes", args.dtype, "--steps", str(args.steps),
         "--out", out],
        cwd=tree, env=dict(os.environ, **env), check=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["results"][0]["rows"][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="reference")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.setting]
    scratch = tempfile.mkdtemp(prefix="alternate-")
    trees = {}
    for name, rev, _ in settings:
        if rev and rev not in trees:
            trees[rev] = os.path.join(scratch, f"tree-{len(trees)}")
            subprocess.run(["git", "worktree", "add", "--detach", trees[rev], rev], cwd=REPO,
                           check=True, stdout=subprocess.DEVNULL)
    rows = {name: [] for name, _, _ in settings}
    try:
        for round_ in range(1, args.rounds + 1):
            for name, rev, env in settings:
                row = run_once(trees.get(rev, REPO), env, args,
                               os.path.join(scratch, f"{name}-{round_}.json"))
                rows[name].append(row)
                print(f"round {round_} {name:<12} {row['tokens_per_s']:8.0f} tok/s "
                      f"{row['step_ms']:8.1f} ms  faults/step {row.get('faults_per_step', '-')}",
                      flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO)
    first = statistics.median(r["tokens_per_s"] for r in rows[settings[0][0]])
    result = {"settings": args.setting, "rows": rows, "medians": {}}
    for name, tokens in ((n, [r["tokens_per_s"] for r in rs]) for n, rs in rows.items()):
        median = statistics.median(tokens)
        result["medians"][name] = median
        print(f"{name:<12} median {median:8.0f} tok/s   x{median / first:.3f} of "
              f"{settings[0][0]}")
    speed.save_json("alternate", result)


if __name__ == "__main__":
    main()
