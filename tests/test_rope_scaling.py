"""RoPE scaling (TransformerConfig.rope_scaling: 'linear', Llama 3.1's 'llama3', 'yarn'):
the frequencies against the formulas by hand, the config's checks, Hugging Face parity
past the original context without torch (golden files of tiny random Llamas whose
original context is 32 tokens, run on 96: tests/golden/hf/rope_*, made by
make_golden.py there), and import / export / gin / run identity keeping the scaling.

tests/test_hf_live.py checks the same parity against transformers itself where it is
installed.
"""
import copy
import json
import math

import gin
import numpy as np
import pytest
from flax import nnx
from hf_common import ATOL, LLAMA_CONFIG, ROPE_ORIGINAL_LENGTH, ROPE_SCALINGS, max_diff
from test_hf import golden, greedy_tokens, tensors
from tiny import jit_apply, random_tokens, strict_rank_promotion, tiny_config  # noqa: F401

from t5x_like.interop import hf
from t5x_like.model import flops, layers

KINDS = list(ROPE_SCALINGS)
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _scaling(kind):
    return layers.RopeScaling(**ROPE_SCALINGS[kind]["rope_scaling"])


# ------------------------------------------------------------------------------ frequencies


def test_llama31_frequencies_match_the_formula_by_hand_in_each_band():
    """Llama 3.1 8B's RoPE (head_dim 128, theta 500,000), one index per band of Meta's
    apply_scaling, each computed here with scalar math."""
    scaling = layers.RopeScaling(**LLAMA31)
    inv_freq, attention_factor = layers.rope_frequencies(128, 500_000.0, scaling)
    assert inv_freq.shape == (64,) and inv_freq.dtype == np.float32 and attention_factor == 1.0
    bands = {}
    for i in (0, 10, 28, 30, 34, 40, 63):
        base = 500_000.0 ** (-2 * i / 128)
        wavelen = 2 * math.pi / base
        if wavelen < 8192 / 4.0:  # high frequency: kept
            band, expected = "kept", base
        elif wavelen > 8192 / 1.0:  # low frequency: divided by the factor
            band, expected = "divided", base / 8.0
        else:  # between: interpolated by how many turns fit in the original context
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            band, expected = "smoothed", (1 - smooth) * base / 8.0 + smooth * base
        bands.setdefault(band, []).append(i)
        assert inv_freq[i] == pytest.approx(expected, rel=1e-6), (i, band)
    assert bands == {"kept": [0, 10, 28], "smoothed": [30, 34], "divided": [40, 63]}
    plain, _ = layers.rope_frequencies(128, 500_000.0)
    assert inv_freq[0] == plain[0] and inv_freq[63] == pytest.approx(plain[63] / 8, rel=1e-6)


def test_linear_and_yarn_frequencies_by_hand():
    theta, k = 10_000.0, 16
    plain, _ = layers.rope_frequencies(k, theta)
    np.testing.assert_array_equal(plain, np.float32(
        [theta ** (-2 * i / k) for i in range(k // 2)]))
    linear, factor = layers.rope_frequencies(k, theta, _scaling("linear"))
    np.testing.assert_allclose(linear, plain / 4.0, rtol=1e-6)
    assert factor == 1.0
    # yarn, factor 4 over 32 positions: the ramp runs from floor(dim of 32 turns) = 0 to
    # ceil(dim of 1 turn) = 2; dims below it keep their frequency, above are divided.
    yarn, factor = layers.rope_frequencies(k, theta, _scaling("yarn"))
    high = k * math.log(32 / (1 * 2 * math.pi)) / (2 * math.log(theta))
    assert (math.floor(k * math.log(32 / (32 * 2 * math.pi)) / (2 * math.log(theta))),
            math.ceil(high)) == (-2, 2)
    assert yarn[0] == pytest.approx(plain[0], rel=1e-6)  # ramp 0: extrapolated
    assert yarn[1] == pytest.approx(0.5 * plain[1] / 4 + 0.5 * plain[1], rel=1e-6)  # ramp 1/2
    np.testing.assert_allclose(yarn[2:], plain[2:] / 4, rtol=1e-6)  # interpolated
    assert factor == pytest.approx(0.1 * math.log(4) + 1)
    # mscale / mscale_all_dim (DeepSeek's form) and an explicit attention factor.
    both = layers.RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                              mscale=1.0, mscale_all_dim=0.5)
    assert layers.rope_frequencies(k, theta, both)[1] == pytest.approx(
        (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    given = layers.RopeScaling(rope_type="yarn", factor=4.0, attention_factor=1.5,
                               original_max_position_embeddings=32)
    assert layers.rope_frequencies(k, theta, given)[1] == 1.5


def test_scaled_rotation_is_the_plain_rotation_at_scaled_positions():
    """Linear scaling by 4 at position p is plain RoPE at p/4; yarn's attention factor
    scales the vector's norm; position 0 is the identity (times that factor)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 16)).astype(np.float32)
    positions = np.asarray([[0, 40, 92]])
    scaled = layers.apply_rope(x, positions, 1e4, _scaling("linear"))
    plain = layers.apply_rope(x, positions / 4, 1e4)
    assert max_diff(scaled, plain) < 1e-5 and max_diff(scaled[:, 0], x[:, 0]) < 1e-6
    _, factor = layers.rope_frequencies(16, 1e4, _scaling("yarn"))
    yarn = np.asarray(layers.apply_rope(x, positions, 1e4, _scaling("yarn")))
    np.testing.assert_allclose(np.linalg.norm(yarn, axis=-1),
                               factor * np.linalg.norm(x, axis=-1), rtol=1e-5)


# ------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("fields, words", [
    ({"rope_type": "dynamic", "factor": 2.0}, ["rope_type='dynamic' is not supported"]),
    ({"rope_type": "linear", "factor": 0.0}, ["'factor': 0.0", "> 0"]),
    ({"rope_type": "linear", "factor": -2}, ["'factor': -2", "> 0"]),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
     ["needs ['original_max_position_embeddings', 'high_freq_factor']"]),
    ({"rope_type": "yarn"}, ["needs ['factor', 'original_max_position_embeddings']"]),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0},
     ["'linear' does not read ['low_freq_factor']"]),
    ({**LLAMA31, "high_freq_factor": 1.0}, ["must exceed low_freq_factor"]),
    ({"rope_type": "linear", "factor": 2.0, "scale": 3}, ["unknown keys ['scale']"]),
    ("llama3", ["expected a dict of RopeScaling fields"]),
])
def test_bad_scalings_are_one_paragraph_naming_the_choices(fields, words):
    with pytest.raises(ValueError) as err:
        tiny_config(rope_scaling=fields)
    text = str(err.value)
    assert all(w in text for w in words), text
    assert "\n" not in text and "'linear'" in text and "'llama3'" in text and "'yarn'" in text


def test_gin_dict_and_configurable_forms_are_one_hashable_config():
    gin.clear_config()
    try:
        gin.parse_config("\n".join([
            "from __gin__ import dynamic_registration",
            "from t5x_like.model import layers",
            f"A = {LLAMA31!r}",
            "B = @layers.RopeScaling()",
            "layers.RopeScaling.rope_type = 'llama3'", "layers.RopeScaling.factor = 8",
            "layers.RopeScaling.low_freq_factor = 1.0", "layers.RopeScaling.high_freq_factor = 4",
            "layers.RopeScaling.original_max_position_embeddings = 8192"]))
        from_dict = tiny_config(rope_scaling=gin.query_parameter("%A"))
        built = gin.query_parameter("B/macro.value").scoped_configurable_fn()
    finally:
        gin.clear_config()
    from_class = tiny_config(rope_scaling=built)
    assert from_dict == from_class and hash(from_dict) == hash(from_class)
    assert from_dict.rope_scaling.as_dict() == LLAMA31
    assert from_dict != tiny_config() and {from_dict: 1}[from_class] == 1


def test_the_scaling_is_part_of_the_runs_identity_and_not_of_the_flops():
    from t5x_like.model import families
    from t5x_like.training import guards, optimizers, train

    data = train.DataConfig("code_causal", {"targets": 64}, 8, stream_shards=2)
    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=1, total_steps=6)

    def identity(**changes):
        model = families.DecoderOnlyModel(tiny_config(**changes))
        return train._run_identity(model, data, optimizer, 6, 1, 0)

    plain, scaled = identity(), identity(rope_scaling=LLAMA31)
    assert scaled["model"]["rope_scaling"] == {**dict.fromkeys(
        f.name for f in layers.dataclasses.fields(layers.RopeScaling)), **LLAMA31}
    assert json.loads(json.dumps(scaled)) == scaled  # stored as JSON in the checkpoint
    guards.check_resume(json.loads(json.dumps(scaled)), scaled)
    with pytest.raises(ValueError, match="model.rope_scaling: checkpoint None"):
        guards.check_resume(json.loads(json.dumps(plain)), scaled)
    saved_before_scaling = copy.deepcopy(plain)
    del saved_before_scaling["model"]["rope_scaling"]  # a checkpoint from before the field
    guards.check_resume(saved_before_scaling, plain)
    # FLOPs: the rotation is elementwise, so the planner's numbers do not move.
    assert flops.decoder_only_flops_per_token(tiny_config(rope_scaling=LLAMA31), 96) == (
        flops.decoder_only_flops_per_token(tiny_config(), 96))


# ------------------------------------------------------------------------------ HF parity


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_32_greedy_tokens_match_transformers_past_the_original_context(kind):
    """transformers' logits on 96 tokens and its greedy continuation of a 64-token prompt
    (positions 64-95, 2-3x the original 32), from the golden files."""
    directory, ref = golden(f"rope_{kind}")
    model, module = hf.load(directory, dtype="float32")
    assert model.cfg.rope_scaling == _scaling(kind)
    assert ref["tokens"].shape[1] == 3 * ROPE_ORIGINAL_LENGTH
    logits = jit_apply(module)(ref["tokens"])
    diff = max_diff(logits, ref["logits"])
    assert diff < ATOL, f"max |ours - transformers'| logit difference {diff:.3g}"
    expected = ref["generated"]
    assert expected.shape == (2, 32) and ref["prompt"].shape == (2, 2 * ROPE_ORIGINAL_LENGTH)
    assert len(set(expected[0].tolist())) > 3  # not a constant sequence
    np.testing.assert_array_equal(greedy_tokens(model, module, ref["prompt"]), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_scaling_the_logits_differ(kind):
    """The same weights with plain RoPE are far from transformers' logits past position
    32: the parity above is a test of the scaling."""
    directory, ref = golden(f"rope_{kind}")
    model, module = hf.load(directory, dtype="float32")
    plain = layers.dataclasses.replace(model.cfg, rope_scaling=None)
    plain_model = type(model)(plain)
    plain_module = nnx.eval_shape(plain_model.make_module)
    nnx.update(plain_module, nnx.state(module, nnx.Param))
    diff = max_diff(jit_apply(plain_module)(ref["tokens"]), ref["logits"])
    assert diff > 0.1, diff


def test_v4_rope_scaling_and_v5_rope_parameters_read_alike():
    directory, _ = golden("rope_llama3")
    v5 = json.loads((directory / hf.CONFIG_FILE).read_text())
    params = dict(v5["rope_parameters"])
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"},
          "rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert hf.config_from_hf(v4) == hf.config_from_hf(v5)
    legacy = {**v4, "rope_scaling": {"type": "linear", "factor": 4}}  # transformers < 4.45
    assert hf.config_from_hf(legacy).rope_scaling == _scaling("linear")
    # transformers' fallback: llama3 / yarn without original_max_position_embeddings use
    # max_position_embeddings.
    bare = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
    assert hf.config_from_hf({**v4, "rope_scaling": bare, "max_position_embeddings": 77}
                             ).rope_scaling.original_max_position_embeddings == 77


@pytest.mark.parametrize("config_changes, words", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     ["rope_scaling.rope_type='dynamic'"]),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
     ["rope_parameters.rope_type='longrope'"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     ["rope_scaling=", "needs ['high_freq_factor']"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, ["'factor': 0", "> 0"]),
])
def test_import_refuses_a_scaling_we_do_not_compute_and_writes_nothing(
        tmp_path, config_changes, words):
    source, _ = golden("rope_llama3")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {**json.loads((source / hf.CONFIG_FILE).read_text()), **config_changes}
    if config.get("rope_scaling"):  # the v4 form: rope_scaling beside a top-level theta
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (hf_dir / hf.CONFIG_FILE).write_text(json.dumps(config))
    (hf_dir / hf.SAFETENSORS_FILE).write_bytes((source / hf.SAFETENSORS_FILE).read_bytes())
    with pytest.raises(ValueError) as err:
        hf.import_hf(hf_dir, tmp_path / "ckpt", gin_out=tmp_path / "model.gin")
    text = str(err.value)
    assert all(w in text for w in words), text
    assert "'linear'" in text and "'llama3'" in text and "'yarn'" in text and "\n" not in text
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model.gin").exists()


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", hf.CONFIG_FORMS)
def test_export_of_an_imported_scaled_model_keeps_the_scaling(tmp_path, kind, form):
    source, _ = golden(f"rope_{kind}")
    model, module = hf.load(source, dtype="float32")
    hf.write_hf(tmp_path, model.cfg, nnx.state(module, nnx.Param), config_form=form)
    original = json.loads((source / hf.CONFIG_FILE).read_text())["rope_parameters"]
    config = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    if form == "v4":
        written = {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
        assert "rope_parameters" not in config
    else:
        written = config["rope_parameters"]
        assert "rope_scaling" not in config and "rope_theta" not in config
    assert written == original
    # original × factor for llama3 (32 × 8) and yarn (32 × 4); else 8192
    assert config["max_position_embeddings"] == {"llama3": 256, "linear": 8192, "yarn": 128}[kind]
    assert hf.config_from_hf(config, dtype="float32") == model.cfg
    golden_tensors, exported = tensors(source), tensors(tmp_path)
    for name, value in golden_tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_export_refuses_an_unknown_config_form(tmp_path):
    source, _ = golden("rope_yarn")
    model, module = hf.load(source, dtype="float32")
    with pytest.raises(ValueError, match=r"config_form='v6' is not one of \('v4', 'v5'\)"):
        hf.write_hf(tmp_path / "out", model.cfg, nnx.state(module, nnx.Param),
                    config_form="v6")
    assert not (tmp_path / "out").exists()


def test_import_writes_the_scaling_into_the_gin_and_export_reads_it_back(tmp_path):
    """import_hf -> params checkpoint + model gin file; the gin (as `export --gin_file`
    parses it) builds the same config, and export_hf writes the same scaling."""
    from t5x_like import launch

    source, ref = golden("rope_yarn")
    cfg = hf.import_hf(source, tmp_path / "ckpt", dtype="float32",
                       gin_out=tmp_path / "model.gin")
    text = (tmp_path / "model.gin").read_text()
    assert ("layers.TransformerConfig.rope_scaling = {'rope_type': 'yarn', 'factor': 4.0, "
            "'original_max_position_embeddings': 32}") in text
    gin.clear_config()
    try:
        launch.parse_gin([str(tmp_path / "model.gin")], [])
        parsed = launch.gin_macro("MODEL_CONFIG")
    finally:
        gin.clear_config()
    assert parsed == cfg and parsed.rope_scaling == _scaling("yarn")
    hf.export_hf(parsed, tmp_path / "ckpt", tmp_path / "out")
    config = json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())
    assert config["rope_scaling"] == ROPE_SCALINGS["yarn"]["rope_scaling"]
    _, module = hf.load(tmp_path / "out", dtype="float32")
    assert max_diff(jit_apply(module)(ref["tokens"]), ref["logits"]) < ATOL


def test_llama31_config_imports():
    """A config.json of Llama 3.1's form (v4 rope_scaling; the sizes of hf_common)."""
    cfg = hf.config_from_hf({**LLAMA_CONFIG, "rope_scaling": LLAMA31,
                             "max_position_embeddings": 131072})
    assert cfg.rope_scaling.as_dict() == LLAMA31 and cfg.rope_theta == 5e5
    assert hf.hf_config_for(cfg)["rope_scaling"] == LLAMA31


@pytest.mark.slow
def test_import_and_export_commands_carry_the_scaling(tmp_path):
    """`python -m t5x_like.hf import` then `export --config_form=v5`: the published
    rope_parameters come back as transformers 5 wrote them, the tensors bitwise."""
    from test_hf import _run_cli

    source, _ = golden("rope_llama3")
    ckpt, gin_file, out = tmp_path / "ckpt", tmp_path / "model.gin", tmp_path / "out"
    _run_cli("import", f"--hf_dir={source}", f"--out={ckpt}", f"--gin_out={gin_file}",
             "--dtype=float32")
    assert "'rope_type': 'llama3'" in gin_file.read_text()
    _run_cli("export", f"--gin_file={gin_file}", f"--checkpoint={ckpt}", f"--out={out}",
             "--config_form=v5", "--max_position_embeddings=128")
    original = json.loads((source / hf.CONFIG_FILE).read_text())
    exported = json.loads((out / hf.CONFIG_FILE).read_text())
    assert exported["rope_parameters"] == original["rope_parameters"]
    assert exported["max_position_embeddings"] == original["max_position_embeddings"] == 128
    written = tensors(out)
    for name, value in tensors(source).items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_the_import_command_prints_one_paragraph_for_an_unsupported_scaling(tmp_path, capsys):
    source, _ = golden("rope_linear")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = json.loads((source / hf.CONFIG_FILE).read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "dynamic"}
    (hf_dir / hf.CONFIG_FILE).write_text(json.dumps(config))
    (hf_dir / hf.SAFETENSORS_FILE).write_bytes((source / hf.SAFETENSORS_FILE).read_bytes())
    with pytest.raises(SystemExit) as exit_:
        hf.main(["import", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'ckpt'}",
                 f"--gin_out={tmp_path / 'model.gin'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m t5x_like.hf: error: config.json: "
                          "rope_parameters.rope_type='dynamic' is not supported")
    assert "'llama3'" in err and "'yarn'" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model.gin").exists()
