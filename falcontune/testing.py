"""Random GPTQ-quantized Falcon checkpoints for tests, the demo and benchmarks, plus a numpy
reference GPTQ packer (the C engine is tested against it and gptq.py's dequantizer).

The GPTQ storage format and the dequantizer live in falcontune/gptq.py (production code);
this module adds the reference round-to-nearest packer ``gptq_quantize``. Our packer never
writes a v1 zero field of 2^bits-1: a v1 zero of 0 cannot be stored, so groups that would
need it get a slightly larger scale and zero 1 instead.

group_size: -1 means one group. ``gptq_quantize`` accepts any positive group size (the last
group may be shorter, as AutoGPTQ's ceil(in/group_size)); ``make_checkpoint`` requires that
group_size divides every in_features so all groups have equal size. in_features and
out_features must be multiples of 32 (packing).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from . import layout, models
from .gptq import check_bits, check_format, pack_bits
from .gptq import gptq_dequantize, gptq_unpack  # noqa: F401  (re-exported: the tests' reference)
from .weights import atomic_write, float32_to_bf16_bits, save_safetensors

__all__ = [
    "TestingError",
    "PRESETS",
    "preset_config",
    "gptq_quantize",
    "gptq_unpack",
    "gptq_dequantize",
    "make_checkpoint",
    "random_lora",
    "LORA_MODULES",
]


class TestingError(ValueError):
    """Bad arguments to the checkpoint generator / reference quantizer."""

    __test__ = False  # not a pytest test class


_PRESET_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_kv_heads", "num_hidden_layers",
    "new_decoder_architecture", "multi_query", "parallel_attn", "alibi", "bias",
    "layer_norm_epsilon", "rope_theta", "bos_token_id", "eos_token_id", "max_position_embeddings",
)


def _from_base(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in _PRESET_FIELDS if k in cfg}


#: preset name -> HF FalconConfig keyword arguments. Hidden sizes are multiples of 32; "tiny"
#: (hidden 64, ffn 256) works with group sizes 32, 64 and -1; "tiny-40b" and "small" also with 128.
PRESETS: dict[str, dict[str, Any]] = {
    # Falcon-7B style: multi-query (num_kv_heads written like the real config, the rule makes it 1),
    # parallel attention, one input_layernorm, rotary
    "tiny": dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_kv_heads=4,
                 num_hidden_layers=2, new_decoder_architecture=False, multi_query=True,
                 parallel_attn=True, alibi=False, bias=False),
    # Falcon-40B style: new decoder, grouped kv heads, ln_attn + ln_mlp
    "tiny-40b": dict(vocab_size=256, hidden_size=128, num_attention_heads=8, num_kv_heads=2,
                     num_hidden_layers=2, new_decoder_architecture=True, multi_query=True,
                     parallel_attn=True, alibi=False, bias=False),
    # Falcon-RW style: alibi, biases, sequential attention then MLP, interleaved qkv
    "tiny-rw": dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_kv_heads=4,
                    num_hidden_layers=2, new_decoder_architecture=False, multi_query=False,
                    parallel_attn=False, alibi=True, bias=True, bos_token_id=1, eos_token_id=2),
    # demo / CPU benchmarks, 7B style
    "small": dict(vocab_size=4096, hidden_size=256, num_attention_heads=8, num_kv_heads=8,
                  num_hidden_layers=4, new_decoder_architecture=False, multi_query=True,
                  parallel_attn=True, alibi=False, bias=False),
    "falcon-7b": _from_base(models.FALCON_7B_CONFIG),
    "falcon-40b": _from_base(models.FALCON_40B_CONFIG),
}


def _preset_kwargs(preset: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(preset, Mapping):
        return dict(preset)
    try:
        return dict(PRESETS[preset])
    except (KeyError, TypeError):
        raise TestingError(
            f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}") from None


def preset_config(preset: Union[str, Mapping[str, Any]] = "tiny", **overrides: Any) -> models.FalconConfig:
    """The FalconConfig of a preset (name or kwargs dict), with overrides applied."""
    kw = _preset_kwargs(preset)
    kw.update(overrides)
    name = preset if isinstance(preset, str) else "custom"
    return models.parse_config(kw, source=f"testing preset '{name}'")


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


def _fp16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest float16 >= x (x > 0, float64)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.all(np.isfinite(h)):
        raise TestingError("weights too large: a GPTQ scale does not fit in float16")
    return h


def _group_params(xmin: np.ndarray, xmax: np.ndarray, bits: int, sym: bool, v1: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """float16 scales and integer zeros [groups, out] from per-group ranges (xmin <= 0 <= xmax)."""
    maxq = (1 << bits) - 1
    if sym:
        amax = np.maximum(-xmin, xmax)
        amax[amax == 0] = 1.0
        scale = _fp16_ceil(2.0 * amax / maxq)
        return scale, np.full(amax.shape, (maxq + 1) // 2, dtype=np.int64)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    scale = _fp16_ceil((xmax - xmin) / maxq)
    zero = np.rint(-xmin / scale.astype(np.float64)).astype(np.int64)
    if v1:
        bad = zero == 0  # v1 stores zero-1: 0 is not representable
        if bad.any():
            scale[bad] = _fp16_ceil(xmax[bad] / (maxq - 1))
            zero[bad] = 1
    return scale, zero


def gptq_quantize(w: np.ndarray, bits: int, group_size: int, desc_act: bool = False,
                  sym: bool = False, checkpoint_format: str = "gptq",
                  rng: Optional[np.random.Generator] = None) -> dict[str, np.ndarray]:
    """Round-to-nearest GPTQ quantization of ``w`` [in, out] into AutoGPTQ's storage layout.

    Per group and output column the range [min(w, 0), max(w, 0)] is split into 2**bits - 1
    steps (asymmetric) or a symmetric range around zero 2**(bits-1) (sym); the float16 scale
    is rounded up so every weight is within half a step. desc_act=True assigns groups through
    a random permutation (act-order: g_idx[i] = rank[i] // group_size, non-monotonic).
    Returns qweight int32, qzeros int32, scales float16, g_idx int32."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise TestingError(f"gptq_quantize: w must be a 2-D float array [in, out], got {w.dtype} {w.shape}")
    check_bits(bits, TestingError)
    check_format(checkpoint_format, TestingError)
    in_f, out_f = w.shape
    if in_f % 32 or out_f % 32 or in_f == 0 or out_f == 0:
        raise TestingError(f"gptq_quantize: in and out features must be positive multiples of 32, got {w.shape}")
    if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0)):
        raise TestingError(f"gptq_quantize: group_size must be -1 or positive, got {group_size!r}")
    if not np.isfinite(w).all():
        raise TestingError("gptq_quantize: w holds NaN or infinite values")
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)
    maxq = (1 << bits) - 1

    order: Optional[np.ndarray] = None
    if desc_act and n_groups > 1:
        gen = rng if rng is not None else np.random.default_rng(0)
        order = gen.permutation(in_f)  # order[j]: the j-th row in quantization order
        rank = np.empty(in_f, dtype=np.int64)
        rank[order] = np.arange(in_f)
        g_idx = (rank // gs).astype(np.int32)
    else:
        g_idx = (np.arange(in_f) // gs).astype(np.int32)
    ws = w if order is None else w[order]  # rows grouped contiguously

    starts = np.arange(0, in_f, gs)
    xmin = np.minimum(np.minimum.reduceat(ws, starts, axis=0), 0).astype(np.float64)
    xmax = np.maximum(np.maximum.reduceat(ws, starts, axis=0), 0).astype(np.float64)
    scale16, zero = _group_params(xmin, xmax, bits, sym, checkpoint_format == "gptq")
    inv = 1.0 / scale16.astype(np.float64)
    zf = zero.astype(np.float64)

    q = np.empty((in_f, out_f), dtype=np.uint32)
    rows = min(in_f, max(1, (1 << 22) // (out_f * gs)) * gs)  # whole groups per chunk
    buf = np.empty((rows, out_f), dtype=np.float64)  # reused: bounds temporaries and page faults
    for r0 in range(0, in_f, rows):
        r1 = min(in_f, r0 + rows)
        v = buf[: r1 - r0]
        g0, g1 = r0 // gs, -(-r1 // gs)
        if (r1 - r0) % gs == 0:  # full groups: broadcast per group
            v3 = v.reshape(g1 - g0, gs, out_f)
            np.multiply(ws[r0:r1].reshape(g1 - g0, gs, out_f), inv[g0:g1, None, :], out=v3)
            v3 += zf[g0:g1, None, :]
        else:  # the short last group (AutoGPTQ's ceil)
            g = np.arange(r0, r1) // gs
            np.multiply(ws[r0:r1], inv[g], out=v)
            v += zf[g]
        np.rint(v, out=v)
        np.clip(v, 0, maxq, out=v)
        dest = slice(r0, r1) if order is None else order[r0:r1]
        q[dest] = v
    del ws

    qweight = pack_bits(q.reshape(in_f // 32, 32, out_f), bits).reshape(in_f * bits // 32, out_f)
    stored = (zero - (1 if checkpoint_format == "gptq" else 0)).astype(np.uint32)
    qzeros = pack_bits(stored.reshape(n_groups * out_f // 32, 32, 1), bits).reshape(n_groups, out_f * bits // 32)
    return {
        "qweight": qweight.view(np.int32),
        "qzeros": qzeros.view(np.int32),
        "scales": scale16,
        "g_idx": g_idx,
    }


# ---------------------------------------------------------------------------------------------
# checkpoints

_DENSE = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32"}


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed, *path])


def _normal(rng: np.random.Generator, shape: Union[int, tuple[int, ...]], std: float,
            mean: float = 0.0) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    if mean:
        a += np.float32(mean)
    return a


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def make_checkpoint(directory: Union[str, Path], preset: Union[str, Mapping[str, Any]] = "tiny",
                    bits: int = 4, group_size: int = 64, desc_act: bool = False, seed: int = 0,
                    checkpoint_format: str = "gptq", dense_dtype: str = "float16",
                    weights_name: Optional[str] = None, lm_head: bool = False,
                    bias: Optional[bool] = None, tokenizer: Optional[Union[str, Path]] = None,
                    sym: bool = False, **config_overrides: Any) -> Path:
    """Write a random GPTQ Falcon checkpoint into ``directory`` and return the directory:
    config.json (HF style), quantize_config.json (AutoGPTQ style) and one safetensors file
    (default name gptq_model-{bits}bit-{group_size}g.safetensors) with TheBloke/AutoGPTQ
    tensor names, plus tokenizer.json when ``tokenizer`` is given. ``bias`` (when not None)
    sets the config's bias field, which decides whether linears get a ``.bias``; ``lm_head``
    adds an untied lm_head.weight. Same arguments -> same bytes."""
    directory = Path(directory)
    kw = _preset_kwargs(preset)
    kw.update(config_overrides)
    if bias is not None:
        kw["bias"] = bool(bias)
    if lm_head:
        kw["tie_word_embeddings"] = False
    pname = preset if isinstance(preset, str) else "custom"
    cfg = models.parse_config(kw, source=f"testing preset '{pname}'")
    if dense_dtype not in _DENSE:
        raise TestingError(f"dense_dtype {dense_dtype!r} not supported (float16, bfloat16, float32)")
    dense = _DENSE[dense_dtype]
    if not isinstance(seed, int) or seed < 0:
        raise TestingError(f"seed must be a non-negative integer, got {seed!r}")
    check_bits(bits, TestingError)
    check_format(checkpoint_format, TestingError)
    if group_size != -1:
        for mod, (fin, _) in cfg.linear_shapes.items():
            if not isinstance(group_size, int) or group_size <= 0 or fin % group_size:
                raise TestingError(
                    f"group_size {group_size!r} must divide in_features {fin} of {mod} "
                    f"(preset '{pname}'); use -1 or a divisor")
    if weights_name is None:
        weights_name = f"gptq_model-{bits}bit-{group_size}g.safetensors"
    base = weights_name[: -len(".safetensors")] if weights_name.endswith(".safetensors") else weights_name
    qcfg = models.QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                                 checkpoint_format=checkpoint_format, model_file_base_name=base,
                                 source="make_checkpoint")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"{tokenizer}: tokenizer file not found")

    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def put_dense(name: str, a: np.ndarray) -> None:
        if dense == "bfloat16":
            tensors[name] = float32_to_bf16_bits(a)
            dtypes[name] = "BF16"
        else:
            tensors[name] = a.astype(dense)

    h, v = cfg.hidden_size, cfg.vocab_size
    emb_std = min(0.5, 4.0 / float(np.sqrt(h)))
    put_dense("transformer.word_embeddings.weight", _normal(_rng(seed, 0, 0), (v, h), emb_std))
    for i in range(cfg.num_hidden_layers):
        pre = f"transformer.h.{i}"
        for j, ln in enumerate(cfg.layer_norm_names):
            r = _rng(seed, i + 1, 10 + j)
            put_dense(f"{pre}.{ln}.weight", _normal(r, h, 0.1, mean=1.0))
            put_dense(f"{pre}.{ln}.bias", _normal(r, h, 0.1))
        for k, (mod, (fin, fout)) in enumerate(cfg.linear_shapes.items()):
            r = _rng(seed, i + 1, k)
            w = _normal(r, (fin, fout), 1.0 / float(np.sqrt(fin)))
            qd = gptq_quantize(w, bits, group_size, desc_act=desc_act, sym=sym,
                               checkpoint_format=checkpoint_format, rng=r)
            del w
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[f"{pre}.{mod}.{key}"] = qd[key]
            if cfg.bias:
                put_dense(f"{pre}.{mod}.bias", _normal(_rng(seed, i + 1, 20 + k), fout, 0.1))
    r = _rng(seed, 0, 1)
    put_dense("transformer.ln_f.weight", _normal(r, h, 0.1, mean=1.0))
    put_dense("transformer.ln_f.bias", _normal(r, h, 0.1))
    if lm_head:
        put_dense("lm_head.weight", _normal(_rng(seed, 0, 2), (v, h), emb_std))

    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", models.config_to_hf_dict(cfg))
    _write_json(directory / "quantize_config.json", models.quantize_config_to_dict(qcfg))
    save_safetensors(directory / weights_name, tensors, metadata={"format": "pt"}, dtypes=dtypes)
    if tokenizer is not None:
        with atomic_write(directory / "tokenizer.json") as f, open(tokenizer, "rb") as src:
            shutil.copyfileobj(src, f)
    return directory


# ---------------------------------------------------------------------------------------------
# LoRA

#: LoRA target module name -> parent module in a Falcon layer (the engine's module table)
LORA_MODULES: dict[str, str] = {m.name: m.parent for m in layout.MODULES}


def random_lora(config: Union[models.FalconConfig, str], r: int,
                target_modules: Union[str, Iterable[str]] = ("query_key_value",),
                seed: int = 0) -> dict[str, np.ndarray]:
    """Random nonzero LoRA weights under PEFT key names:
    ``base_model.model.transformer.h.N.<parent>.<module>.lora_A.weight`` [r, in] (std 1/sqrt(in))
    and ``...lora_B.weight`` [out, r] (std 0.1), float32."""
    cfg = preset_config(config) if isinstance(config, str) else config
    if not isinstance(cfg, models.FalconConfig):
        raise TestingError(f"random_lora: config must be a FalconConfig or preset name, got {type(config).__name__}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise TestingError(f"random_lora: r must be a positive integer, got {r!r}")
    mods = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    bad = [m for m in mods if m not in LORA_MODULES]
    if bad or not mods:
        raise TestingError(f"random_lora: unknown target modules {bad or mods!r}; "
                           f"known: {', '.join(LORA_MODULES)}")
    shapes = cfg.linear_shapes
    out: dict[str, np.ndarray] = {}
    for i in range(cfg.num_hidden_layers):
        for k, mod in enumerate(LORA_MODULES):
            if mod not in mods:
                continue
            fin, fout = shapes[layout.module(mod).path]
            g = _rng(seed, i, k, 7)
            out[layout.lora_key(i, mod, "A")] = _normal(g, (r, fin), 1.0 / float(np.sqrt(fin)))
            out[layout.lora_key(i, mod, "B")] = _normal(g, (fout, r), 0.1)
    return out
