"""Ghost Attention (t5x_like/data/gatt.py, tasks/gatt.py, t5x_like/recipes/gatt.py).

- the shipped instruction list is the templates x attributes list and the shipped
  vocabulary spells every instruction back exactly; a bad list is refused;
- over every shipped multi-turn dialogue: the sampling dialogue has the instruction in
  every user turn, the training dialogue in the first only; the loss mask is 0 on every
  token before the last assistant turn and 1 on its content and end of turn, in the
  plain format (token by token) and in Llama 3's template;
- the sampling recipe on a tiny random policy: every reply is the policy's decode of the
  dialogue so far with the instruction in every user turn; the output reads back as a
  task with the loss on the last reply only; an earlier output is never overwritten;
- (slow) `python -m t5x_like.gatt` then `python -m t5x_like.train` with runs/gatt.gin
  and the output's finetune.gin: the loss on the last replies falls.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import seqio
from flax import nnx

import tasks  # noqa: F401  (registers corpus_chat_gatt)
from tasks import gatt as gatt_tasks
from t5x_like.data import chat, gatt, mixtures
from t5x_like.data import vocabulary as vocabulary_lib
from t5x_like.model import families, partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.recipes import gatt as gatt_recipe
from t5x_like.training import checkpoints
from test_chat_sft import weighted_text, write_tokenizer
from tiny import entry_point_runner, tiny_config, tiny_model_gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"targets": 512, chat.LOSS_MASK: 512}
DP = partitioning.MeshConfig(shape={"data": 8}, rules="dp")  # cheapest to compile
SMALL = dict(vocab_size=8192, emb_dim=32, mlp_dim=64, z_loss=0.0)  # the shipped vocabulary


def _multi_turn(split="train"):
    return [d for d in gatt.read_dialogues(os.path.join(REPO, "data", "chat", f"{split}.jsonl"))
            if gatt.user_turns(d) >= 2]


def _last_assistant(messages):
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


# ----------------------------------------------------------------------------------
# Instructions
# ----------------------------------------------------------------------------------


def test_the_shipped_instructions_are_templates_times_attributes(tmp_path):
    shipped = gatt.read_instructions()
    assert shipped == gatt.build_instructions() and 20 <= len(shipped) <= 40
    assert "Always answer in French." in shipped and "Act as Napoleon." in shipped
    vocab = vocabulary_lib.get_vocabulary()
    assert [vocab.decode(vocab.encode(x)) for x in shipped] == shipped  # no unknown pieces
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="it has none"):
        gatt.read_instructions(str(tmp_path / "empty.txt"))
    (tmp_path / "twice.txt").write_text("Act as Napoleon.\nAct as Napoleon.\n")
    with pytest.raises(ValueError, match="repeats"):
        gatt.read_instructions(str(tmp_path / "twice.txt"))
    with pytest.raises(ValueError, match="have no attributes"):
        gatt.build_instructions({"colour": "Say {}."})
    # the draw depends on the dialogue's text and the seed only, and spreads over the list
    dialogues = _multi_turn()
    drawn = [gatt.instruction_for(d, shipped, seed=0) for d in dialogues]
    assert drawn == [gatt.instruction_for([dict(m) for m in d], shipped, 0) for d in dialogues]
    assert len(set(drawn)) > len(shipped) // 2
    assert drawn != [gatt.instruction_for(d, shipped, seed=1) for d in dialogues]


# ----------------------------------------------------------------------------------
# Dialogues and loss masks
# ----------------------------------------------------------------------------------


def test_the_instruction_is_in_every_sampling_user_turn_and_the_first_training_one():
    instruction = "Act as Napoleon."
    dialogues = _multi_turn()
    assert len(dialogues) == 186
    for d in dialogues:
        sampling = gatt.sampling_dialogue(d, instruction)
        assert [m["role"] for m in sampling] == [m["role"] for m in d if m["role"] != "assistant"]
        users = [m for m in sampling if m["role"] == "user"]
        assert len(users) >= 2 and all(m["content"].endswith("\n\n" + instruction) for m in users)
        training = gatt.training_dialogue(d, instruction)
        users = [m["content"] for m in training if m["role"] == "user"]
        assert users[0].endswith(instruction) and all(instruction not in u for u in users[1:])
        assistants = [m for m in training if m["role"] == "assistant"]
        assert [m.get("train", True) for m in assistants] == [False] * (len(assistants) - 1) + [True]
        assert chat.check_messages(training) == training  # the flag survives the check
    with pytest.raises(ValueError, match="needs a user turn answered"):
        gatt.training_dialogue([{"role": "user", "content": "hi"}], instruction)


def test_the_corpus_task_weights_only_the_last_reply_token_by_token():
    """corpus_chat_gatt's rows, rebuilt by hand in the plain format (the instruction in
    the first user turn only): weight 0 on every token up to the last reply (its header
    included), 1 on that reply and its EOS."""
    vocab = vocabulary_lib.get_vocabulary()
    fmt = chat.chat_format(vocab)
    instructions = gatt.read_instructions()
    task = seqio.get_mixture_or_task("corpus_chat_gatt")
    for split in ("validation", "train"):
        rows = list(task.get_dataset(LENGTHS, split=split, shuffle=False).as_numpy_iterator())
        dialogues = _multi_turn(split)
        assert len(rows) == len(dialogues) > 30
        for row, d in zip(rows[:40], dialogues):
            instruction = gatt.instruction_for(d, instructions)
            last = _last_assistant(d)
            first_user = next(i for i, m in enumerate(d) if m["role"] == "user")
            before = [dict(m) for m in d[:last]]
            before[first_user]["content"] += "\n\n" + instruction
            prompt, _ = fmt.encode(before, add_generation_prompt=True)
            reply = vocab.encode(d[last]["content"]) + [vocab.eos_id]
            ids, mask = row["targets"].tolist(), row[chat.LOSS_MASK].tolist()
            assert ids == prompt + reply
            assert mask == [0] * len(prompt) + [1] * len(reply)


def test_llama3_template_weights_only_the_last_reply_and_its_eot(tmp_path):
    vocab = write_tokenizer(tmp_path / "tok")
    d = _multi_turn("validation")[0]
    training = gatt.training_dialogue(d, "Always answer in Latin.")
    ids, weights = chat.chat_format(vocab, "llama3").encode(chat.check_messages(training))
    assert weighted_text(vocab, ids, weights) == [d[_last_assistant(d)]["content"].strip()
                                                  + "<|eot_id|>"]
    text = vocab.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.count("Always answer in Latin.") == 1


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": 0}],
     "is true or false"),
    ([{"role": "user", "content": "a", "train": True}, {"role": "assistant", "content": "b"}],
     "on an assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}],
     "nothing to train on"),
])
def test_a_bad_train_flag_is_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.check_messages(messages)


# ----------------------------------------------------------------------------------
# The sampling recipe
# ----------------------------------------------------------------------------------


def _policy(tmp_path):
    policy = families.DecoderOnlyModel(tiny_config(**SMALL))
    module = policy.make_module(nnx.Rngs(0))
    checkpoints.save_params(str(tmp_path / "policy"), nnx.state(module))
    return policy, module, str(tmp_path / "policy")


class _RecordingRun:
    """Inference's duck type for `sample_replies`: records every prompt row it is given
    and answers row b of call t with "reply t b" and EOS (or, for row 1, no EOS)."""

    def __init__(self, vocab, batch_size=4, width=8):
        self.vocab, self.batch_size, self.width, self.prompts = vocab, batch_size, width, []
        self.decode = DecodeConfig(eos_id=vocab.eos_id, bos_id=0)

    def predict(self, params, batch, key):
        t = len(self.prompts)
        self.prompts.append([row[:n].tolist() for row, n in zip(batch["prompt"],
                                                                  batch["prompt_lengths"])])
        tokens = np.zeros((self.batch_size, self.width), np.int32)
        for b in range(self.batch_size):
            ids = self.vocab.encode(f"reply {t} {b}") + ([] if b == 1 else [self.vocab.eos_id])
            tokens[b, :len(ids)] = ids
        return {"tokens": tokens}


def test_each_turn_is_sampled_from_the_dialogue_so_far_with_the_instruction_everywhere():
    """The prompts the recipe decodes, recorded: at turn t, row b is the sampling
    dialogue's system turn and first t + 1 user turns (each with the instruction) with
    the replies sampled before, rendered with the generation prompt; the rows written
    are the training dialogues of those replies. A dialogue that outgrows the prompt
    length is dropped, its batch-mates kept."""
    vocab = vocabulary_lib.get_vocabulary()
    fmt = chat.chat_format(vocab)
    instructions = gatt.read_instructions()
    dialogues = _multi_turn()[:3]
    run = _RecordingRun(vocab)
    rows, replies, cut, dropped = gatt_recipe._sample_all(run, None, fmt, dialogues,
                                                          instructions, 512, seed=3)
    assert (len(rows), replies, cut, dropped) == (3, 6, 2, 0)  # row 1 never ends its turns
    assert len(run.prompts) == 2  # two user turns each: one predict call per turn
    for b, (d, row) in enumerate(zip(dialogues, rows)):
        instruction = gatt.instruction_for(d, instructions, seed=3)
        sampling = gatt.sampling_dialogue(d, instruction)
        so_far = [m for m in sampling if m["role"] == "system"]
        expected_replies = []
        for t, user in enumerate(m for m in sampling if m["role"] == "user"):
            so_far.append(user)
            assert run.prompts[t][b] == fmt.encode(so_far, add_generation_prompt=True)[0]
            reply = vocab.decode(vocab.encode(f"reply {t} {b}"))
            so_far.append({"role": "assistant", "content": reply})
            expected_replies.append(reply)
        assert row == {"instruction": instruction, "source": b, "messages":
                       gatt.training_dialogue(gatt.replace_replies(d, expected_replies),
                                              instruction)}
    assert run.prompts[0][3] == []  # the batch's empty row: no prompt
    longest = max(range(3), key=lambda b: len(run.prompts[1][b]))
    narrow = _RecordingRun(vocab)
    rows, _, _, dropped = gatt_recipe._sample_all(
        narrow, None, fmt, dialogues, instructions, len(run.prompts[1][longest]) - 1, seed=3)
    assert dropped >= 1 and longest not in [r["source"] for r in rows] and rows


def test_the_recipe_writes_training_dialogues_sampled_by_a_tiny_policy(tmp_path, monkeypatch):
    monkeypatch.setenv(mixtures.REGISTRATIONS_ENV, "{}")  # removed again afterwards
    policy, _, policy_dir = _policy(tmp_path)
    vocab = vocabulary_lib.get_vocabulary()
    out = str(tmp_path / "gatt")

    def run():
        return gatt_recipe.sample_gatt_dialogues(
            policy=policy, policy_checkpoint=policy_dir, mesh_config=DP, output_dir=out,
            decode=DecodeConfig(method="sample", max_decode_length=6), batch_size=8,
            max_dialogues=3, prompt_length=384, seed=5)

    summary = run()
    assert summary["dialogues"] == 3 and summary["replies"] == 6
    assert summary["dropped_too_long"] == 0 and summary["chat_template"] == "plain"
    rows = [json.loads(line) for line in open(os.path.join(out, "dialogues.jsonl"))]
    replies = []
    for row, source in zip(rows, _multi_turn()[:3]):
        instruction = row["instruction"]
        assert instruction == gatt.instruction_for(source, gatt.read_instructions(), seed=5)
        replies += [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert row["messages"] == gatt.training_dialogue(
            gatt.replace_replies(source, replies[-2:]), instruction)
    assert len(set(replies)) == 6  # sampled, not a fixed string
    with pytest.raises(FileExistsError, match="never overwrites"):
        run()

    name = gatt_tasks.register_gatt_task("test_gatt_sampled", out)
    assert name in mixtures.recorded_registrations(gatt_tasks.GATT_TASK)
    read = list(seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    for example, row in zip(read, rows):
        ids, mask = example["targets"].tolist(), example[chat.LOSS_MASK].tolist()
        last = vocab.encode(row["messages"][-1]["content"]) + [vocab.eos_id]
        assert mask == [0] * (len(ids) - len(last)) + [1] * len(last) and ids[-len(last):] == last
    gin_text = open(os.path.join(out, "finetune.gin")).read()
    assert "@gatt_tasks.register_gatt_task()" in gin_text and summary["task_name"] in gin_text
    seqio.TaskRegistry.remove(name)
    with pytest.raises(FileNotFoundError, match="not the output"):
        gatt_tasks.register_gatt_task("test_gatt_none", str(tmp_path))


def test_the_cli_refuses_an_existing_output_before_loading_anything(tmp_path, capsys):
    import gin

    from t5x_like import launch

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "summary.json").write_text("{}")
    try:
        with pytest.raises(SystemExit) as stopped:
            gatt_recipe.main([
                "--gin_file=models/tiny_llama.gin", "--gin_file=meshes/cpu8_fsdp.gin",
                "--gin_file=runs/gatt_sample.gin", "--gin.POLICY_CHECKPOINT='p'",
                f"--gin.GATT_OUTPUT_DIR='{tmp_path / 'g'}'"])
    finally:
        gin.clear_config()
        launch._gin_imports.clear()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'g'} exists and is not empty" in err and "GATT_OUTPUT_DIR" in err




@pytest.mark.slow
def test_sampling_then_gatt_fine_tuning_end_to_end(tmp_path):
    """`python -m t5x_like.gatt` from a tiny random policy over 8 shipped dialogues,
    then `python -m t5x_like.train` with runs/gatt.gin and the output's finetune.gin,
    from that policy: the loss on the last replies falls and the checkpoint moves."""
    from t5x_like.training import metrics

    policy, _, _ = _policy(tmp_path)
    run = entry_point_runner(tmp_path, tiny_model_gin())

    run("t5x_like.gatt", "--gin_file=runs/gatt_sample.gin", "--gin.POLICY_CHECKPOINT='policy'",
        "--gin.GATT_OUTPUT_DIR='sampled'", "--gin.GATT_MAX_DIALOGUES=8",
        "--gin.decoding.DecodeConfig.max_decode_length=16")
    summary = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert summary["dialogues"] == 8 and summary["replies"] == 16
    run("t5x_like.train", "--gin_file=runs/gatt.gin", "--gin_file=sampled/finetune.gin",
        "--gin.INITIAL_CHECKPOINT_PATH='policy'", "--gin.MODEL_DIR='tuned'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 512, 'loss_mask': 512}",
        "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=8", "--gin.LEARNING_RATE=3e-3",
        "--gin.EVAL_EVERY_STEPS=8", "--gin.train.DataConfig.data_workers=1")
    records = metrics.read_jsonl(str(tmp_path / "tuned" / metrics.JSONL_NAME))
    evals = {r["step"]: v for r in records for k, v in r.items()
             if k == f"eval/{summary['task_name']}/loss"}
    assert set(evals) == {0, 8} and evals[8] < evals[0], evals
    tuned = checkpoints.restore_params(str(tmp_path / "tuned"), nnx.state(
        policy.make_module(nnx.Rngs(1))))
    start = checkpoints.restore_params(str(tmp_path / "policy"), tuned)
    assert not np.allclose(np.asarray(tuned["embed"]["embedding"][...]),
                           np.asarray(start["embed"]["embedding"][...]))
