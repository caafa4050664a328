"""Special ids from the vocabulary, and id 0 as a real token (issue 27).

A Llama-3-style `tokenizer.json` is built here with the `tokenizers` package: id 0 is
"!", id 1 is '"', the specials <|begin_of_text|> / <|end_of_text|> come last. Decoding
takes its EOS and BOS from it (a gin setting that contradicts it is refused, naming
both), and padding travels as lengths and segment ids, never read from id 0: prompts
(`_left_aligned`), the reward's last token, DPO's and the reward model's attention, the
rows rejection sampling joins. The slow test imports a tiny Llama with this tokenizer
and decodes a prompt full of "!" through `python -m t5x_like.infer`.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_common import LLAMA_CONFIG
from tiny import tiny_config

from t5x_like.data import forms, vocabulary
from t5x_like.interop import hf
from t5x_like.model import decoding, families
from t5x_like.objectives import preference
from t5x_like.recipes import best_of_n

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 64  # ids: 0 "!", 1 '"', 2..61 "w2".."w61", 62 <|begin_of_text|>, 63 <|end_of_text|>
BOS, EOS = V - 2, V - 1


def llama3_style_tokenizer(path, *, specials=("<|begin_of_text|>", "<|end_of_text|>")):
    """A word-level tokenizer.json laid out like Llama 3's: id 0 "!", id 1 '"', the
    special tokens at the top. Words are split on whitespace ("! w5 !" -> 0 5 0)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = {"!": 0, '"': 1, **{f"w{i}": i for i in range(2, V - 2)}}
    words.update({token: V - 2 + i for i, token in enumerate(specials)})
    tok = tokenizers.Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_vocab(tmp_path_factory):
    path = llama3_style_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return vocabulary.HfTokenizerVocabulary(path, eos_token="<|end_of_text|>",
                                            bos_token="<|begin_of_text|>")


# ------------------------------------------------------------------------------ ids


def test_the_tokenizer_is_llama3_shaped(hf_vocab):
    assert hf_vocab.encode('! w5 " ! w7') == [0, 5, 1, 0, 7]
    assert (hf_vocab.bos_id, hf_vocab.eos_id, hf_vocab.vocab_size) == (BOS, EOS, V)
    assert hf_vocab.decode([0, 5, 1, EOS, 0, 0]) == '! w5 "'  # through EOS; 0 is "!"
    assert not vocabulary.zero_is_padding(hf_vocab)
    assert vocabulary.zero_is_padding(vocabulary.get_vocabulary())


def test_decode_ids_come_from_the_vocabulary(hf_vocab):
    unresolved = decoding.DecodeConfig(max_decode_length=5)
    assert not unresolved.is_resolved
    resolved = vocabulary.resolve_decode(unresolved, hf_vocab)
    assert (resolved.eos_id, resolved.bos_id, resolved.max_decode_length) == (EOS, BOS, 5)
    shipped = vocabulary.resolve_decode(unresolved, vocabulary.get_vocabulary())
    assert (shipped.eos_id, shipped.bos_id) == (vocabulary.EOS_ID, 0)  # SeqIO's start 0
    # a setting that agrees is kept; T5's defaults against Llama 3's ids are refused
    agreed = decoding.DecodeConfig(eos_id=EOS, bos_id=BOS)
    assert vocabulary.resolve_decode(agreed, hf_vocab) == agreed
    with pytest.raises(ValueError, match=rf"eos_id=1 contradicts .*whose eos_id is {EOS}"):
        vocabulary.resolve_decode(decoding.DecodeConfig(eos_id=1), hf_vocab)
    with pytest.raises(ValueError, match=rf"bos_id=0 contradicts .*whose bos_id is {BOS}"):
        vocabulary.resolve_decode(decoding.DecodeConfig(bos_id=0), hf_vocab)
    with pytest.raises(ValueError, match="DecodeConfig.eos_id='eos'"):
        decoding.DecodeConfig(eos_id="eos")


def test_a_tokenizer_without_eos_cannot_decode(tmp_path):
    path = llama3_style_tokenizer(tmp_path / "tokenizer.json")
    no_eos = vocabulary.HfTokenizerVocabulary(path, bos_token="<|begin_of_text|>")
    with pytest.raises(ValueError, match=r"has no EOS token, so decoding could never stop"):
        vocabulary.resolve_decode(decoding.DecodeConfig(), no_eos)
    no_bos = vocabulary.HfTokenizerVocabulary(path, eos_token="<|end_of_text|>")
    assert vocabulary.resolve_decode(decoding.DecodeConfig(), no_bos).bos_id is None


def test_predict_batch_refuses_unresolved_ids():
    model = families.DecoderOnlyModel(tiny_config())
    with pytest.raises(ValueError, match="has no special ids yet"):
        model.predict_batch(None, {"prompt": jnp.zeros((1, 2), jnp.int32)},
                            decoding.DecodeConfig())


def test_hf_import_gin_binds_config_jsons_special_ids():
    text = hf.decode_gin_text({"bos_token_id": 128000, "eos_token_id": 128001})
    assert "decoding.DecodeConfig.eos_id = 128001" in text
    assert "decoding.DecodeConfig.bos_id = 128000" in text
    listed = hf.decode_gin_text({"bos_token_id": 128000, "eos_token_id": [128001, 128009]})
    assert "DecodeConfig.eos_id" not in listed and "[128001, 128009]" in listed
    assert "bos_id = None" in hf.decode_gin_text({"bos_token_id": None, "eos_token_id": 2})


# ------------------------------------------------------------------------------ padding


def test_left_aligned_keeps_zeros_inside_and_uses_lengths():
    tokens, valid = families._left_aligned(jnp.array([[10, 0, 20, 0]]), None, None)
    # SeqIO's right padding: the row runs to its last non-zero token, the 0 inside kept
    assert np.asarray(tokens).tolist() == [[0, 10, 0, 20]]
    assert np.asarray(valid).tolist() == [[False, True, True, True]]
    tokens, valid = families._left_aligned(jnp.array([[10, 0, 20, 0], [0, 7, 0, 0]]),
                                           jnp.array([4, 2]), BOS)
    assert np.asarray(tokens).tolist() == [[BOS, 10, 0, 20, 0], [0, 0, BOS, 0, 7]]
    assert np.asarray(valid).sum(axis=1).tolist() == [5, 3]


def test_last_token_index_with_zero_inside():
    tokens = jnp.array([[10, 0, 20, 30, 0], [0, 0, 0, 0, 0], [0, 5, 0, 0, 0]])
    assert np.asarray(preference.last_token_index(tokens)).tolist() == [3, 0, 1]
    segments = jnp.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert np.asarray(preference.last_token_index(tokens, segments)).tolist() == [4, 0, 2]


def test_joined_rows_keep_id_zero_in_prompts_and_responses():
    prompts = np.array([[10, 0, 0, 0], [0, 12, 0, 0]], np.int32)
    responses = np.array([[0, 7, EOS, 0], [5, 0, 0, 0]], np.int32)  # row 1: no EOS
    rows, segments = best_of_n._joined_rows(prompts, responses, EOS, lengths_B=[3, 2])
    assert rows.tolist() == [[10, 0, 0, 0, 7, EOS, 0, 0], [0, 12, 5, 0, 0, 0, 0, 0]]
    assert segments.sum(axis=1).tolist() == [6, 6]
    assert best_of_n._response_tokens(np.array([0, 7, EOS, 0]), EOS) == [0, 7, EOS]


def test_preference_rows_carry_segment_ids(hf_vocab):
    import tensorflow as tf

    prompt, chosen, rejected = (hf_vocab.encode(t) for t in ("w5 ! w6", "! w7 !", "w9 !"))
    assert 0 in prompt and chosen[-1] == 0 and rejected[-1] == 0
    ds = tf.data.Dataset.from_tensors({
        "inputs": tf.constant(prompt, tf.int32), "targets": tf.constant(chosen, tf.int32),
        "rejected": tf.constant(rejected, tf.int32), "rating": tf.constant([2], tf.int32)})
    lengths = {"inputs": 3, "targets": 4, "rejected": 4, "rating": 1}
    row = next(forms.PREFERENCE.converter()(ds, lengths).as_numpy_iterator())
    assert row["chosen_tokens"].tolist() == [5, 0, 6, 0, 7, 0, 0]
    assert row["chosen_segment_ids"].tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert row["rejected_segment_ids"].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert row["chosen_response"].tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_training_rows_weight_and_attend_id_zero(hf_vocab):
    """SeqIO's converters read 0 as padding; for a tokenizer.json they get token_zero's
    wrapper: "!" is weighted and attended, padding still is not, in unpacked rows (with
    segment ids), packed rows and the pool packer's per-row conversion."""
    import tensorflow as tf

    texts = ["w5 ! w6 !", "! w7"]
    examples = [{"targets": hf_vocab.encode(t) + [EOS]} for t in texts]

    def dataset():
        return tf.data.Dataset.from_generator(
            lambda: iter(examples), output_signature={"targets": tf.TensorSpec([None], tf.int32)})

    unpacked = list(forms.LM.converter(False, zero_is_token=True)(
        dataset(), {"targets": 7}).as_numpy_iterator())
    assert unpacked[0]["decoder_target_tokens"].tolist() == [5, 0, 6, 0, EOS, 0, 0]
    assert unpacked[0]["decoder_input_tokens"].tolist() == [0, 5, 0, 6, 0, EOS, 0]
    assert unpacked[0]["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert unpacked[0]["decoder_segment_ids"].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert unpacked[1]["decoder_loss_weights"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    seqio_own = next(forms.LM.converter(False)(dataset(), {"targets": 7}).as_numpy_iterator())
    assert seqio_own["decoder_loss_weights"].tolist() == [1, 0, 1, 0, 1, 0, 0]  # the bug
    packed = next(forms.LM.converter(True, zero_is_token=True)(
        dataset(), {"targets": 9}).as_numpy_iterator())
    assert packed["decoder_target_tokens"].tolist() == [5, 0, 6, 0, EOS, 0, 7, EOS, 0]
    assert packed["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert packed["decoder_segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 0]
    row = {"targets": tf.constant([5, 0, 6, 0, EOS, 0, 7, EOS, 0]),
           "targets_segment_ids": tf.constant([1, 1, 1, 1, 1, 2, 2, 2, 0]),
           "targets_positions": tf.constant([0, 1, 2, 3, 4, 0, 1, 2, 0])}
    pooled = forms.LM.converter(True, zero_is_token=True)._convert_example(row)
    assert {k: np.asarray(v).tolist() for k, v in pooled.items()} == {
        k: v.tolist() for k, v in packed.items()}


# ------------------------------------------------------------------------------ losses


def _pair_batch(vocab):
    """Two pairs whose prompts and responses hold "!" (id 0), inside and last, made by
    the preference converter; a third all-padding row."""
    import tensorflow as tf

    texts = [("w5 ! w6", "! w7 !", "w9 !", 3), ("! w8", 'w2 ! " w3', "! !", 1)]
    examples = [{"inputs": vocab.encode(p), "targets": vocab.encode(c),
                 "rejected": vocab.encode(r), "rating": [k]} for p, c, r, k in texts]
    lengths = {"inputs": 3, "targets": 4, "rejected": 4, "rating": 1}
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={
            k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets", "rejected",
                                                         "rating")})
    rows = list(forms.PREFERENCE.converter()(ds, lengths).as_numpy_iterator())
    batch = {k: np.stack([r[k] for r in rows] + [np.zeros_like(rows[0][k])]) for k in rows[0]}
    return batch, examples


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) \
        - x.max(-1, keepdims=True)


def test_reward_model_with_id_zero_equals_a_hand_computation(hf_vocab):
    model = preference.RewardModel(tiny_config(vocab_size=V), margin="large")
    module = model.make_module(nnx.Rngs(0))
    module.reward_head[...] = jax.random.normal(jax.random.key(1), (32,))
    batch, examples = _pair_batch(hf_vocab)
    loss, metrics = nnx.jit(lambda m, b: model.loss_fn(m, b))(
        module, {k: jnp.asarray(v) for k, v in batch.items()})
    final_states = nnx.jit(lambda m, t: m.final_states(t))
    head = np.asarray(module.reward_head[...], np.float64)

    def reward(tokens):  # the row alone, every position attended (no segment ids), its
        # last token's state read: causal, so the filler after it (one shape, one compile)
        # changes nothing
        row = jnp.asarray([tokens + [33] * (8 - len(tokens))], jnp.int32)
        states = np.asarray(final_states(module, row))
        return float(states[0, len(tokens) - 1] @ head)

    hand = []
    for ex in examples:
        delta = reward(ex["inputs"] + ex["targets"]) - reward(ex["inputs"] + ex["rejected"])
        hand.append(np.log1p(np.exp(-(delta - preference.MARGINS["large"][ex["rating"][0]]))))
    assert float(metrics["weight_sum"]) == 2  # the padding row is no pair
    assert float(loss) == pytest.approx(float(np.mean(hand)), rel=1e-5, abs=1e-6)
    assert float(metrics["num_tokens"]) == sum(
        len(ex["inputs"]) * 2 + len(ex["targets"]) + len(ex["rejected"]) for ex in examples)


def test_dpo_with_id_zero_equals_a_hand_computation(hf_vocab):
    model = preference.DPOModel(tiny_config(vocab_size=V), beta=0.5)
    module = model.make_module(nnx.Rngs(0))
    # the policy moves away from its frozen reference (else every loss is log 2)
    module.embed.embedding[...] = module.embed.embedding[...] + 0.5 * jax.random.normal(
        jax.random.key(3), module.embed.embedding[...].shape)
    batch, examples = _pair_batch(hf_vocab)
    loss, metrics = nnx.jit(lambda m, b: model.loss_fn(m, b))(
        module, {k: jnp.asarray(v) for k, v in batch.items()})
    logits_of = nnx.jit(lambda net, t: net(t))

    def logprob(net, prompt, response):  # the row alone: shifted-in 0, every token seen
        tokens = prompt + response  # (causal: the filler after it changes nothing)
        logits = logits_of(net, jnp.asarray([[0] + tokens + [33] * (7 - len(tokens))],
                                            jnp.int32))
        logp = _log_softmax(np.asarray(logits[0]))
        return sum(logp[i, tokens[i]] for i in range(len(prompt), len(tokens)))

    hand = []
    for ex in examples:
        deltas = [logprob(module, ex["inputs"], ex[side])
                  - logprob(module.reference, ex["inputs"], ex[side])
                  for side in ("targets", "rejected")]
        hand.append(np.log1p(np.exp(-0.5 * (deltas[0] - deltas[1]))))
    assert float(metrics["weight_sum"]) == 2
    assert abs(float(loss) - np.log(2)) > 1e-3  # the policy is not the reference
    assert float(loss) == pytest.approx(float(np.mean(hand)), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------ infer


def _random_llama(directory, seed, vocab_permutation=None):
    """A tiny Llama (tests/hf_common.py's sizes, V ids) with numpy-random weights as
    save_pretrained writes it; `vocab_permutation[i]`: the new id of token i."""
    import safetensors.numpy

    cfg = {**LLAMA_CONFIG, "vocab_size": V, "bos_token_id": BOS, "eos_token_id": EOS,
           "torch_dtype": "float32"}
    d, f, h, g, k = (cfg[n] for n in ("hidden_size", "intermediate_size",
                                      "num_attention_heads", "num_key_value_heads",
                                      "head_dim"))
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((V, d)).astype(np.float32),
               "lm_head.weight": w(V, d),
               "model.norm.weight": (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(h * k, d), p + "self_attn.k_proj.weight": w(g * k, d),
            p + "self_attn.v_proj.weight": w(g * k, d), p + "self_attn.o_proj.weight": w(d, h * k),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": (1 + 0.2 * rng.standard_normal(d)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1 + 0.2 * rng.standard_normal(d)).astype(
                np.float32)})
    if vocab_permutation is not None:
        inverse = np.argsort(vocab_permutation)  # row j of the new table: old token inverse[j]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = np.ascontiguousarray(tensors[name][inverse])
    os.makedirs(directory)
    safetensors.numpy.save_file(tensors, os.path.join(directory, hf.SAFETENSORS_FILE),
                                metadata={"format": "pt"})
    with open(os.path.join(directory, hf.CONFIG_FILE), "w") as file:
        json.dump(cfg, file)


def _designed_llama(tmp_path, prompt):
    """A random tiny Llama relabelled so that its greedy continuation of BOS + `prompt`
    reaches a '"' (id 1, T5's EOS) and later ends at <|end_of_text|> (EOS): the ids of
    a random model's continuation permuted, as a tokenizer may number its tokens any
    way. Returns (save_pretrained folder, expected ids before EOS)."""
    fixed = set(prompt) | {0, 1, BOS, EOS}
    for seed in range(20):
        _random_llama(tmp_path / f"r{seed}", seed)
        model, module = hf.load(tmp_path / f"r{seed}", dtype="float32")
        graphdef, state = nnx.split(module)
        decode = decoding.DecodeConfig(max_decode_length=12, eos_id=-1, bos_id=BOS)
        out = jax.jit(lambda s, p, n: model.predict_batch(
            nnx.merge(graphdef, s), {"prompt": p, "prompt_lengths": n}, decode))(
            state, jnp.asarray([prompt], jnp.int32), jnp.asarray([len(prompt)], jnp.int32))
        generated = [int(t) for t in np.asarray(out["tokens"])[0]]
        for end in range(2, len(generated)):
            before, last = generated[:end], generated[end]
            quote = next((t for t in before if t not in fixed), None)
            if quote is None or last in fixed or last in before or last == quote:
                continue
            mapping = {t: t for t in set(prompt) | {BOS}}
            mapping.update({quote: 1, last: EOS})
            rest = iter(sorted(set(range(V)) - set(mapping.values())))
            permutation = np.array([mapping[i] if i in mapping else next(rest)
                                    for i in range(V)])
            folder = tmp_path / "llama3_style"
            _random_llama(folder, seed, permutation)
            return folder, [int(permutation[t]) for t in before]
    raise AssertionError("no seed gave a usable continuation")


@pytest.mark.slow
def test_an_imported_llama3_style_model_decodes_bang_prompts_to_its_real_eos(tmp_path):
    """`hf import` then `python -m t5x_like.infer --gin.INFER_PROMPTS=...`: a prompt of
    "!" (id 0) and words decodes from <|begin_of_text|>, passes '"' (id 1, where T5's
    EOS would stop) and stops at <|end_of_text|>."""
    tokenizer = llama3_style_tokenizer(tmp_path / "tokenizer.json")
    text = "! w5 ! w7 !"
    vocab = vocabulary.HfTokenizerVocabulary(tokenizer, eos_token="<|end_of_text|>",
                                             bos_token="<|begin_of_text|>")
    prompt = vocab.encode(text)
    assert prompt == [0, 5, 0, 7, 0]
    folder, expected = _designed_llama(tmp_path, prompt)
    assert 1 in expected
    hf.import_hf(folder, tmp_path / "params", gin_out=tmp_path / "llama3_style.gin")
    gin_text = (tmp_path / "llama3_style.gin").read_text()
    assert f"DecodeConfig.eos_id = {EOS}" in gin_text and f"bos_id = {BOS}" in gin_text
    (tmp_path / "id0_tasks.py").write_text(
        "import seqio\nimport tensorflow as tf\nfrom t5x_like.data import vocabulary\n"
        f"VOCAB = vocabulary.HfTokenizerVocabulary({str(tokenizer)!r}, "
        "eos_token='<|end_of_text|>', bos_token='<|begin_of_text|>')\n"
        "seqio.TaskRegistry.add('id0_llama3_style', source=seqio.FunctionDataSource(\n"
        "    lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(['w2']),\n"
        "    splits=['validation']), preprocessors=[],\n"
        "    output_features={'targets': seqio.Feature(VOCAB)})\n")
    (tmp_path / "exp.gin").write_text(
        "include 'llama3_style.gin'\ninclude 'runs/infer.gin'\ninclude 'meshes/cpu1.gin'\n"
        "import id0_tasks\n\nMIXTURE_OR_TASK_NAME = 'id0_llama3_style'\n"
        "TASK_FEATURE_LENGTHS = {'targets': 16}\nCHECKPOINT_PATH = 'params'\n"
        f"INFER_OUTPUT_DIR = 'out'\nINFER_PROMPTS = [{text!r}]\n"
        "decoding.DecodeConfig.max_decode_length = 12\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def infer(*flags):
        return subprocess.run(
            [sys.executable, "-m", "t5x_like.infer", "--gin_file=exp.gin",
             f"--gin_search_paths={tmp_path}", *flags], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=600)

    proc = infer()
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "out" / "prompts-predict.jsonl").read_text())
    assert record["prediction"] == vocab.decode(expected)
    assert '"' in record["prediction"]  # id 1 did not end it
    # T5's EOS set against this tokenizer: one paragraph naming both, nothing written
    refused = infer("--gin.decoding.DecodeConfig.eos_id=1", "--gin.INFER_OUTPUT_DIR='out2'")
    assert refused.returncode == 2
    assert "eos_id=1 contradicts the task vocabulary" in refused.stderr
    assert f"whose eos_id is {EOS}" in refused.stderr
    assert not (tmp_path / "out2").exists()
