"""Hugging Face Llama-family weights in and out: `python -m t5x_like.hf import|export`.

Import reads a folder as `save_pretrained` writes it (`config.json` and
`model.safetensors`, or shards listed in `model.safetensors.index.json`), derives the
`TransformerConfig`, maps every tensor into our parameter layout and writes a
params-only checkpoint (checkpoints.save_params) plus a model gin file. Export does the
reverse for a decoder-only, sequential, SwiGLU model, loadable by
`transformers.LlamaForCausalLM.from_pretrained`.

The tensor mapping is one table (`_GLOBAL`, `_LAYER` below), used in both directions;
docs/MODELS.md shows it with the config mapping, the RoPE conventions and what is
refused. In short: our RoPE and Hugging Face's are both half-split, so HF weights need
no permutation (Meta's original interleaved checkpoints need
`interleaved_to_half_split` on wq/wk); HF's tied logits are x·Eᵀ, ours x·Eᵀ/√D unless
`scale_tied_logits=False` (import sets it; export writes a scaled tied model untied,
head E/√D); RoPE scaling ('linear', Llama 3.1's 'llama3', 'yarn') goes both ways as
`TransformerConfig.rope_scaling`; import refuses, naming the option, whatever our network
would compute differently (other RoPE scalings, biases, sliding windows, non-silu
activations), and export refuses what Llama cannot express.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx

from t5x_like import launch
from t5x_like.model import layers, partitioning
from t5x_like.model.families import DecoderOnlyModel
from t5x_like.model.layers import RopeScaling, TransformerConfig
from t5x_like.training import checkpoints

log = logging.getLogger("t5x_like.interop.hf")

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Hugging Face's default shard size in transformers 4.x; above it export writes shards.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_HF_FAMILIES = ("llama", "mistral")
# Buffers that older HF Llama saves include and that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------
# RoPE conventions


def interleaved_to_half_split(x_K):
    """Permutes the last (head-dim) axis from interleaved RoPE pairs (Meta's original
    checkpoints: (x[2j], x[2j+1])) to half-split pairs ((x[j], x[j+K/2]): ours and HF's).

    Apply to wq [D, H, K] and wk [D, G, K] of interleaved-convention weights; q·k is
    then the same (tests/test_hf.py). numpy or jax arrays.
    """
    *lead, k = x_K.shape
    return x_K.reshape(*lead, k // 2, 2).swapaxes(-1, -2).reshape(*lead, k)


def half_split_to_interleaved(x_K):
    """The inverse of `interleaved_to_half_split`."""
    *lead, k = x_K.shape
    return x_K.reshape(*lead, 2, k // 2).swapaxes(-1, -2).reshape(*lead, k)


# ---------------------------------------------------------------------------
# config.json <-> TransformerConfig


def _refuse(option: str, value: Any, why: str) -> None:
    raise ValueError(f"config.json: {option}={value!r} is not supported: {why} Use a model "
                     "without it, or convert it yourself knowing the outputs will differ.")


def _check_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of v4's top-level `rope_theta` + `rope_scaling` or v5's
    `rope_parameters`; a scaling type we do not compute is refused by name, with ours."""
    scaling = hf.get("rope_scaling") or None
    where, params = ("rope_scaling", scaling) if scaling else (
        "rope_parameters", hf.get("rope_parameters") or {})
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        _refuse("partial_rotary_factor", factor, "our RoPE rotates the whole head.")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in layers.ROPE_SCALING_TYPES:
        _refuse(f"{where}.rope_type", kind, f"the RoPE scalings we compute are "
                f"{layers.ROPE_SCALING_CHOICES}; {kind!r} would rotate positions unlike the "
                "published model ('dynamic' and 'longrope' change with the sequence length).")
    required, optional = layers.ROPE_SCALING_TYPES[kind]
    fields = {name: params.get(name) for name in ("factor", *required, *optional)}
    if "original_max_position_embeddings" in required and fields[
            "original_max_position_embeddings"] is None:  # transformers' fallback
        fields["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    problem = layers.rope_scaling_problem({"rope_type": kind, **fields})
    if problem:
        raise ValueError(f"config.json: {where}={dict(params)!r} cannot be read: {problem}. "
                         f"The RoPE scalings we compute are {layers.ROPE_SCALING_CHOICES}; "
                         "transformers would refuse or misread this config too.")
    return theta, RopeScaling(rope_type=kind, **{k: v for k, v in fields.items()
                                                 if v is not None})


def _check_supported(hf: Mapping[str, Any]) -> None:
    model_type = hf.get("model_type")
    if model_type not in _HF_FAMILIES:
        _refuse("model_type", model_type, f"expected one of {_HF_FAMILIES} (Llama's network).")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "our Llama MLP is SwiGLU (a silu gate).")
    for option in ("attention_bias", "mlp_bias"):
        if hf.get(option):
            _refuse(option, hf[option], "our attention and MLP have no biases.")
    if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
        _refuse("sliding_window", hf.get("sliding_window"), "our attention is global.")
    kinds = set(hf.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        _refuse("layer_types", sorted(kinds), "every layer of ours is full attention.")
    if hf.get("attention_dropout", 0.0):
        _refuse("attention_dropout", hf["attention_dropout"], "our attention has no dropout.")


def _required(hf: Mapping[str, Any], key: str) -> int:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}; a save_pretrained config of a Llama "
                         "model always has it. Is this the model's own config.json?")
    return int(hf[key])


def config_from_hf(hf: Mapping[str, Any], *, dtype: str | None = None,
                   scan_layers: bool = True) -> TransformerConfig:
    """The TransformerConfig of a Llama (or mistral) `config.json`, or a ValueError naming
    the first option we cannot express.

    Defaults for absent keys are transformers' LlamaConfig defaults (rms_norm_eps 1e-6,
    rope_theta 10,000, untied). `dtype` is the compute dtype; default: the dtype the
    weights were published in (`dtype`, or `torch_dtype` before transformers 5).
    """
    _check_supported(hf)
    rope_theta, rope_scaling = _check_rope(hf)
    num_heads = _required(hf, "num_attention_heads")
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return TransformerConfig(
        vocab_size=_required(hf, "vocab_size"),
        emb_dim=_required(hf, "hidden_size"),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or _required(hf, "hidden_size") // num_heads),
        mlp_dim=_required(hf, "intermediate_size"),
        num_decoder_layers=_required(hf, "num_hidden_layers"),
        num_encoder_layers=0,
        block="sequential",
        mlp_activation="swiglu",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        scale_tied_logits=False,  # HF's tied logits are x·Eᵀ.
        dtype=str(dtype),
        scan_layers=scan_layers,
        z_loss=0.0,  # Llama trains without z-loss.
    )


def check_exportable(cfg: TransformerConfig) -> None:
    """Raises ValueError unless `cfg` is a network LlamaForCausalLM computes."""
    if cfg.is_encoder_decoder:
        raise ValueError(f"num_encoder_layers={cfg.num_encoder_layers}: an encoder-decoder "
                         "has no Llama form; only decoder-only models export.")
    if cfg.block != "sequential":
        raise ValueError(f"block={cfg.block!r}: Llama layers are sequential (attention, then "
                         "MLP, each with its own norm); a parallel (PaLM) block has no Llama form.")
    if cfg.mlp_activation != "swiglu":
        raise ValueError(f"mlp_activation={cfg.mlp_activation!r}: Llama's MLP is SwiGLU; "
                         "only swiglu models export.")


def _untied_export(cfg: TransformerConfig) -> bool:
    """A scaled tied model exports untied (head E/√D): HF's tied logits are unscaled."""
    return cfg.tie_embeddings and cfg.scale_tied_logits


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _our_token_ids() -> dict[str, int | None]:
    """t5x_like's vocabulary's special ids (pad 0, EOS 1, no BOS). Imported here, not at
    the top: vocabulary pulls in seqio and TensorFlow, half of the commands' start-up."""
    from t5x_like.data import vocabulary

    return {"bos_token_id": None, "eos_token_id": vocabulary.EOS_ID,
            "pad_token_id": vocabulary.PAD_ID}


def hf_config_for(cfg: TransformerConfig, *, dtype: str = "float32",
                  max_position_embeddings: int | None = None, config_form: str = "v4",
                  token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """config.json of `cfg` as LlamaForCausalLM, in the form every transformers release
    reads (top-level rope_theta; transformers 5 turns it into rope_parameters).

    `token_ids` ({bos,eos,pad}_token_id: int or None) override t5x_like's vocabulary's
    ids; pass the tokenizer's for an imported model (Llama 3: bos 128000, eos 128001,
    pad None). `max_position_embeddings` is not part of our model (RoPE has no length
    limit); HF sizes caches by it. Default: original_max_position_embeddings × factor
    of a llama3 or yarn scaling (what yarn's factor implies), else 8192. `config_form`:
    how RoPE is written (_rope_config: 'v4', read by every release, or 'v5').
    """
    check_exportable(cfg)
    token_ids = dict(token_ids or {})
    unknown = set(token_ids) - set(TOKEN_ID_FIELDS)
    if unknown:
        raise ValueError(f"token_ids has {sorted(unknown)}; expected keys of {TOKEN_ID_FIELDS}.")
    if len(token_ids) < len(TOKEN_ID_FIELDS):
        token_ids = {**_our_token_ids(), **token_ids}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_decoder_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings or _default_max_positions(cfg),
        "rms_norm_eps": cfg.norm_eps, **_rope_config(cfg, config_form), "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings and not _untied_export(cfg),
        "torch_dtype": dtype, **token_ids,
    }


CONFIG_FORMS = ("v4", "v5")


def _rope_config(cfg: TransformerConfig, form: str) -> dict[str, Any]:
    """config.json's RoPE keys: 'v4', top-level rope_theta and `rope_scaling` (None or
    {rope_type, factor, ...}: every transformers release reads it, 5 converts it), or
    'v5', `rope_parameters` ({rope_type ('default' unscaled), ..., rope_theta}: what
    transformers 5 writes; 4 does not read it)."""
    scaling = cfg.rope_scaling.as_dict() if cfg.rope_scaling else None
    if form == "v4":
        return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}
    if form == "v5":
        return {"rope_parameters": {**(scaling or {"rope_type": "default"}),
                                    "rope_theta": cfg.rope_theta}}
    raise ValueError(f"config_form={form!r} is not one of {CONFIG_FORMS}: 'v4' writes "
                     "rope_theta and rope_scaling (every transformers release reads them), "
                     "'v5' writes rope_parameters (transformers 5 and later).")


def _default_max_positions(cfg: TransformerConfig) -> int:
    scaling = cfg.rope_scaling
    if scaling and scaling.original_max_position_embeddings:
        return round(scaling.original_max_position_embeddings * scaling.factor)
    return 8192


def _gin_value(value: Any) -> str:
    """A config field as gin reads it back (a RopeScaling as the dict of its set fields)."""
    return repr(value.as_dict() if isinstance(value, RopeScaling) else value)


def model_gin_text(cfg: TransformerConfig, source: str) -> str:
    """A model gin file binding MODEL and MODEL_CONFIG to `cfg`, every field spelt out
    (the form of gin_configs/models/*.gin), to include in experiments."""
    lines = [f"# Imported from {source} by `python -m t5x_like.hf import`.",
             "from __gin__ import dynamic_registration",
             "from t5x_like.model import families", "from t5x_like.model import layers", "",
             "MODEL = @families.DecoderOnlyModel()",
             "families.DecoderOnlyModel.cfg = %MODEL_CONFIG", "",
             "MODEL_CONFIG = @layers.TransformerConfig()"]
    lines += [f"layers.TransformerConfig.{f.name} = {_gin_value(getattr(cfg, f.name))}"
              for f in dataclasses.fields(cfg)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Tensor layouts: one table, used in both directions


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one HF tensor relates to ours (per layer: without the stacked layer axis)."""

    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (HF array, our shape)
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # of our shape


_SAME = _Layout(lambda w, _: w, lambda w: w, lambda s: s)
_TRANSPOSE = _Layout(lambda w, _: w.T, lambda w: w.T, lambda s: s[::-1])
# q/k/v projections: HF [n·K, D] (nn.Linear is [out, in]) <-> ours [D, n, K].
_HEADS_IN = _Layout(lambda w, s: w.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
                    lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0]),
                    lambda s: (s[1] * s[2], s[0]))
# output projection: HF [D, H·K] <-> ours [H, K, D].
_HEADS_OUT = _Layout(lambda w, s: w.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
                     lambda w: w.transpose(2, 0, 1).reshape(w.shape[2], -1),
                     lambda s: (s[2], s[0] * s[1]))

_GLOBAL = {
    ("embed", "embedding"): ("model.embed_tokens.weight", _SAME),
    ("output", "final_norm", "scale"): ("model.norm.weight", _SAME),
    ("output", "lm_head", "kernel"): ("lm_head.weight", _TRANSPOSE),
}
_LAYER = {
    ("self_attention", "wq"): ("self_attn.q_proj.weight", _HEADS_IN),
    ("self_attention", "wk"): ("self_attn.k_proj.weight", _HEADS_IN),
    ("self_attention", "wv"): ("self_attn.v_proj.weight", _HEADS_IN),
    ("self_attention", "wo"): ("self_attn.o_proj.weight", _HEADS_OUT),
    ("mlp", "wi_0"): ("mlp.gate_proj.weight", _TRANSPOSE),
    ("mlp", "wi_1"): ("mlp.up_proj.weight", _TRANSPOSE),
    ("mlp", "wo"): ("mlp.down_proj.weight", _TRANSPOSE),
    ("pre_self_attention_norm", "scale"): ("input_layernorm.weight", _SAME),
    ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", _SAME),
}
_LAYERS_PATH = ("decoder", "layers")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One HF tensor and where it lives in our params: `path` (a flat-state path),
    `layer` (index into the stacked axis of a scanned parameter, else None)."""

    hf_name: str
    path: tuple[Any, ...]
    layer: int | None
    layout: _Layout


def _slots(cfg: TransformerConfig, params_shapes: Mapping[tuple, tuple[int, ...]]
           ) -> Iterator[tuple[_Slot, tuple[int, ...]]]:
    """(slot, our per-layer shape) for every parameter of a Llama-form model, in HF's
    order: embedding, layers 0..N-1, final norm, head (absent when tied)."""
    def global_slot(path):
        name, layout = _GLOBAL[path]
        return _Slot(name, path, None, layout), params_shapes[path]

    embed, *tail = _GLOBAL
    yield global_slot(embed)
    for i in range(cfg.num_decoder_layers):
        for suffix, (name, layout) in _LAYER.items():
            hf_name = f"model.layers.{i}.{name}"
            if cfg.scan_layers:  # one stacked parameter: layer i is index i of axis 0
                path = _LAYERS_PATH + suffix
                yield _Slot(hf_name, path, i, layout), params_shapes[path][1:]
            else:
                path = _LAYERS_PATH + (i,) + suffix
                yield _Slot(hf_name, path, None, layout), params_shapes[path]
    yield from (global_slot(path) for path in tail if path in params_shapes)


def _flat_params(cfg: TransformerConfig) -> dict[tuple, Any]:
    """{flat path: abstract Param} of cfg's module, checked to be the Llama form."""
    check_exportable(cfg)
    flat = dict(nnx.to_flat_state(partitioning.abstract_params(
        DecoderOnlyModel(cfg).make_module)))
    known = set(_GLOBAL) | {_LAYERS_PATH + s for s in _LAYER}
    unknown = [p for p in flat
               if (p[:2] + p[3:] if not cfg.scan_layers and p[:2] == _LAYERS_PATH else p)
               not in known]
    if unknown:  # a layer kind this table does not know: say so rather than drop it
        raise ValueError(f"parameters {unknown} have no Hugging Face counterpart in hf.py's "
                         "table; add them to _GLOBAL / _LAYER.")
    return flat


# ---------------------------------------------------------------------------
# Reading save_pretrained folders


class HfWeights:
    """The tensors of a save_pretrained folder: one model.safetensors or shards listed in
    model.safetensors.index.json. Tensors are read one at a time (memory-mapped)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = epath.Path(hf_dir)
        index, single = self.dir / INDEX_FILE, self.dir / SAFETENSORS_FILE
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif single.exists():
            with safetensors.safe_open(str(single), framework="numpy") as f:
                self.files = {name: SAFETENSORS_FILE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.exists() else []
            raise FileNotFoundError(
                f"{self.dir} has neither {SAFETENSORS_FILE} nor {INDEX_FILE} (found {found}). "
                "Save the model with `save_pretrained(dir)` (safetensors is its default); "
                "pytorch_model.bin files are not read.")

    def shape(self, name: str) -> tuple[int, ...]:
        with safetensors.safe_open(str(self.dir / self.files[name]), framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (exact from bf16 / fp16 / f32)."""
        with safetensors.safe_open(str(self.dir / self.files[name]), framework="numpy") as f:
            return np.asarray(f.get_tensor(name), np.float32)


def read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = epath.Path(hf_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; --hf_dir must be a folder written by "
                                "save_pretrained (config.json + model.safetensors).")
    return json.loads(path.read_text())


def _read_slot(weights: HfWeights, slot: _Slot, shape: tuple[int, ...]) -> np.ndarray:
    if slot.hf_name not in weights.files:
        raise ValueError(f"{weights.dir} has no tensor {slot.hf_name!r}, which config.json's "
                         f"sizes need (our {'/'.join(map(str, slot.path))}).")
    expected, got = slot.layout.hf_shape(shape), weights.shape(slot.hf_name)
    if got != expected:
        raise ValueError(f"{slot.hf_name} has shape {got} in {weights.dir}, but config.json "
                         f"gives {expected}; the config and the weights disagree.")
    return slot.layout.to_ours(weights.get(slot.hf_name), shape)


def read_hf_params(hf_dir: str | os.PathLike, cfg: TransformerConfig) -> nnx.State:
    """The parameters of `cfg`'s module (nnx.State of float32 jax arrays, unsharded) read
    from the safetensors of `hf_dir`. Every HF tensor must be used: a left-over one
    (a bias, a score head) means a network we would compute differently."""
    weights = HfWeights(hf_dir)
    flat = _flat_params(cfg)
    values: dict[tuple, list[np.ndarray]] = {}
    used = set()
    for slot, shape in _slots(cfg, {p: tuple(v.shape) for p, v in flat.items()}):
        values.setdefault(slot.path, []).append(_read_slot(weights, slot, shape))
        used.add(slot.hf_name)
    if cfg.tie_embeddings:
        used.add(_GLOBAL[("output", "lm_head", "kernel")][0])  # some saves repeat it
    left = sorted(n for n in set(weights.files) - used if not n.endswith(_IGNORED_SUFFIXES))
    if left:
        raise ValueError(f"{weights.dir} has tensors the Llama network does not use: "
                         f"{left[:5]}{' ...' if len(left) > 5 else ''}; its config.json "
                         "does not describe them. Refusing rather than dropping weights.")
    state = {}
    for path in list(values):  # popped: one parameter's layers are copied at a time
        parts = values.pop(path)
        value = np.stack(parts) if cfg.scan_layers and path[:2] == _LAYERS_PATH else parts[0]
        del parts
        state[path] = flat[path].replace(jnp.asarray(value))
    return nnx.from_flat_state(state)


def load(hf_dir: str | os.PathLike, *, dtype: str | None = None,
         scan_layers: bool = True) -> tuple[DecoderOnlyModel, nnx.Module]:
    """(model, module with the HF weights) of a save_pretrained folder, in memory."""
    cfg = config_from_hf(read_config(hf_dir), dtype=dtype, scan_layers=scan_layers)
    model = DecoderOnlyModel(cfg)
    module = nnx.eval_shape(model.make_module)
    nnx.update(module, read_hf_params(hf_dir, cfg))
    return model, module


# ---------------------------------------------------------------------------
# Writing


def _hf_tensors(cfg: TransformerConfig, params: nnx.State
                ) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(HF name, HF shape, float32 array thunk) of every tensor, in HF order."""
    flat = {p: v for p, v in nnx.to_flat_state(params)}
    shapes = {p: tuple(v.shape) for p, v in _flat_params(cfg).items()}
    for path, shape in shapes.items():
        got = tuple(np.shape(flat[path][...])) if path in flat else None
        if got != shape:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has shape {got}, the "
                             f"config gives {shape}; export the params of this config.")

    def thunk(slot):
        def get():
            value = flat[slot.path][...]
            if slot.layer is not None:  # slice before copying: one layer leaves the device
                value = value[slot.layer]
            return slot.layout.to_hf(np.asarray(value, np.float32))
        return get

    out = [(s.hf_name, s.layout.hf_shape(shape), thunk(s)) for s, shape in _slots(cfg, shapes)]
    if _untied_export(cfg):
        embedding = flat[("embed", "embedding")]
        scale = np.float32(math.sqrt(cfg.emb_dim))
        out.append((_GLOBAL[("output", "lm_head", "kernel")][0], shapes[("embed", "embedding")],
                    lambda: np.asarray(embedding[...], np.float32) / scale))
    return out


def _shard_groups(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors into shards of at most max_shard_bytes (a larger tensor alone)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if groups[-1] and total + size > max_shard_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def write_hf(out_dir: str | os.PathLike, cfg: TransformerConfig, params: nnx.State, *,
             dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             **config_fields: Any) -> list[str]:
    """Writes config.json and model.safetensors (or shards + index above
    `max_shard_bytes`) of `params`; returns the files written. `dtype`: of the saved
    tensors (float32 keeps our parameters bit for bit). `config_fields`: token_ids and
    max_position_embeddings for `hf_config_for`."""
    config = hf_config_for(cfg, dtype=dtype, **config_fields)
    out = epath.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export writes into a new or empty "
                              "directory. Pick another --out.")
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(cfg, params)
    itemsize = jnp.dtype(dtype).itemsize
    groups = _shard_groups([math.prod(s) * itemsize for _, s, _ in tensors], max_shard_bytes)
    names = ([SAFETENSORS_FILE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for file_name, group in zip(names, groups):
        shard = {tensors[i][0]: np.ascontiguousarray(tensors[i][2]().astype(jnp.dtype(dtype)))
                 for i in group}
        safetensors.numpy.save_file(shard, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(groups) > 1:
        total = sum(math.prod(s) * itemsize for _, s, _ in tensors)
        (out / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        names.append(INDEX_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [CONFIG_FILE, *names]


# ---------------------------------------------------------------------------
# The two commands


def decode_gin_text(hf: Mapping[str, Any]) -> str:
    """Gin lines binding decoding.DecodeConfig's special ids to config.json's
    bos_token_id / eos_token_id, which inference checks against the task's tokenizer
    (a contradiction is refused, naming both). A list of EOS ids (Llama 3 Instruct's
    [128001, 128008, 128009]) binds none: our decoder stops at one, the vocabulary's."""
    lines = ["", "# Special ids from config.json; infer and eval check them against the "
             "tokenizer.", "from t5x_like.model import decoding"]
    eos, bos = hf.get("eos_token_id"), hf.get("bos_token_id")
    if isinstance(eos, int):
        lines.append(f"decoding.DecodeConfig.eos_id = {eos}")
    elif eos is not None:
        lines.append(f"# config.json's eos_token_id is {eos!r}: the vocabulary's eos_token "
                     "(one of them) ends decoding.")
    if "bos_token_id" in hf:
        lines.append(f"decoding.DecodeConfig.bos_id = {bos!r}")
    return "\n".join(lines) + "\n"


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
              gin_out: str | os.PathLike | None = None) -> TransformerConfig:
    """save_pretrained folder -> params-only checkpoint at `out` (+ model gin file, with
    config.json's special ids for decoding: `decode_gin_text`)."""
    hf_config = read_config(hf_dir)
    cfg = config_from_hf(hf_config, dtype=dtype)
    params = read_hf_params(hf_dir, cfg)
    gin_text = model_gin_text(cfg, os.fspath(hf_dir)) + decode_gin_text(hf_config)
    path = checkpoints.save_params(out, params, config_text=gin_text)
    if gin_out is not None:
        epath.Path(gin_out).write_text(gin_text)
    log.info("imported %s: %s parameters -> %s%s", hf_dir,
             f"{sum(v[...].size for _, v in nnx.to_flat_state(params)):,}", path,
             f" (model gin file {gin_out})" if gin_out else "")
    return cfg


def export_hf(cfg: TransformerConfig, checkpoint: str | os.PathLike, out: str | os.PathLike,
              **write_options: Any) -> list[str]:
    """Params of `cfg` from `checkpoint` (params-only or training) -> HF folder `out`."""
    check_exportable(cfg)
    target = checkpoints.abstract_like(partitioning.abstract_params(
        DecoderOnlyModel(cfg).make_module))
    params = checkpoints.restore_params(checkpoint, target)
    files = write_hf(out, cfg, params, **write_options)
    log.info("exported %s -> %s: %s", checkpoint, out, ", ".join(files))
    return files


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t5x_like.hf", description=__doc__.split(
        "\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="save_pretrained folder -> params checkpoint")
    imp.add_argument("--hf_dir", required=True, help="folder with config.json + safetensors")
    imp.add_argument("--out", required=True, help="new params checkpoint directory")
    imp.add_argument("--gin_out", default=None, help="also write the model gin file here")
    imp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="compute dtype (default: the dtype of the published weights)")
    exp = commands.add_parser("export", help="checkpoint -> LlamaForCausalLM folder")
    exp.add_argument("--gin_file", action="append", required=True,
                     help="gin file(s) binding MODEL_CONFIG (e.g. the one import wrote)")
    exp.add_argument("--gin_bindings", action="append", default=[])
    exp.add_argument("--gin_search_paths", default="")
    exp.add_argument("--checkpoint", required=True,
                     help="params checkpoint, training step dir, checkpoints dir or model dir")
    exp.add_argument("--out", required=True, help="new (or empty) output folder")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    exp.add_argument("--max_shard_bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    exp.add_argument("--max_position_embeddings", type=int, default=None,
                     help="config.json's (default: original_max_position_embeddings x factor "
                          "of a llama3 or yarn RoPE scaling, else 8192)")
    exp.add_argument("--config_form", default="v4", choices=CONFIG_FORMS,
                     help="RoPE keys: v4 rope_theta + rope_scaling (every transformers "
                          "release reads them) or v5 rope_parameters")
    for name in TOKEN_ID_FIELDS:
        exp.add_argument(f"--{name}", type=_optional_int, default=argparse.SUPPRESS,
                         help="int or 'none' (default: t5x_like's vocabulary: pad 0, eos 1, "
                              "no bos)")
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """The command; bad input (a config.json we cannot express, a missing file) is one
    paragraph on stderr and exit code 2, as launch.run does (T5X_LIKE_DEBUG=1: the
    traceback)."""
    try:
        return _main(argv)
    except launch.CONFIG_ERRORS as e:
        if os.environ.get(launch.DEBUG_ENV):
            raise
        print(f"python -m t5x_like.hf: error: {str(e).strip() or type(e).__name__}",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _main(argv: Sequence[str] | None) -> Any:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    launch.setup_logging()
    if args.command == "import":
        return import_hf(args.hf_dir, args.out, dtype=args.dtype, gin_out=args.gin_out)
    launch.parse_gin(args.gin_file, args.gin_bindings,
                     [p for p in args.gin_search_paths.split(",") if p])
    cfg = launch.gin_macro("MODEL_CONFIG")
    token_ids = {name: getattr(args, name) for name in TOKEN_ID_FIELDS if hasattr(args, name)}
    return export_hf(cfg, args.checkpoint, args.out, dtype=args.dtype,
                     max_shard_bytes=args.max_shard_bytes,
                     max_position_embeddings=args.max_position_embeddings,
                     config_form=args.config_form, token_ids=token_ids)
