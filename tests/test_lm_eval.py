"""The lm-evaluation-harness adapter (t5x_like/evaluation/lm_eval_adapter.py) on local
tasks that the test writes (YAML + JSONL in tmp, through lm-eval's TaskManager; nothing
from a hub), over a tiny causal LM trained for a few steps: its log-likelihoods equal our
own scorer's (`infer` mode "score", and Inference.score over bpc.py's windows for a text
longer than a row), its generations `infer`'s greedy predictions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import tasks  # noqa: E402,F401  (registers web_causal, the training data)
from t5x_like import launch  # noqa: E402
from t5x_like.data import vocabulary  # noqa: E402
from t5x_like.evaluation import bpc, evaluate, infer, lm_eval_adapter  # noqa: E402
from t5x_like.evaluation.predict import Inference  # noqa: E402
from t5x_like.model.decoding import DecodeConfig  # noqa: E402
from t5x_like.training import optimizers, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 64
EXPERIMENT = f"""include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu8_fsdp.gin'
import lm_eval_texts
MIXTURE_OR_TASK_NAME = 'lm_eval_texts'
TASK_FEATURE_LENGTHS = {{'targets': {LENGTH}}}
"""
PAIRS = [("The history of", " the city"), ("Water boils at", " one hundred degrees"),
         ("def add(a, b):", " return a + b"), ("In 1905 Einstein", " published")]
TEXTS = [c + t for c, t in PAIRS] + [c for c, _ in PAIRS]
LONG = " ".join(["The river runs to the sea and the sea runs to the rain."] * 6)

# lm-eval's local task files: a JSON-lines data file read by `datasets`' json builder.
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
test_split: validation
output_type: {output_type}
{body}"""
BODIES = {
    "t5x_ll": ("loglikelihood", "doc_to_text: \"{{context}}\"\n"
               "doc_to_target: \"{{continuation}}\"\nmetric_list:\n  - metric: acc\n"),
    "t5x_rolling": ("loglikelihood_rolling", "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                    "metric_list:\n  - metric: word_perplexity\n"),
    "t5x_gen": ("generate_until", "doc_to_text: \"{{context}}\"\n"
                "doc_to_target: \"{{continuation}}\"\ngeneration_kwargs:\n"
                "  until: [\"QQQ\"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n"),
}


TASK_MODULE = """import seqio
import tensorflow as tf
from t5x_like.data import vocabulary

TEXTS = {texts!r}
if "lm_eval_texts" not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        "lm_eval_texts",
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({{"targets": TEXTS}}),
            splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={{"targets": seqio.Feature(vocabulary.get_vocabulary(),
                                                   add_eos=False)}})
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama-style causal LM trained 3 steps on web_causal; its gin file."""
    directory = tmp_path_factory.mktemp("lm_eval")
    # The task our scorer reads: a module of the user's, imported by the gin file.
    (directory / "lm_eval_texts.py").write_text(TASK_MODULE.format(texts=TEXTS + [LONG]))
    sys.path.insert(0, str(directory))
    gin_file = directory / "experiment.gin"
    gin_file.write_text(EXPERIMENT)
    launch.parse_gin([str(gin_file)], [])
    model, mesh = launch.gin_macro("MODEL"), launch.gin_macro("MESH_CONFIG")
    data = train.DataConfig(mixture_or_task_name="web_causal",
                            task_feature_lengths={"targets": LENGTH}, batch_size=8,
                            data_workers=1, task_modules=("tasks",))
    train.train(model=model, mesh_config=mesh, data=data,
                optimizer=optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=1, total_steps=3),
                train_steps=3, model_dir=str(directory / "run"),
                evaluation=evaluate.EvalConfig(enabled=False), log_every_steps=3)
    for name, (output_type, body) in BODIES.items():
        rows = ([{"text": t} for t in TEXTS + [LONG]] if name == "t5x_rolling"
                else [{"context": c, "continuation": t} for c, t in PAIRS])
        data_file = directory / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(YAML.format(
            name=name, data=data_file, output_type=output_type, body=body))
    return directory, model, mesh


def _our_scores(directory, model, mesh, out):
    """`infer` mode "score" of TEXTS + [LONG] (the long text cut at LENGTH tokens)."""
    paths = infer.infer(model=model, mesh_config=mesh, mixture_or_task_name="lm_eval_texts",
                        task_feature_lengths={"targets": LENGTH},
                        checkpoint_path=str(directory / "run"), output_dir=str(out),
                        mode="score", batch_size=8)
    return [json.loads(line)["score"] for line in open(paths["lm_eval_texts"])]


def _responses(results, task):
    return [s["resps"][0][0] for s in sorted(results["samples"][task],
                                             key=lambda s: s["doc_id"])]


@pytest.mark.slow  # ~1-2 min: training, and the adapter's scoring and decoding compiled
def test_lm_eval_loglikelihoods_equal_our_scorer_and_generations_infers(run, tmp_path,
                                                                        monkeypatch):
    directory, model, mesh = run
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    vocab = vocabulary.get_vocabulary()
    for context, continuation in PAIRS:  # the split lm-eval makes: whole = context + rest
        whole = vocab.encode(context + continuation)
        assert whole[:len(vocab.encode(context))] == vocab.encode(context)
    args = f"checkpoint={directory / 'run'},gin_file={directory / 'experiment.gin'}"
    manager = TaskManager(include_path=str(directory))
    results = lm_eval.simple_evaluate(model="t5x_like", model_args=args,
                                      tasks=["t5x_ll", "t5x_rolling", "t5x_gen"],
                                      task_manager=manager, batch_size=8, log_samples=True)
    ours = _our_scores(directory, model, mesh, tmp_path / "infer")
    n = len(PAIRS)
    rolling = _responses(results, "t5x_rolling")
    np.testing.assert_allclose(rolling[:-1], ours[:-1], rtol=0, atol=1e-5)
    ll = [r[0] for r in _responses(results, "t5x_ll")]
    np.testing.assert_allclose(ll, np.subtract(ours[:n], ours[n:2 * n]), rtol=0, atol=1e-5)
    assert all(isinstance(r[1], bool) for r in _responses(results, "t5x_ll"))
    # The long text (more tokens than a row) in lm-eval's windows equals bpc.py's
    # windows of the same size (stride = window: each token scored once) through
    # Inference.score; and the row-sized start of it is infer's score.
    tokens = vocab.encode(LONG)
    assert len(tokens) > LENGTH
    lm = lm_eval_adapter.T5xLikeLM(checkpoint=str(directory / "run"),
                                   gin_file=str(directory / "experiment.gin"), max_length=16)
    inference, params = Inference.from_checkpoint(
        model, mesh, str(directory / "run"), DecodeConfig(eos_id=1, bos_id=0), 8)
    windows = bpc.BpcEval(tokens, total_chars=len(LONG), num_documents=1, window=16,
                          stride=16)
    expect = sum(float(np.sum(inference.score(params, b))) for b in windows.batches(8))
    got = lm.loglikelihood_rolling([_Request((LONG,))])[0]
    # 7 windows of ~140 nats, each summed in float32 (rows batched differently): 1e-6
    # of the total (the local tasks' texts above agree within 1e-5 absolute).
    assert got == pytest.approx(expect, rel=1e-6, abs=1e-5)
    assert rolling[-1] < ours[-1]  # the whole text scores below its first 64 tokens
    # is_greedy: true for the model's own greedy continuation, false once a token differs.
    prompt = vocab.encode(PAIRS[0][0])
    decoder, _, _ = lm._decoder({"max_gen_toks": 4})
    generated = [int(t) for t in decoder.predict(params, {
        "prompt": np.array([prompt] * 8, np.int32),
        "prompt_lengths": np.full(8, len(prompt), np.int32)})["tokens"][0]]
    generated = generated[:generated.index(1)] if 1 in generated else generated
    other = generated[:-1] + [(generated[-1] + 1) % 8000 + 2]
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, [0] + prompt, generated), (None, [0] + prompt, other)])
    assert generated and greedy and not not_greedy
    # generate_until: infer's greedy prediction of the same prompt, cut at 6 tokens.
    paths = infer.infer(model=model, mesh_config=mesh, mixture_or_task_name="lm_eval_texts",
                        task_feature_lengths={"targets": LENGTH},
                        checkpoint_path=str(directory / "run"),
                        output_dir=str(tmp_path / "prompts"), batch_size=8,
                        decode=DecodeConfig(max_decode_length=6),
                        prompts=[c for c, _ in PAIRS])
    predicted = [json.loads(line)["prediction"] for line in open(paths["prompts"])]
    assert _responses(results, "t5x_gen") == predicted


class _Request:
    def __init__(self, args):
        self.args = args


def test_rows_carry_segments_and_weights_so_token_zero_is_a_token():
    """score_rows: a row is the pair's tokens shifted by one, the continuation weighted,
    segment ids over every real position (id 0, Llama 3's "!", included), the longest
    first, cut from the left to max_length + 1 tokens, the batch padded with empty rows."""
    pairs = [([5, 0, 7], [0, 9]), ([5, 6, 7, 8, 9, 10], [0, 0, 11])]
    (batch, order), = lm_eval_adapter.score_rows(pairs, max_length=6, batch_size=4)
    assert order == [1, 0] and batch["decoder_input_tokens"].shape == (4, 6)
    # Pair 1 has 9 tokens: its last 7 make a row of 6 positions.
    np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(batch["decoder_target_tokens"][0], [8, 9, 10, 0, 0, 11])
    np.testing.assert_array_equal(batch["decoder_loss_weights"][0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch["decoder_segment_ids"][0], [1] * 6)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][1], [5, 0, 7, 0, 0, 0])
    np.testing.assert_array_equal(batch["decoder_target_tokens"][1], [0, 7, 0, 9, 0, 0])
    np.testing.assert_array_equal(batch["decoder_loss_weights"][1], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["decoder_segment_ids"][1], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["decoder_positions"][1], [0, 1, 2, 3, 0, 0])
    assert not batch["decoder_segment_ids"][2:].any()
    with pytest.raises(ValueError, match="Raise max_length"):
        lm_eval_adapter.score_rows([([1], list(range(2, 10)))], max_length=6, batch_size=4)


def test_bad_model_args_are_one_paragraph_and_nothing_runs(tmp_path):
    """Before any device or checkpoint is touched: a missing argument, an unknown one,
    and an encoder-decoder model each say what to do."""
    with pytest.raises(ValueError, match="checkpoint and gin_file are required"):
        lm_eval_adapter.T5xLikeLM(gin_file="x.gin")
    with pytest.raises(ValueError, match="unknown: temperature"):
        lm_eval_adapter.T5xLikeLM(checkpoint="c", gin_file="x.gin", temperature=1)
    gin_file = tmp_path / "encdec.gin"
    gin_file.write_text("include 'experiments/demo_encdec_ul2.gin'\n")
    with pytest.raises(ValueError, match="encoder-decoder.*decoder-only causal"):
        lm_eval_adapter.T5xLikeLM(checkpoint=str(tmp_path / "none"), gin_file=str(gin_file))
    assert not (tmp_path / "none").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _logged(out):
    """{task: [each doc's log-likelihood]} of lm_eval's --log_samples files under `out`
    (which write a response's numbers as strings)."""
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        found[task] = [float(np.ravel(r["resps"][0][0])[0])
                       for r in sorted(rows, key=lambda r: r["doc_id"])]
    return found


@pytest.mark.slow  # ~2 min: three more processes compile the scoring
def test_the_command_line_runs_lm_eval_with_the_model_in_one_or_two_processes(run, tmp_path):
    """`python -m t5x_like.lm_eval` is lm_eval's CLI with the model registered, on the
    local tasks through --include_path; two processes on localhost (4 CPU devices each,
    our --coordinator_address flags) give one process's numbers and write them once; a
    bad argument is one paragraph, exit 2."""
    directory, _, _ = run
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")])}
    args = f"checkpoint={directory / 'run'},gin_file={directory / 'experiment.gin'}"
    command = [sys.executable, "-m", "t5x_like.lm_eval", "--model", "t5x_like",
               "--model_args", args, "--tasks", "t5x_ll,t5x_rolling", "--include_path",
               str(directory), "--batch_size", "8", "--log_samples"]
    done = subprocess.run(command + ["--output_path", str(tmp_path / "one")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((tmp_path / "one").rglob("results_*.json"))
    assert len(written) == 1
    assert {"t5x_ll", "t5x_rolling"} <= set(json.loads(written[0].read_text())["results"])
    one = _logged(tmp_path / "one")
    assert len(one["t5x_ll"]) == len(PAIRS) and len(one["t5x_rolling"]) == len(TEXTS) + 1

    two_env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
    two_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    port = _free_port()
    procs = [subprocess.Popen(
        command + ["--output_path", str(tmp_path / "two"),
                   f"--coordinator_address=localhost:{port}", "--process_count=2",
                   f"--process_index={i}"],
        cwd=REPO, env=two_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert len(list((tmp_path / "two").rglob("results_*.json"))) == 1  # process 0's
    two = _logged(tmp_path / "two")
    np.testing.assert_allclose(two["t5x_ll"], one["t5x_ll"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two["t5x_rolling"], one["t5x_rolling"], rtol=0, atol=1e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "t5x_like.lm_eval", "--model", "t5x_like", "--model_args",
         f"checkpoint={directory / 'run'}", "--tasks", "t5x_ll", "--include_path",
         str(directory)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "checkpoint and gin_file are required" in bad.stderr
