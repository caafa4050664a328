"""Decode speed of the tiny models with the KV cache: tokens/s and the share outside the model.

    .venv/bin/python bench/decode_bench.py [--config.models=tiny_encdec,tiny_llama,tiny_palm] \
        [--config.batch_sizes=1,16] [--config.prompt_length=32] \
        [--config.decode_length=64] [--config.repeats=7]

For each model and batch size, on one CPU device with freshly initialised parameters
(speed does not depend on the weights), it times `model.predict_batch` (greedy, jitted
once per bucket: the prompt's prefill, then `decode_length` cached steps, EOS never
reached) and, in the same process alternately, the same prefill plus the same number
of bare `decode_step` calls in a `lax.fori_loop` (a fixed token fed back, no choice of
token, no log-probabilities, no stopping test). Generated tokens/s counts the decode
length times the batch; "outside the model" is 1 - bare / full: the time predict_batch
spends choosing tokens, keeping log-probabilities and testing for EOS. Medians of
`repeats` timed calls after a compile and a warm-up call.

At these sizes that share is not small at batch 16: a tiny model's step is a few
MFLOP per row, about what the arg-max and log-softmax over its 8,192-entry vocabulary
cost (both read every logit). That work grows with the vocabulary, not with the
model: for a 7B model it is far below 1% of the step.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.models = "tiny_encdec,tiny_llama,tiny_palm"  # gin_configs/models/<model>.gin
    config.batch_sizes = "1,16"
    config.prompt_length = 32
    config.decode_length = 64
    config.repeats = 7
    return config


_CONFIG = config_flags.DEFINE_config_dict("config", default_config())


def _prompt_batch(model, batch_size: int, prompt_length: int) -> dict:
    """The family's prompt feature: encoder inputs, or a causal prompt, of random ids."""
    tokens = np.random.default_rng(0).integers(6, 4000, (batch_size, prompt_length),
                                               dtype=np.int32)
    key = model.data_form({}).prompt_feature
    return {key: jnp.asarray(tokens)}


def _timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_name: str, batch_size: int, config) -> dict:
    from t5x_like import launch
    from t5x_like.model import decoding

    launch.parse_gin([f"models/{model_name}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    module = model.make_module(0)
    graphdef, arrays = nnx.split(module)
    batch = _prompt_batch(model, batch_size, config.prompt_length)
    decode = decoding.DecodeConfig(max_decode_length=config.decode_length, eos_id=-1,
                                   bos_id=0)

    @jax.jit
    def full(arrays, batch):
        return model.predict_batch(nnx.merge(graphdef, arrays), batch, decode)["tokens"]

    @jax.jit
    def bare(arrays, batch):
        module = nnx.merge(graphdef, arrays)
        logits_BV, cache = model._start_decoding(module, batch, decode.max_decode_length)
        token_B1 = jnp.ones((logits_BV.shape[0], 1), jnp.int32)

        def body(_, carry):
            here = nnx.merge(graphdef, jax.tree.map(lambda x: x, arrays))
            logits_B1V, cache = here.decode_step(token_B1, carry[1])
            return logits_B1V[:, -1], cache

        return jax.lax.fori_loop(0, decode.max_decode_length - 1, body, (logits_BV, cache))[0]

    # Alternate the two so that machine noise falls on both alike.
    full_s, bare_s = [], []
    for _ in range(3):
        full_s.append(_timed(lambda: full(arrays, batch), config.repeats))
        bare_s.append(_timed(lambda: bare(arrays, batch), config.repeats))
    full_t, bare_t = statistics.median(full_s), statistics.median(bare_s)
    return {"model": model_name, "batch": batch_size, "prompt": config.prompt_length,
            "decode": config.decode_length, "ms": 1e3 * full_t,
            "tokens_per_s": batch_size * config.decode_length / full_t,
            "outside_model": max(0.0, 1.0 - bare_t / full_t)}


def main(_):
    config = _CONFIG.value
    rows = [measure(name, int(b), config) for name in config.models.split(",")
            for b in config.batch_sizes.split(",")]
    print(f"{'model':<12} {'batch':>5} {'prompt':>6} {'decode':>6} {'ms/call':>8} "
          f"{'tokens/s':>9} {'outside model':>13}")
    for r in rows:
        print(f"{r['model']:<12} {r['batch']:>5} {r['prompt']:>6} {r['decode']:>6} "
              f"{r['ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['outside_model']:>12.1%}")


if __name__ == "__main__":
    app.run(main)
