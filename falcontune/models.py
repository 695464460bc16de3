"""Falcon model configurations: config.json parsing (HF and RW styles), GPTQ quantize configs
and the table of model names falcontune knows.

Everything here is pure Python over small dicts; nothing touches tensor data. The widths of a
layer's linears come from the engine's module table (layout.py).

Facts encoded here (see docs/DESIGN.md):

* KV heads = ``num_kv_heads`` if ``new_decoder_architecture`` or not ``multi_query``, else 1
  (the Falcon-7B config says 71 with ``multi_query: true``: it has ONE kv head).
* Fused qkv layouts: ``multi_query`` = [heads q | 1 k | 1 v] x head_dim; ``grouped``
  (new_decoder_architecture) = [kv_groups, heads/kv + 2, head_dim]; ``interleaved`` =
  [heads, 3, head_dim].
* Layer norms per layer: ``ln_attn`` + ``ln_mlp`` (new decoder with 2 layer norms),
  ``input_layernorm`` (parallel attention with 1), ``input_layernorm`` +
  ``post_attention_layernorm`` (sequential attention/MLP, the RW models).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import layout

__all__ = [
    "ConfigError",
    "UnknownModelError",
    "FalconConfig",
    "parse_config",
    "config_to_hf_dict",
    "QuantizeConfig",
    "parse_quantize_config",
    "quantize_config_to_dict",
    "ModelSpec",
    "KNOWN_MODELS",
    "get_known_model",
    "FALCON_7B_CONFIG",
    "FALCON_40B_CONFIG",
    "FALCON_RW_1B_CONFIG",
    "FALCON_RW_7B_CONFIG",
]


class ConfigError(ValueError):
    """A config.json / quantize_config.json value is missing, malformed or unsupported."""


class UnknownModelError(ValueError):
    """A model name that is not in KNOWN_MODELS."""


# ---------------------------------------------------------------------------------------------
# small validation helpers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(source: str, name: str, v: Any) -> int:
    if not _is_int(v) or v <= 0:
        raise ConfigError(f"{source}: '{name}' must be a positive integer, got {v!r}")
    return v


def _bool(source: str, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: '{name}' must be true or false, got {v!r}")
    return v


def _pos_float(source: str, name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
        raise ConfigError(f"{source}: '{name}' must be a positive finite number, got {v!r}")
    return float(v)


def _token_id(source: str, name: str, v: Any, vocab_size: int) -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v < vocab_size:
        raise ConfigError(
            f"{source}: '{name}' must be null or an integer in [0, vocab_size={vocab_size}), got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------
# FalconConfig


@dataclass(frozen=True)
class FalconConfig:
    """A validated Falcon architecture. ``num_kv_heads`` is the EFFECTIVE kv head count and
    ``num_ln_in_parallel_attn`` the effective layer-norm count (see the module docstring)."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    num_hidden_layers: int
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    alibi: bool = False
    bias: bool = False
    num_ln_in_parallel_attn: Optional[int] = None  # None -> 2 if new_decoder_architecture else 1
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 11
    eos_token_id: Optional[int] = 11
    max_position_embeddings: int = 2048
    source: str = field(default="config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_kv_heads",
                     "num_hidden_layers", "max_position_embeddings"):
            _pos_int(src, name, getattr(self, name))
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        _pos_int(src, "ffn_hidden_size", self.ffn_hidden_size)
        for name in ("new_decoder_architecture", "multi_query", "parallel_attn", "alibi", "bias",
                     "tie_word_embeddings"):
            _bool(src, name, getattr(self, name))
        if self.num_ln_in_parallel_attn is None:
            object.__setattr__(self, "num_ln_in_parallel_attn",
                               2 if self.new_decoder_architecture else 1)
        n_ln = self.num_ln_in_parallel_attn
        if n_ln not in (1, 2) or isinstance(n_ln, bool):
            raise ConfigError(f"{src}: 'num_ln_in_parallel_attn' must be 1 or 2, got {n_ln!r}")
        if n_ln == 2 and not self.new_decoder_architecture:
            raise ConfigError(
                f"{src}: 'num_ln_in_parallel_attn' = 2 needs 'new_decoder_architecture' = true "
                "(transformers builds ln_attn/ln_mlp but never uses them otherwise)")
        if self.new_decoder_architecture and not self.parallel_attn:
            raise ConfigError(
                f"{src}: 'new_decoder_architecture' = true always uses parallel attention; "
                "'parallel_attn' must not be false")
        object.__setattr__(self, "layer_norm_epsilon",
                           _pos_float(src, "layer_norm_epsilon", self.layer_norm_epsilon))
        object.__setattr__(self, "rope_theta", _pos_float(src, "rope_theta", self.rope_theta))
        _token_id(src, "bos_token_id", self.bos_token_id, self.vocab_size)
        _token_id(src, "eos_token_id", self.eos_token_id, self.vocab_size)

        heads, kv = self.num_attention_heads, self.num_kv_heads
        if self.hidden_size % heads:
            raise ConfigError(
                f"{src}: 'hidden_size' = {self.hidden_size} must be divisible by "
                f"'num_attention_heads' = {heads}")
        layout = self.qkv_layout
        if layout == "grouped" and heads % kv:
            raise ConfigError(
                f"{src}: 'num_attention_heads' = {heads} must be divisible by 'num_kv_heads' = {kv}")
        if layout == "multi_query" and kv != 1:
            raise ConfigError(f"{src}: multi_query needs exactly 1 kv head, got num_kv_heads = {kv}")
        if layout == "interleaved" and kv != heads:
            raise ConfigError(
                f"{src}: with 'multi_query' = false and 'new_decoder_architecture' = false the fused "
                f"qkv is interleaved per head, so 'num_kv_heads' must equal 'num_attention_heads' "
                f"= {heads}, got {kv}")
        if not self.alibi and self.head_dim % 2:
            raise ConfigError(
                f"{src}: rotary embeddings need an even head_dim, got hidden_size/num_attention_heads"
                f" = {self.head_dim}")

    # -- derived shapes -----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_layout(self) -> str:
        """"grouped" (new_decoder_architecture), "multi_query" or "interleaved"."""
        if self.new_decoder_architecture:
            return "grouped"
        return "multi_query" if self.multi_query else "interleaved"

    @property
    def qkv_out(self) -> int:
        """Columns of the fused query_key_value output (the engine's rule)."""
        return layout.widths(self)["qkv"]

    @property
    def rotary(self) -> bool:
        return not self.alibi

    @property
    def layer_norm_names(self) -> tuple[str, ...]:
        """Per-layer layer norm module names, as in transformers' FalconDecoderLayer."""
        if not self.parallel_attn:
            return ("input_layernorm", "post_attention_layernorm")
        if self.num_ln_in_parallel_attn == 2:
            return ("ln_attn", "ln_mlp")
        return ("input_layernorm",)

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear module path (``self_attention.query_key_value``, ...) ->
        (in_features, out_features), from the engine's module table (layout.py)."""
        return layout.linear_shapes(self)


_RW_TYPES = ("RefinedWebModel", "RefinedWeb")
_ALIASES = {  # RW / legacy key -> HF key
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_embed": "hidden_size",
    "n_head_kv": "num_kv_heads",
}


def _get(d: Mapping[str, Any], source: str, key: str) -> Any:
    """Value of ``key`` in d, also looking at its RW alias; conflicting values are an error."""
    found = [(k, d[k]) for k, hf in _ALIASES.items() if hf == key and k in d]
    if key in d:
        found.insert(0, (key, d[key]))
    vals = {repr(v) for _, v in found}
    if len(vals) > 1:
        names = " and ".join(f"'{k}' = {v!r}" for k, v in found)
        raise ConfigError(f"{source}: conflicting values {names}")
    return found[0][1] if found else None


def parse_config(d: Mapping[str, Any], source: str = "config.json") -> FalconConfig:
    """Parse a Falcon config.json dict (HF ``model_type: falcon`` or RW ``RefinedWebModel`` /
    ``RefinedWeb``) into a validated FalconConfig. Missing ``model_type`` is read as HF style."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "falcon")
    if model_type not in ("falcon",) + _RW_TYPES:
        raise ConfigError(
            f"{source}: 'model_type' = {model_type!r} is not a Falcon model "
            f"(expected 'falcon', 'RefinedWebModel' or 'RefinedWeb')")

    def req(key: str) -> Any:
        v = _get(d, source, key)
        if v is None:
            raise ConfigError(f"{source}: missing required field '{key}'")
        return v

    def opt(key: str, default: Any) -> Any:
        v = _get(d, source, key)
        return default if v is None else v

    if d.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(f"{source}: 'apply_residual_connection_post_layernorm' = true is not supported")
    if d.get("rope_scaling") not in (None, {}):
        raise ConfigError(f"{source}: 'rope_scaling' = {d['rope_scaling']!r} is not supported (expected null)")
    act = d.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: 'activation' = {act!r} is not supported (expected 'gelu')")

    rope_theta = d.get("rope_theta")
    rp = d.get("rope_parameters")
    if rp is not None:  # transformers 5 style
        if not isinstance(rp, Mapping) or rp.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: 'rope_parameters' = {rp!r} is not supported "
                              "(only the default rotary embedding)")
        if rope_theta is None:
            rope_theta = rp.get("rope_theta")
    if rope_theta is None:
        rope_theta = 10000.0

    heads = req("num_attention_heads")
    if model_type == "RefinedWeb":
        new_dec = opt("new_decoder_architecture", True)
        multi_query = opt("multi_query", True)  # ignored by the new decoder
        parallel = opt("parallel_attn", True)
    elif model_type == "RefinedWebModel":
        new_dec = opt("new_decoder_architecture", False)
        multi_query = opt("multi_query", True)
        parallel = opt("parallel_attn", True)
    else:
        new_dec = opt("new_decoder_architecture", False)
        multi_query = opt("multi_query", True)
        parallel = opt("parallel_attn", True)
    _bool(source, "new_decoder_architecture", new_dec)
    _bool(source, "multi_query", multi_query)
    _bool(source, "parallel_attn", parallel)
    if new_dec:
        # transformers documents parallel_attn as ignored by the new decoder (always parallel)
        parallel = True

    kv_field = opt("num_kv_heads", heads)
    if new_dec or not multi_query:
        kv = kv_field
    else:
        _pos_int(source, "num_kv_heads", kv_field)
        kv = 1

    eos = d.get("eos_token_id", 11)
    if isinstance(eos, list):  # transformers allows several; the first is the one we stop on
        eos = eos[0] if eos else None

    return FalconConfig(
        vocab_size=req("vocab_size"),
        hidden_size=req("hidden_size"),
        num_attention_heads=heads,
        num_kv_heads=kv,
        num_hidden_layers=req("num_hidden_layers"),
        ffn_hidden_size=d.get("ffn_hidden_size"),
        new_decoder_architecture=new_dec,
        multi_query=multi_query,
        parallel_attn=parallel,
        alibi=opt("alibi", False),
        bias=opt("bias", False),
        num_ln_in_parallel_attn=d.get("num_ln_in_parallel_attn"),
        layer_norm_epsilon=opt("layer_norm_epsilon", 1e-5),
        rope_theta=rope_theta,
        tie_word_embeddings=opt("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id", 11),
        eos_token_id=eos,
        max_position_embeddings=opt("max_position_embeddings", 2048),
        source=source,
    )


def config_to_hf_dict(cfg: FalconConfig) -> dict[str, Any]:
    """An HF-style config.json dict (model_type falcon) that transformers' FalconConfig and
    parse_config load back to the same model. For multi-query models ``num_kv_heads`` is written
    as ``num_attention_heads``, exactly as the real Falcon-7B config does (the rule makes it 1)."""
    kv_written = cfg.num_attention_heads if cfg.qkv_layout == "multi_query" else cfg.num_kv_heads
    return {
        "model_type": "falcon",
        "architectures": ["FalconForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_kv_heads": kv_written,
        "num_hidden_layers": cfg.num_hidden_layers,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "new_decoder_architecture": cfg.new_decoder_architecture,
        "multi_query": cfg.multi_query,
        "parallel_attn": cfg.parallel_attn,
        "alibi": cfg.alibi,
        "bias": cfg.bias,
        "num_ln_in_parallel_attn": cfg.num_ln_in_parallel_attn,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "activation": "gelu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "max_position_embeddings": cfg.max_position_embeddings,
        "apply_residual_connection_post_layernorm": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------
# GPTQ quantize config

_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantizeConfig:
    """GPTQ settings (AutoGPTQ quantize_config.json). ``zero_offset`` is what a loader adds to the
    stored zero points: 1 for the original "gptq" format, 0 for "gptq_v2"."""

    bits: int
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    model_file_base_name: Optional[str] = None
    source: str = field(default="quantize_config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        if not _is_int(self.bits) or self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"{src}: unsupported 'bits' = {self.bits!r} (supported: 2, 3, 4, 8)")
        if not _is_int(self.group_size) or (self.group_size != -1 and self.group_size <= 0):
            raise ConfigError(
                f"{src}: 'group_size' must be -1 (one group) or a positive integer, got {self.group_size!r}")
        _bool(src, "desc_act", self.desc_act)
        _bool(src, "sym", self.sym)
        if self.checkpoint_format not in _FORMATS:
            raise ConfigError(
                f"{src}: unsupported 'checkpoint_format' = {self.checkpoint_format!r} "
                f"(supported: 'gptq', 'gptq_v2')")
        if self.model_file_base_name is not None and (
                not isinstance(self.model_file_base_name, str) or not self.model_file_base_name):
            raise ConfigError(f"{src}: 'model_file_base_name' must be a non-empty string or null, "
                              f"got {self.model_file_base_name!r}")

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0

    @property
    def weights_file_name(self) -> str:
        """``model_file_base_name`` + .safetensors, else AutoGPTQ's default name
        (gptq_model-4bit-64g.safetensors; group -1 gives gptq_model-4bit--1g.safetensors)."""
        base = self.model_file_base_name or f"gptq_model-{self.bits}bit-{self.group_size}g"
        return base + ".safetensors"


def parse_quantize_config(d: Mapping[str, Any], source: str = "quantize_config.json") -> QuantizeConfig:
    """Parse AutoGPTQ's quantize_config.json, a transformers ``quantization_config`` block
    (quant_method gptq), or a whole config.json dict holding such a block."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if "quantization_config" in d:
        d = d["quantization_config"]
        source = f"{source} (quantization_config)"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    method = d.get("quant_method", "gptq")
    if not isinstance(method, str) or method.lower() != "gptq":
        raise ConfigError(f"{source}: 'quant_method' = {method!r} is not supported (expected 'gptq')")
    if d.get("is_marlin_format"):
        raise ConfigError(f"{source}: Marlin-format checkpoints are not supported (expected gptq)")
    for key in ("bits", "group_size"):
        if key not in d:
            raise ConfigError(f"{source}: missing required field '{key}'")
    fmt = d.get("checkpoint_format", d.get("format", "gptq"))
    if isinstance(fmt, str):
        fmt = fmt.lower()
    desc_act, sym = d.get("desc_act"), d.get("sym")
    return QuantizeConfig(
        bits=d["bits"],
        group_size=d["group_size"],
        desc_act=False if desc_act is None else desc_act,
        sym=True if sym is None else sym,
        checkpoint_format=fmt,
        model_file_base_name=d.get("model_file_base_name"),
        source=source,
    )


def quantize_config_to_dict(q: QuantizeConfig) -> dict[str, Any]:
    """AutoGPTQ-style quantize_config.json contents (checkpoint_format only written for v2)."""
    out: dict[str, Any] = {
        "bits": q.bits,
        "group_size": q.group_size,
        "damp_percent": 0.01,
        "desc_act": q.desc_act,
        "static_groups": False,
        "sym": q.sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": q.model_file_base_name,
        "quant_method": "gptq",
    }
    if q.checkpoint_format != "gptq":
        out["checkpoint_format"] = q.checkpoint_format
    return out


# ---------------------------------------------------------------------------------------------
# known models

_COMMON: dict[str, Any] = {
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 2048,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "use_cache": True,
}

#: tiiuae/falcon-7b (same values as shared/data/falcon/config-7b.json)
FALCON_7B_CONFIG: dict[str, Any] = {
    **_COMMON, "alibi": False, "bias": False, "bos_token_id": 11, "eos_token_id": 11,
    "hidden_size": 4544, "multi_query": True, "new_decoder_architecture": False,
    "num_attention_heads": 71, "num_hidden_layers": 32, "num_kv_heads": 71,
    "parallel_attn": True, "vocab_size": 65024,
}
#: tiiuae/falcon-40b (same values as shared/data/falcon/config-40b.json)
FALCON_40B_CONFIG: dict[str, Any] = {
    **_COMMON, "alibi": False, "bias": False, "bos_token_id": 11, "eos_token_id": 11,
    "hidden_size": 8192, "multi_query": True, "new_decoder_architecture": True,
    "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8,
    "parallel_attn": True, "vocab_size": 65024,
}
#: tiiuae/falcon-rw-1b: alibi, biases, sequential attention/MLP, interleaved qkv
FALCON_RW_1B_CONFIG: dict[str, Any] = {
    **_COMMON, "alibi": True, "bias": True, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_size": 2048, "multi_query": False, "new_decoder_architecture": False,
    "num_attention_heads": 32, "num_hidden_layers": 24, "num_kv_heads": 32,
    "parallel_attn": False, "vocab_size": 50304,
}
#: tiiuae/falcon-rw-7b
FALCON_RW_7B_CONFIG: dict[str, Any] = {
    **_COMMON, "alibi": True, "bias": True, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_size": 4096, "multi_query": False, "new_decoder_architecture": False,
    "num_attention_heads": 64, "num_hidden_layers": 36, "num_kv_heads": 64,
    "parallel_attn": False, "vocab_size": 65024,
}


@dataclass(frozen=True)
class ModelSpec:
    """A model falcontune knows by name. ``weights_name`` is the default weights file for
    quantized models (None: look for safetensors files in the model directory)."""

    name: str
    repo_id: str
    base_config: Mapping[str, Any]
    quantized: bool
    quantize_config: Optional[QuantizeConfig] = None
    weights_name: Optional[str] = None

    def config_dict(self) -> dict[str, Any]:
        """A fresh copy of the HF-style config.json dict."""
        return copy.deepcopy(dict(self.base_config))

    @property
    def config(self) -> FalconConfig:
        return parse_config(self.base_config, source=f"falcontune model '{self.name}'")


def _q(bits: int, group: int, desc_act: bool) -> QuantizeConfig:
    return QuantizeConfig(bits=bits, group_size=group, desc_act=desc_act, sym=True,
                          model_file_base_name=f"gptq_model-{bits}bit-{group}g",
                          source="falcontune.models.KNOWN_MODELS")


def _known() -> dict[str, ModelSpec]:
    q7, q40 = _q(4, 64, False), _q(4, -1, True)
    specs = [
        ModelSpec("falcon-7b-instruct-4bit", "TheBloke/falcon-7b-instruct-GPTQ", FALCON_7B_CONFIG,
                  True, q7, q7.weights_file_name),
        ModelSpec("falcon-40b-instruct-4bit", "TheBloke/falcon-40b-instruct-GPTQ", FALCON_40B_CONFIG,
                  True, q40, q40.weights_file_name),
        ModelSpec("falcon-7b", "tiiuae/falcon-7b", FALCON_7B_CONFIG, False),
        ModelSpec("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", FALCON_7B_CONFIG, False),
        ModelSpec("falcon-40b", "tiiuae/falcon-40b", FALCON_40B_CONFIG, False),
        ModelSpec("falcon-40b-instruct", "tiiuae/falcon-40b-instruct", FALCON_40B_CONFIG, False),
        ModelSpec("falcon-rw-1b", "tiiuae/falcon-rw-1b", FALCON_RW_1B_CONFIG, False),
        ModelSpec("falcon-rw-7b", "tiiuae/falcon-rw-7b", FALCON_RW_7B_CONFIG, False),
    ]
    return {s.name: s for s in specs}


KNOWN_MODELS: dict[str, ModelSpec] = _known()


def get_known_model(name: str) -> ModelSpec:
    """The spec of a known model name; an unknown name raises UnknownModelError listing them."""
    try:
        return KNOWN_MODELS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UnknownModelError(f"unknown model name {name!r}; known models: {known}") from None
