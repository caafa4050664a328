"""Best-of-N reward against N on held-out prompts (rejection sampling, Llama 2).

Samples N = 8 responses per held-out prompt of the preference tasks (the first 32
tokens of each validation document) with a policy run's newest checkpoint, scores them
with a reward-model run's, and reports the mean best-of-k reward for k = 1, 2, 4, 8 (all
from the same samples) as JSON and a PNG chart:

    .venv/bin/python scripts/best_of_n.py --policy_dir runs/demo_dpo \
        --reward_dir runs/demo_reward_model --out_dir runs/best_of_n

Both runs must use models/tiny_llama.gin's config (as the demos do).
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
from flax import nnx  # noqa: E402

import tasks  # noqa: E402,F401  (registers the preference tasks)
from t5x_like.data import vocabulary  # noqa: E402
from t5x_like.model import families, layers  # noqa: E402
from t5x_like.objectives import preference  # noqa: E402
from t5x_like.model.decoding import DecodeConfig  # noqa: E402
from t5x_like.recipes import best_of_n  # noqa: E402
from t5x_like.training import checkpoints  # noqa: E402


def _restore(model, run_dir):
    module = model.make_module(nnx.Rngs(0))
    # Every variable: a DPO run's checkpoint also holds its frozen reference.
    params = checkpoints.restore_params(os.path.join(run_dir, "checkpoints"),
                                        nnx.state(module))
    nnx.update(module, params)
    return module


def _bound_fields():
    fields = {}
    for field in dataclasses.fields(layers.TransformerConfig):
        try:
            fields[field.name] = gin.query_parameter(f"layers.TransformerConfig.{field.name}")
        except ValueError:
            pass  # the dataclass default
    return fields


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy_dir", required=True)
    parser.add_argument("--reward_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--policy_is_dpo", action="store_true",
                        help="the policy run trained a preference.DPOModel")
    parser.add_argument("--prompts_per_domain", type=int, default=16)
    parser.add_argument("--max_decode_length", type=int, default=33)
    args = parser.parse_args()
    gin.parse_config_files_and_bindings(
        [os.path.join(os.path.dirname(__file__), "..", "gin_configs", "models", "tiny_llama.gin")],
        [])
    cfg = layers.TransformerConfig(**_bound_fields())  # models/tiny_llama.gin's config
    policy = (preference.DPOModel(cfg) if args.policy_is_dpo else families.DecoderOnlyModel(cfg))
    reward_model = preference.RewardModel(cfg)
    policy_module = _restore(policy, args.policy_dir)
    reward_module = _restore(reward_model, args.reward_dir)
    prompts = []
    for domain in tasks.reka_mix.DOMAINS:
        ds = seqio.TaskRegistry.get(tasks.preference.preference_task_name(domain)).get_dataset(
            tasks.preference.PREFERENCE_FEATURE_LENGTHS, split="validation", shuffle=False)
        prompts += [ex["inputs"] for ex in ds.take(args.prompts_per_domain).as_numpy_iterator()]
    prompts = np.stack(prompts).astype(np.int32)
    decode = vocabulary.resolve_decode(  # the prompts' vocabulary's EOS and start token
        DecodeConfig(method="sample", max_decode_length=args.max_decode_length),
        vocabulary.get_vocabulary())
    _, rewards = best_of_n.sample_and_score(policy, policy_module, reward_model, reward_module,
                                            prompts, 8, decode, seed=0)
    ks = [1, 2, 4, 8]
    best = {k: float(rewards[best_of_n.best_of(rewards, k), np.arange(len(prompts))].mean())
            for k in ks}
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"policy_dir": args.policy_dir, "reward_dir": args.reward_dir,
              "prompts": len(prompts), "mean_best_of_k_reward": best,
              "mean_reward": float(rewards.mean())}
    with open(os.path.join(args.out_dir, "best_of_n.json"), "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [best[k] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("mean reward of the best sample")
    ax.set_title(f"best-of-N on {len(prompts)} held-out prompts", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "best_of_n.png"), dpi=110)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
