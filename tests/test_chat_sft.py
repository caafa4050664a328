"""Chat-format SFT (t5x_like/data/chat.py, tasks/chat.py, gin_configs/runs/sft.gin).

- the loss weights are exactly the assistant's content and end-of-turn tokens, checked by
  hand on two-turn dialogues in the plain format (the shipped SentencePiece vocabulary)
  and in Llama 3's template over a Llama-3-style tokenizer.json built here, whose id 0
  ("!") is a real token that carries weight inside an answer;
- a tokenizer_config.json's own template renders as a hand-written string, and "auto"
  picks it; a template the tokenizer lacks, a template that rewrites earlier turns and
  a bad dialogue are refused, each with one paragraph, registering nothing;
- packed rows keep dialogues apart: each dialogue's score under a model is the same
  packed beside another as alone, with the packing of training (pool and greedy);
- (slow) runs/sft.gin from a checkpoint lowers the held-out dialogues' loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

import tasks  # noqa: F401  (registers corpus_chat)
from tasks import chat as chat_tasks
from t5x_like.data import chat, forms, pipeline
from t5x_like.data import vocabulary as vocabulary_lib
from t5x_like.model import families
import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIALOGUE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour"},
    {"role": "assistant", "content": "Blue!"},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red! Green!"},
]
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(directory, config: dict | None = None) -> vocabulary_lib.HfTokenizerVocabulary:
    """A Llama-3-style byte-level tokenizer.json (no merges: one token per byte, "!" at
    id 0 as in Llama 3) with Llama 3's and ChatML's special tokens, and optionally a
    tokenizer_config.json beside it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (c != "!", c))
    tok = tokenizers.Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return vocabulary_lib.HfTokenizerVocabulary(os.path.join(directory, "tokenizer.json"),
                                                eos_token="<|eot_id|>")


def weighted_text(vocab, ids, weights) -> list[str]:
    """The text of each run of weighted tokens (special tokens kept)."""
    runs, current = [], []
    for i, w in zip(ids, weights):
        if w:
            current.append(int(i))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [vocab.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# ----------------------------------------------------------------------------------
# Loss weights
# ----------------------------------------------------------------------------------


def test_plain_format_weights_exactly_the_assistant_tokens():
    vocab = vocabulary_lib.get_vocabulary()
    fmt = chat.chat_format(vocab)
    assert fmt.name == "plain"
    ids, weights = fmt.encode(chat.check_messages(DIALOGUE))
    enc = vocab.encode
    expected_ids, expected_weights = [], []
    for header, content, w in (("System:", "Answer briefly.", 0), ("User:", "Name a colour", 0),
                               ("Assistant:", "Blue!", 1), ("User:", "Another one?", 0),
                               ("Assistant:", "Red! Green!", 1)):
        expected_ids += enc(header) + enc(content) + [1]  # EOS ends every turn
        expected_weights += [0] * len(enc(header)) + [w] * (len(enc(content)) + 1)
    assert ids == expected_ids and weights == expected_weights
    prompt, prompt_weights = fmt.encode(DIALOGUE[:2], add_generation_prompt=True)
    assert prompt == ids[:len(prompt) - len(enc("Assistant:"))] + enc("Assistant:")
    assert not any(prompt_weights)


def test_llama3_template_weights_the_answers_and_their_eot(tmp_path):
    """No template in the tokenizer: "auto" is Llama 3's; the weighted tokens are the two
    answers with their <|eot_id|>, nothing of a header; "!" (id 0) is weighted."""
    vocab = write_tokenizer(tmp_path / "tok")
    assert vocab.tokenizer.token_to_id("!") == 0
    fmt = chat.chat_format(vocab, "auto")
    assert fmt.name == "llama3"
    text, _ = fmt.assistant_spans(DIALOGUE)
    turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
    assert text == "<|begin_of_text|>" + "".join(turn.format(m["role"], m["content"])
                                                 for m in DIALOGUE)
    ids, weights = fmt.encode(DIALOGUE)
    assert vocab.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert weighted_text(vocab, ids, weights) == ["Blue!<|eot_id|>", "Red! Green!<|eot_id|>"]
    assert 0 in [i for i, w in zip(ids, weights) if w]  # "!" is a real, weighted token
    prompt, _ = fmt.encode(DIALOGUE[:2], add_generation_prompt=True)
    assert vocab.tokenizer.decode(prompt, skip_special_tokens=False) == (
        "<|begin_of_text|>" + turn.format("system", "Answer briefly.")
        + turn.format("user", "Name a colour")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_tokenizers_own_template_renders_as_transformers_would(tmp_path):
    """A tokenizer_config.json template (ChatML, with trim_blocks) renders as the
    hand-written string; "auto" picks it over Llama 3's; weights cover each answer, its
    <|im_end|> and the newline the template puts after it."""
    vocab = write_tokenizer(tmp_path / "tok", {"chat_template": CHATML,
                                               "eos_token": {"content": "<|im_end|>"}})
    fmt = chat.chat_format(vocab)
    assert fmt.name == "tokenizer"
    assert fmt.render(DIALOGUE[:3]) == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                                        "<|im_start|>user\nName a colour<|im_end|>\n"
                                        "<|im_start|>assistant\nBlue!<|im_end|>\n")
    assert fmt.render(DIALOGUE[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\n")
    ids, weights = fmt.encode(DIALOGUE)
    assert weighted_text(vocab, ids, weights) == ["Blue!<|im_end|>\n",
                                                  "Red! Green!<|im_end|>\n"]
    # Transformers' extras: {% generation %} renders its body; raise_exception refuses.
    tracked = CHATML.replace("message['content'] + '<|im_end|>\n' }}",
                             "message['content'] + '<|im_end|>\n' }}"
                             "{% generation %}{% endgeneration %}")
    assert chat.JinjaFormat(vocab, tracked, {}, "t").render(DIALOGUE) == fmt.render(DIALOGUE)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(Exception, match="user first"):
        chat.JinjaFormat(vocab, strict, {}, "t").render(DIALOGUE)


@pytest.mark.parametrize("template", [chat.LLAMA3_TEMPLATE, CHATML])
def test_rendering_equals_transformers_apply_chat_template(tmp_path, template):
    """Where transformers is installed (the `interop` extra): its apply_chat_template's
    text for the same tokenizer_config.json equals ours, full and as a prompt."""
    transformers = pytest.importorskip("transformers")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
              "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    vocab = write_tokenizer(tmp_path / "tok", config)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ours = chat.chat_format(vocab, "tokenizer")
    assert ours.render(DIALOGUE) == theirs.apply_chat_template(DIALOGUE, tokenize=False)
    assert ours.render(DIALOGUE[:2], add_generation_prompt=True) == theirs.apply_chat_template(
        DIALOGUE[:2], tokenize=False, add_generation_prompt=True)


def test_the_seqio_task_gives_targets_and_mask_of_one_length(tmp_path):
    """A task over JSONL lines (tasks.chat.register_chat_task; blank lines skipped)
    yields the format's ids and weights; the unpacked converter pads by segment ids,
    not by id 0."""
    vocab = write_tokenizer(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text("\n" + json.dumps({"messages": DIALOGUE}) + "\n \n")
    task = chat_tasks.register_chat_task(
        "test_chat_llama3", {"validation": str(tmp_path / "d.jsonl")}, vocabulary=vocab)
    try:
        example = next(task.get_dataset({"targets": 256, chat.LOSS_MASK: 256}, split="validation",
                                        shuffle=False).as_numpy_iterator())
        ids, weights = chat.chat_format(vocab).encode(DIALOGUE)
        assert example["targets"].tolist() == ids and example[chat.LOSS_MASK].tolist() == weights
        ds = task.get_dataset({"targets": 256, chat.LOSS_MASK: 256}, split="validation",
                              shuffle=False)
        assert len(list(ds.as_numpy_iterator())) == 1  # blank lines are skipped
        row = next(forms.CHAT.converter(pack=False)(
            ds, {"targets": 256, chat.LOSS_MASK: 256}).as_numpy_iterator())
        n = len(ids)
        assert row["decoder_segment_ids"].tolist() == [1] * n + [0] * (256 - n)
        assert row["decoder_loss_weights"].tolist() == weights + [0] * (256 - n)
        assert row["decoder_positions"][:n].tolist() == list(range(n))
    finally:
        seqio.TaskRegistry.remove("test_chat_llama3")


def test_a_decoder_only_model_takes_the_chat_form():
    model = families.DecoderOnlyModel(tiny.tiny_config())
    lengths = {"targets": 64, chat.LOSS_MASK: 64}
    assert model.data_form(lengths) is forms.CHAT
    assert forms.get("chat") is forms.CHAT
    assert model.get_initial_batch(2, lengths)["decoder_loss_weights"].shape == (2, 64)
    with pytest.raises(ValueError, match="must be equal"):
        forms.CHAT.check_lengths({"targets": 64, chat.LOSS_MASK: 32})


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------


def test_a_template_the_tokenizer_lacks_is_refused_and_nothing_registered(tmp_path):
    vocab = write_tokenizer(tmp_path / "tok", {"eos_token": "<|eot_id|>"})
    with pytest.raises(ValueError, match="has no chat_template") as info:
        chat_tasks.register_chat_task("test_chat_missing", {"train": "x.jsonl"},
                                      vocabulary=vocab, chat_template="tokenizer")
    assert "tokenizer_config.json" in str(info.value) and "'llama3'" in str(info.value)
    assert "test_chat_missing" not in seqio.TaskRegistry.names()
    with pytest.raises(ValueError, match="not one; use chat_template 'plain'"):
        chat.chat_format(vocabulary_lib.get_vocabulary(), "llama3")
    with pytest.raises(ValueError, match="Unknown chat_template"):
        chat.chat_format(vocab, "chatml")


def test_the_cli_refuses_a_template_the_tokenizer_lacks_and_writes_nothing(tmp_path):
    """A user's task module asks for the tokenizer's template, which its
    tokenizer_config.json lacks: `python -m t5x_like.train` prints the one paragraph
    (exit 2) and writes no run directory."""
    write_tokenizer(tmp_path / "tok", {"eos_token": "<|eot_id|>"})
    (tmp_path / "my_chat_tasks.py").write_text(
        "from t5x_like.data import vocabulary\nfrom tasks import chat\n"
        "chat.register_chat_task('my_chat', {'train': 'd.jsonl'}, "
        f"vocabulary=vocabulary.HfTokenizerVocabulary("
        f"{str(tmp_path / 'tok' / 'tokenizer.json')!r}, "
        "eos_token='<|eot_id|>'), chat_template='tokenizer')\n")
    (tmp_path / "exp.gin").write_text(
        "include 'models/tiny_llama.gin'\ninclude 'runs/sft.gin'\n"
        "include 'meshes/cpu8_fsdp.gin'\nimport my_chat_tasks\n"
        "MIXTURE_OR_TASK_NAME = 'my_chat'\nINITIAL_CHECKPOINT_PATH = 'ckpt'\n"
        "TRAIN_STEPS = 2\nBATCH_SIZE = 8\nMODEL_DIR = 'run'\n")
    proc = subprocess.run([sys.executable, "-m", "t5x_like.train", "--gin_file=exp.gin"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: chat_template 'tokenizer' asks for the tokenizer's own chat template" \
        in proc.stderr and "has no chat_template" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template that drops an earlier answer once a later one follows (as templates
    that strip reasoning do) cannot locate the answers: refused, naming the message."""
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    vocab = write_tokenizer(tmp_path / "tok", {"chat_template": rewriting})
    with pytest.raises(ValueError, match="before message 3 differently"):
        chat.chat_format(vocab).encode(DIALOGUE)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], "nothing to train on"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
     "nothing to train on"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
      {"role": "assistant", "content": "c"}], "only come first"),
    ([{"role": "bot", "content": "a"}], "must be"),
    ("hello", "non-empty list"),
])
def test_bad_dialogues_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.check_messages(messages)
    with pytest.raises(ValueError, match="not JSON"):
        chat.parse_dialogue(b"{messages")


# ----------------------------------------------------------------------------------
# Packing keeps dialogues apart
# ----------------------------------------------------------------------------------


def _examples(dialogues):
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": np.array(ids, np.int32), chat.LOSS_MASK: np.array(w, np.int32),
                  "task": np.int32(0)} for ids, w in dialogues),
        output_signature={"targets": tf.TensorSpec([None], tf.int32),
                          chat.LOSS_MASK: tf.TensorSpec([None], tf.int32),
                          "task": tf.TensorSpec([], tf.int32)})


@pytest.mark.parametrize("pool", [1, 4])
def test_packed_dialogues_do_not_see_each_other(pool):
    """Two dialogues (ids < 64, with id 0 inside them) packed in one row, by seqio's
    greedy packing (pool 1) or the pool packer training uses: the row's segment ids,
    positions and weights are each dialogue's, and each dialogue's score under a tiny
    model equals its score alone."""
    rng = np.random.default_rng(0)
    dialogues = []
    for n in (11, 9):
        ids = rng.integers(0, 64, n).tolist()
        ids[2] = 0
        weights = [0] * 4 + [1] * (n - 4)
        dialogues.append((ids, weights))
    lengths = {"targets": 24, chat.LOSS_MASK: 24}
    examples = _examples(dialogues)
    if pool == 1:
        converted = forms.CHAT.converter(pack=True)(
            examples.map(lambda ex: {k: v for k, v in ex.items() if k != "task"}), lengths)
    else:
        converted = pipeline.pool_packed_rows(forms.CHAT, examples, lengths, pool, 1)
    rows = list(converted.as_numpy_iterator())
    assert len(rows) == 1
    row = {k: v for k, v in rows[0].items() if k in forms.CHAT.model_features}
    (a, wa), (b, wb) = dialogues
    if np.sum(row["decoder_segment_ids"] == 1) != len(a):
        (a, wa), (b, wb) = (b, wb), (a, wa)  # best-fit may put either first
    assert row["decoder_target_tokens"][:len(a) + len(b)].tolist() == a + b
    assert row["decoder_segment_ids"].tolist() == [1] * len(a) + [2] * len(b) + [0] * 4
    assert row["decoder_positions"][:len(a) + len(b)].tolist() == (
        list(range(len(a))) + list(range(len(b))))
    assert row["decoder_loss_weights"].tolist() == wa + wb + [0] * 4
    assert row["decoder_input_tokens"][len(a)] == 0  # the second dialogue starts afresh

    model = families.DecoderOnlyModel(tiny.tiny_config(z_loss=0.0))
    module = tiny.make_module(model.cfg)
    unpacked = {ids_key: [] for ids_key in row}
    for ids, weights in ((a, wa), (b, wb)):
        single = next(forms.CHAT.converter(pack=False)(
            _examples([(ids, weights)]).map(lambda ex: {k: v for k, v in ex.items()
                                                        if k != "task"}),
            lengths).as_numpy_iterator())
        for k in row:
            unpacked[k].append(single[k])
    alone = np.asarray(model.score_batch(module, {k: np.stack(v) for k, v in unpacked.items()}))
    per_segment = []
    for segment in (1, 2):
        masked = dict(row, decoder_loss_weights=row["decoder_loss_weights"]
                      * (row["decoder_segment_ids"] == segment))
        per_segment.append(float(model.score_batch(module, {k: v[None] for k, v in
                                                            masked.items()})[0]))
    np.testing.assert_allclose(per_segment, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# runs/sft.gin end to end
# ----------------------------------------------------------------------------------


def _train(*flags, cwd):
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "t5x_like.train",
                           "--gin_file=models/tiny_llama.gin", *flags,
                           "--gin_file=meshes/cpu8_fsdp.gin", "--gin.BATCH_SIZE=8"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_sft_from_a_checkpoint_lowers_the_held_out_dialogue_loss(tmp_path):
    """A causal LM pretrained for a few steps, then runs/sft.gin from its checkpoint on
    corpus_chat: the held-out dialogues' loss (assistant tokens only) after 20 steps is
    below the loss before the first step, which is the checkpoint's, not a fresh init's."""
    from t5x_like.training import metrics

    _train("--gin_file=runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='reka_mix_causal'",
           "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.TRAIN_STEPS=30",
           "--gin.LEARNING_RATE=3e-3", "--gin.WARMUP_STEPS=5", "--gin.EVAL_TASKS=[]",
           "--gin.MODEL_DIR='pre'", cwd=tmp_path)
    sft = ["--gin_file=runs/sft.gin", "--gin.INITIAL_CHECKPOINT_PATH='pre'",
           "--gin.TASK_FEATURE_LENGTHS={'targets': 256, 'loss_mask': 256}",
           "--gin.TRAIN_STEPS=20", "--gin.EVAL_EVERY_STEPS=20", "--gin.LEARNING_RATE=1e-3"]
    _train(*sft, "--gin.MODEL_DIR='sft'", cwd=tmp_path)
    rows = metrics.read_jsonl(str(tmp_path / "sft" / "metrics.jsonl"))
    loss = {r["step"]: r["eval/corpus_chat/loss"] for r in rows if "eval/corpus_chat/loss" in r}
    assert set(loss) == {0, 20}, loss
    assert loss[20] < loss[0] - 0.1, loss
    # From a fresh init instead (no checkpoint), the held-out loss before training is higher.
    fresh = [f for f in sft if "INITIAL" not in f] + ["--gin.INITIAL_CHECKPOINT_PATH=None",
                                                       "--gin.TRAIN_STEPS=1"]
    _train(*fresh, "--gin.MODEL_DIR='fresh'", "--gin.EVAL_EVERY_STEPS=1", cwd=tmp_path)
    fresh_rows = metrics.read_jsonl(str(tmp_path / "fresh" / "metrics.jsonl"))
    fresh_loss = [r["eval/corpus_chat/loss"] for r in fresh_rows
                  if r.get("step") == 0 and "eval/corpus_chat/loss" in r]
    assert fresh_loss and fresh_loss[0] > loss[0], (fresh_loss, loss)
