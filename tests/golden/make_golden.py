#!/usr/bin/env python
"""Build the golden reference data for falcontune's numerics tests.

For every variant this script

1. writes a tiny random GPTQ Falcon checkpoint with ``falcontune.testing.make_checkpoint``
   into ``<out>/<variant>/model/`` (seeded, deterministic);
2. builds HF transformers' ``FalconForCausalLM`` in float64 from the written config.json, with
   the weights read independently of falcontune (``safetensors.torch``) and dequantized by an
   independent bit-stream unpacker that is cross-checked against
   ``falcontune.testing.gptq_dequantize``;
3. wraps it with PEFT LoRA, sets the adapter from ``falcontune.testing.random_lora`` and saves it
   with PEFT's own ``save_pretrained`` into ``<out>/<variant>/adapter/``;
4. records logits / loss / LoRA gradients on a right-padded batch and greedy generations on a
   left-padded batch (with and without the adapter) in ``<out>/<variant>/expected.npz``.

See tests/golden/README.md for the npz keys and the HF behaviour the engine must match.

Usage:  python tests/golden/make_golden.py [--out tests/golden] [--variants mq4,gqa3] [--no-engine-check]

Works with transformers 5.x (tested with 5.24; written to run on 5.17 too) and peft >= 0.13.
Needs torch, transformers, peft and safetensors; never needed at falcontune's runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ALL_MODULES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
LINEAR_PARENT = {
    "query_key_value": "self_attention",
    "dense": "self_attention",
    "dense_h_to_4h": "mlp",
    "dense_4h_to_h": "mlp",
}

# --------------------------------------------------------------------------------------------
# Variants. Each entry: make_checkpoint kwargs + LoRA setup + seeds.
# --------------------------------------------------------------------------------------------
VARIANTS: dict[str, dict] = {
    # 7B-style: multi-query, parallel attention, one input_layernorm, rotary, tied lm_head.
    "mq4": dict(
        checkpoint=dict(preset="tiny", bits=4, group_size=32, desc_act=False, checkpoint_format="gptq",
                        dense_dtype="float16", lm_head=False, bias=None, seed=11),
        lora=dict(r=4, alpha=8, target_modules=list(ALL_MODULES), seed=101),
        data_seed=1001,
    ),
    # 40B-style: new_decoder_architecture, grouped kv heads, ln_attn/ln_mlp, 3-bit act-order,
    # one group (g -1), lm_head stored (untied).
    "gqa3": dict(
        checkpoint=dict(preset="tiny-40b", bits=3, group_size=-1, desc_act=True, checkpoint_format="gptq",
                        dense_dtype="float16", lm_head=True, bias=None, seed=12),
        lora=dict(r=8, alpha=16, target_modules=["query_key_value"], seed=102),
        data_seed=1002,
    ),
    # RW-style: alibi, biases, sequential (non-parallel) attention, interleaved qkv, 8-bit,
    # gptq_v2 zeros, fp32 dense tensors. 6 heads: exercises the non-power-of-two alibi slopes
    # while keeping every slope a power of two (exact in bf16, see README).
    "rw8": dict(
        checkpoint=dict(preset="tiny-rw", bits=8, group_size=32, desc_act=False, checkpoint_format="gptq_v2",
                        dense_dtype="float32", lm_head=False, bias=True, seed=13),
        config_overrides=dict(hidden_size=96, num_attention_heads=6, num_kv_heads=6),
        lora=dict(r=4, alpha=16, target_modules=["query_key_value", "dense_4h_to_h"], seed=103),
        data_seed=1003,
    ),
    # 7B-style, 2-bit g64 act-order, bf16 dense tensors.
    "mq2": dict(
        checkpoint=dict(preset="tiny", bits=2, group_size=64, desc_act=True, checkpoint_format="gptq",
                        dense_dtype="bfloat16", lm_head=False, bias=None, seed=14),
        # hidden 128 so every linear has >= 2 groups of 64: act-order (permuted g_idx) everywhere
        config_overrides=dict(hidden_size=128, num_attention_heads=8, num_kv_heads=8),
        lora=dict(r=8, alpha=32, target_modules=["dense", "dense_h_to_4h"], seed=104),
        data_seed=1004,
    ),
}

# Inputs
TRAIN_LENGTHS = (11, 8, 5)          # right padding, B=3, T=11
GEN_LENGTHS = (6, 4)                # left padding, B=2, T=6
MAX_NEW_TOKENS = 8
N_EXTRA_IGNORED = 2                 # random -100 labels per row (inside the valid region)
MIN_GREEDY_MARGIN = 1e-2            # top1 - top2 float64 logit gap required at every greedy step
PAD_ID = 0


# --------------------------------------------------------------------------------------------
# Independent GPTQ dequantizer (bit stream, LSB first, 32-bit words).
# --------------------------------------------------------------------------------------------
def _unpack_bitstream(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """Unpack `count` values of `bits` bits packed LSB-first along `axis` of int32 `words`.

    A run of n 32-bit words is read as one little-endian stream of 32*n bits; value k occupies
    bits [k*bits, (k+1)*bits). This covers AutoGPTQ's 2/4/8-bit packing and its 3-bit packing
    (32 values in 3 words, values straddling word boundaries)."""
    w = np.moveaxis(np.asarray(words), axis, 0).astype(np.int64) & 0xFFFFFFFF
    w = w.astype(np.uint64)
    n_words = w.shape[0]
    if n_words * 32 < count * bits:
        raise ValueError(f"packed array too short: {n_words} words for {count} x {bits}-bit values")
    padded = np.concatenate([w, np.zeros((1,) + w.shape[1:], dtype=np.uint64)], axis=0)
    k = np.arange(count)
    off = k * bits
    wi = off // 32
    sh = (off % 32).astype(np.uint64)
    lo = padded[wi]
    hi = padded[wi + 1]
    both = lo | (hi << np.uint64(32))
    shape = (count,) + (1,) * (w.ndim - 1)
    vals = (both >> sh.reshape(shape)) & np.uint64((1 << bits) - 1)
    return np.moveaxis(vals.astype(np.int64), 0, axis)


def dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str) -> np.ndarray:
    """W[i, o] = scales[g[i], o] * (q[i, o] - z[g[i], o]); z = stored + 1 (gptq v1) or stored (v2)."""
    in_features = int(np.asarray(g_idx).shape[0])
    out_features = int(np.asarray(qweight).shape[1])
    q = _unpack_bitstream(qweight, bits, in_features, axis=0)            # [in, out]
    z = _unpack_bitstream(qzeros, bits, out_features, axis=1)            # [groups, out]
    if checkpoint_format == "gptq":
        z = z + 1
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    s = np.asarray(scales, dtype=np.float64)
    g = np.asarray(g_idx).astype(np.int64)
    return s[g, :] * (q - z[g, :]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# HF model construction
# --------------------------------------------------------------------------------------------
def _hf_config(model_dir: Path, has_lm_head: bool):
    from transformers import FalconConfig

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)      # we load dequantized float64 weights ourselves
    cfg.pop("auto_map", None)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    config = FalconConfig.from_dict(cfg)
    # DESIGN: lm_head is tied to word_embeddings unless lm_head.weight is present in the file.
    config.tie_word_embeddings = not has_lm_head
    config.hidden_dropout = 0.0
    config.attention_dropout = 0.0
    config.use_cache = True
    try:
        config._attn_implementation = "eager"
    except Exception:  # pragma: no cover - older setter semantics
        config.attn_implementation = "eager"
    return config, cfg


def _read_safetensors_f64(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _find_weights(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .safetensors file in {model_dir}, found {files}")
    return files[0]


@contextlib.contextmanager
def reference_numerics():
    """Patch HF Falcon (inside the block) so that it computes the reference we want:

    * rotary cos/sin in float64. HF builds ``inv_freq`` and ``position * inv_freq`` in float32 and
      only casts cos/sin to the activation dtype afterwards (~1e-7 relative error);
    * the alibi bias added exactly once. transformers 5.x folds ``alibi / sqrt(head_dim)`` into
      the 4D causal mask in ``FalconModel.forward`` *and* the eager attention still computes
      ``(scores + alibi) / sqrt(head_dim) + mask``, i.e. the bias is applied twice. The original
      RW code and transformers 4.x apply it once. When the doubling is detected (a probe on a
      1-layer model) the tensor ``build_alibi_tensor`` returns is divided by the multiplicity;
      halving is exact, so the result equals single-alibi attention bit for bit.

    Yields the alibi multiplicity found in the installed transformers (1 or 2)."""
    import transformers.models.falcon.modeling_falcon as mf

    factor = _alibi_multiplicity(mf)
    orig_alibi = mf.build_alibi_tensor
    orig_rope = mf.FalconRotaryEmbedding.forward

    def alibi(attention_mask, num_heads, dtype):
        return orig_alibi(attention_mask, num_heads, dtype) / factor

    def rope64(self, x, position_ids):
        rp = getattr(self.config, "rope_parameters", None) or {}
        rope_type = rp.get("rope_type", getattr(self, "rope_type", "default"))
        if rope_type != "default":
            raise RuntimeError(f"reference rope: only the default rope type is supported, got {rope_type!r}")
        base = float(rp.get("rope_theta", getattr(self.config, "rope_theta", 10000.0)))
        dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    if factor != 1:
        mf.build_alibi_tensor = alibi
    mf.FalconRotaryEmbedding.forward = rope64
    try:
        yield factor
    finally:
        mf.build_alibi_tensor = orig_alibi
        mf.FalconRotaryEmbedding.forward = orig_rope


_ALIBI_MULT_CACHE: dict[int, int] = {}


def _alibi_multiplicity(mf) -> int:
    """How many times HF's eager path adds the alibi bias (1 or 2), measured on a 1-layer model."""
    key = id(mf)
    if key in _ALIBI_MULT_CACHE:
        return _ALIBI_MULT_CACHE[key]
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    H, D, T = 4, 8, 7
    cfg = FalconConfig(vocab_size=32, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                       alibi=True, bias=False, multi_query=False, parallel_attn=True,
                       new_decoder_architecture=False, hidden_dropout=0.0, attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    m = FalconForCausalLM(cfg).to(torch.float64).eval()
    ids = torch.arange(T).unsqueeze(0) % 32
    with torch.no_grad():
        probs = m(ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions[0][0]
        layer = m.transformer.h[0]
        x = layer.input_layernorm(m.transformer.word_embeddings(ids))
        qkv = layer.self_attention.query_key_value(x).view(1, T, H, 3, D)
        q = qkv[..., 0, :].transpose(1, 2)[0]
        k = qkv[..., 1, :].transpose(1, 2)[0]
        scores = q @ k.transpose(-1, -2)
        slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
        pos = torch.arange(T, dtype=torch.float64)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        best, best_err = None, None
        for mult in (1, 2):
            logits = (scores + mult * slopes[:, None, None] * pos) / math.sqrt(D)
            p = logits.masked_fill(causal, float("-inf")).softmax(-1)
            err = (p - probs).abs().max().item()
            if best_err is None or err < best_err:
                best, best_err = mult, err
    if best_err > 1e-12:
        raise RuntimeError(f"cannot explain HF's alibi attention (closest multiplicity {best}, err {best_err:g})")
    _ALIBI_MULT_CACHE[key] = best
    return best


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes as HF/BLOOM define them (before HF's bfloat16 rounding)."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
    slopes = [base ** k for k in range(1, p + 1)]
    if p != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
        n = min(p, num_heads - p)
        slopes += [extra ** k for k in range(1, 2 * n, 2)]
    return slopes


def build_hf_model(model_dir: Path, ckpt_kwargs: dict):
    """FalconForCausalLM in float64 holding the dequantized checkpoint. Returns (model, info)."""
    from transformers import FalconForCausalLM

    import falcontune.testing as fttest
    from falcontune.weights import WeightStore, to_float32

    wfile = _find_weights(model_dir)
    raw = _read_safetensors_f64(wfile)
    has_lm_head = "lm_head.weight" in raw
    config, cfg_json = _hf_config(model_dir, has_lm_head)
    qcfg = json.loads((model_dir / "quantize_config.json").read_text())
    bits = int(qcfg["bits"])
    fmt = qcfg.get("checkpoint_format", "gptq")
    assert bits == ckpt_kwargs["bits"], (bits, ckpt_kwargs)
    assert fmt == ckpt_kwargs["checkpoint_format"], (fmt, ckpt_kwargs)
    assert bool(has_lm_head) == bool(ckpt_kwargs["lm_head"]), "lm_head presence differs from the request"

    torch.manual_seed(0)
    model = FalconForCausalLM(config).to(torch.float64)
    model.eval()
    params = dict(model.named_parameters())
    assigned: set[str] = set()
    store = WeightStore.open(wfile)

    def put(pname: str, value: np.ndarray) -> None:
        p = params[pname]
        t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        if tuple(p.shape) != tuple(t.shape):
            raise RuntimeError(f"{pname}: HF shape {tuple(p.shape)} vs checkpoint {tuple(t.shape)}")
        with torch.no_grad():
            p.copy_(t)
        assigned.add(pname)

    dense_dtypes = set()
    quantized_prefixes = sorted({n[: -len(".qweight")] for n in raw if n.endswith(".qweight")})
    for name, t in raw.items():
        if name.endswith(tuple("." + s for s in QUANT_SUFFIXES)):
            continue
        if name.endswith(".bias") and name[: -len(".bias")] in quantized_prefixes:
            continue  # handled with its linear below
        dense_dtypes.add(str(t.dtype))
        val = t.to(torch.float64).numpy()
        # cross-check falcontune.weights against safetensors.torch
        ours = to_float32(store.tensor(name), store.dtype(name)).astype(np.float64)
        if not np.array_equal(ours, val):
            raise RuntimeError(f"falcontune.weights disagrees with safetensors on {name}")
        put(name, val)

    for prefix in quantized_prefixes:
        qw, qz, sc, gi = (raw[f"{prefix}.{s}"] for s in QUANT_SUFFIXES)
        assert qw.dtype == torch.int32 and qz.dtype == torch.int32 and gi.dtype == torch.int32, prefix
        assert sc.dtype == torch.float16, (prefix, sc.dtype)
        W = dequantize_reference(qw.numpy(), qz.numpy(), sc.to(torch.float64).numpy(), gi.numpy(), bits, fmt)
        W_ft = np.asarray(fttest.gptq_dequantize(qw.numpy(), qz.numpy(), sc.numpy(), gi.numpy(), bits,
                                                 checkpoint_format=fmt), dtype=np.float64)
        if W_ft.shape != W.shape:
            raise RuntimeError(f"{prefix}: gptq_dequantize shape {W_ft.shape} vs reference {W.shape}")
        if not np.array_equal(W_ft, W):
            err = float(np.max(np.abs(W_ft - W)))
            raise RuntimeError(f"{prefix}: gptq_dequantize differs from the independent unpacker (max {err:g})")
        put(prefix + ".weight", W.T)
        if f"{prefix}.bias" in raw:
            put(prefix + ".bias", raw[f"{prefix}.bias"].to(torch.float64).numpy())
    store.close()

    expected = set(params)
    if config.tie_word_embeddings:
        # tied: lm_head.weight is the very same Parameter as the embeddings (not in named_parameters)
        assert model.lm_head.weight is model.transformer.word_embeddings.weight, "lm_head not tied"
    missing = expected - assigned
    extra = assigned - expected
    if missing or extra:
        raise RuntimeError(f"weights not matched: missing {sorted(missing)}, unexpected {sorted(extra)}")

    # sanity: what HF holds is what we dequantized
    for prefix in quantized_prefixes:
        qw, qz, sc, gi = (raw[f"{prefix}.{s}"] for s in QUANT_SUFFIXES)
        W_ft = np.asarray(fttest.gptq_dequantize(qw.numpy(), qz.numpy(), sc.numpy(), gi.numpy(), bits,
                                                 checkpoint_format=fmt), dtype=np.float64)
        mod = model.get_submodule(prefix)
        assert np.array_equal(mod.weight.detach().numpy().T, W_ft), prefix

    info = dict(
        config_json=cfg_json,
        bits=bits,
        checkpoint_format=fmt,
        group_size=int(qcfg.get("group_size", -1)),
        desc_act=bool(qcfg.get("desc_act", False)),
        has_lm_head=has_lm_head,
        dense_dtypes=sorted(dense_dtypes),
        n_quantized=len(quantized_prefixes),
        # linears whose g_idx is not sorted (act-order actually exercised)
        n_act_order=sum(int(np.any(np.diff(raw[f"{p}.g_idx"].numpy()) < 0)) for p in quantized_prefixes),
        weights_file=wfile.name,
    )
    return model, config, info


# --------------------------------------------------------------------------------------------
# Independent float64 numpy forward (cross-checks HF + our reading of DESIGN.md)
# --------------------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # type: ignore

        return erf(x)
    except Exception:
        return np.vectorize(math.erf, otypes=[np.float64])(x)


def numpy_forward(pm, hf_config, lora_scaling: float, ids: np.ndarray, mask: np.ndarray,
                  use_lora: bool = True) -> np.ndarray:
    """Falcon forward in float64 numpy from the PEFT model's tensors, written from DESIGN.md:
    positions cumsum(mask) - 1; NeoX rotary or single alibi ((q.k + slope * key_pos) / sqrt(d));
    key j visible to query i iff j <= i and mask[j] == 1. Returns logits [B, T, V]."""
    P = {_strip_adapter_name(n): p.detach().to(torch.float64).numpy() for n, p in pm.named_parameters()}
    P.update({_strip_adapter_name(n): b.detach().to(torch.float64).numpy() for n, b in pm.named_buffers()})
    pre = "base_model.model."
    c = hf_config
    H = c.num_attention_heads
    D = c.hidden_size // H
    new_arch = bool(c.new_decoder_architecture)
    KV = c.num_kv_heads if (new_arch or not c.multi_query) else 1
    eps = c.layer_norm_epsilon

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * P[pre + name + ".weight"] + P[pre + name + ".bias"]

    def linear(x, name):
        w = P.get(pre + name + ".base_layer.weight", P.get(pre + name + ".weight"))
        y = x @ w.T
        b = P.get(pre + name + ".base_layer.bias", P.get(pre + name + ".bias"))
        if b is not None:
            y = y + b
        a_key = pre + name + ".lora_A.weight"
        if use_lora and a_key in P:
            y = y + (x @ P[a_key].T) @ P[pre + name + ".lora_B.weight"].T * lora_scaling
        return y

    B, T = ids.shape
    pos = position_ids_from_mask(mask).astype(np.float64)              # [B, T]
    x = P[pre + "transformer.word_embeddings.weight"][ids]
    visible = (np.tril(np.ones((T, T), dtype=bool))[None] & (mask[:, None, :] == 1))  # [B, Tq, Tk]
    if c.alibi:
        slopes = np.asarray(alibi_slopes(H))
    else:
        theta = float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 1e4)))
        inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
        ang = pos[..., None] * inv                                      # [B, T, D/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]           # [B, 1, T, D]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]

        def rot(t):
            t1, t2 = t[..., : D // 2], t[..., D // 2:]
            return t * cos + np.concatenate([-t2, t1], -1) * sin

    for i in range(c.num_hidden_layers):
        L = f"transformer.h.{i}"
        if new_arch and c.num_ln_in_parallel_attn == 2:
            xa, xm = ln(x, L + ".ln_attn"), ln(x, L + ".ln_mlp")
        else:
            xa = ln(x, L + ".input_layernorm")
            xm = xa
        qkv = linear(xa, L + ".self_attention.query_key_value")
        if new_arch:
            g = qkv.reshape(B, T, KV, H // KV + 2, D)
            q = g[:, :, :, :-2].reshape(B, T, H, D)
            k = np.repeat(g[:, :, :, -2], H // KV, axis=2)
            v = np.repeat(g[:, :, :, -1], H // KV, axis=2)
        elif c.multi_query:
            g = qkv.reshape(B, T, H + 2, D)
            q = g[:, :, :H]
            k = np.repeat(g[:, :, H:H + 1], H, axis=2)
            v = np.repeat(g[:, :, H + 1:H + 2], H, axis=2)
        else:
            g = qkv.reshape(B, T, H, 3, D)
            q, k, v = g[..., 0, :], g[..., 1, :], g[..., 2, :]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))        # [B, H, T, D]
        s = q @ k.transpose(0, 1, 3, 2)
        if c.alibi:
            s = s + slopes[None, :, None, None] * pos[:, None, None, :]
        else:
            q, k = rot(q), rot(k)
            s = q @ k.transpose(0, 1, 3, 2)
        s = s / math.sqrt(D)
        s = np.where(visible[:, None], s, -np.inf)
        s = s - np.max(np.where(np.isfinite(s), s, -1e300), -1, keepdims=True)
        p = np.exp(s)
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
        attn = linear(o, L + ".self_attention.dense")
        if not (new_arch or c.parallel_attn):
            x_res = x + attn
            xm = ln(x_res, L + ".post_attention_layernorm")
            h = linear(xm, L + ".mlp.dense_h_to_4h")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = x_res + linear(h, L + ".mlp.dense_4h_to_h")
        else:
            h = linear(xm, L + ".mlp.dense_h_to_4h")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = x + attn + linear(h, L + ".mlp.dense_4h_to_h")
    x = ln(x, "transformer.ln_f")
    head = P.get(pre + "lm_head.weight", P[pre + "transformer.word_embeddings.weight"])
    return x @ head.T


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def _strip_adapter_name(name: str, adapter: str = "default") -> str:
    return name.replace(f".{adapter}.", ".")


def add_lora(model, config, ft_config, lora: dict, adapter_dir: Path):
    """Wrap with PEFT, set the weights from random_lora, save with PEFT. Returns (peft_model, lora_sd)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    import falcontune.testing as fttest

    lcfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    pm = pm.to(torch.float64)
    sd = fttest.random_lora(ft_config, lora["r"], list(lora["target_modules"]), lora["seed"])
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in sd.items()}

    lora_params = {_strip_adapter_name(n): p for n, p in pm.named_parameters() if "lora_" in n}
    if set(lora_params) != set(sd):
        raise RuntimeError("random_lora keys differ from PEFT's:\n  only random_lora: "
                           f"{sorted(set(sd) - set(lora_params))}\n  only PEFT: {sorted(set(lora_params) - set(sd))}")
    for k, v in sd.items():
        if not np.any(v):
            raise RuntimeError(f"random_lora gave an all-zero tensor for {k}")
        if tuple(lora_params[k].shape) != v.shape:
            raise RuntimeError(f"{k}: PEFT shape {tuple(lora_params[k].shape)} vs random_lora {v.shape}")

    # Save through PEFT with float32 tensors (what real adapters hold), then keep float64 in memory.
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.from_numpy(sd[_strip_adapter_name(n)].copy())  # float32
    result = set_peft_model_state_dict(pm, {k: torch.from_numpy(v.copy()) for k, v in sd.items()})
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"set_peft_model_state_dict: unexpected keys {unexpected}")
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    pm.save_pretrained(str(adapter_dir), safe_serialization=True)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.float64)

    # The saved file must hold exactly our tensors under the expected names.
    from safetensors.numpy import load_file as np_load

    saved = np_load(str(adapter_dir / "adapter_model.safetensors"))
    if set(saved) != set(sd):
        raise RuntimeError(f"PEFT saved keys {sorted(saved)} != expected {sorted(sd)}")
    for k in sd:
        if saved[k].dtype != np.float32 or not np.array_equal(saved[k], sd[k]):
            raise RuntimeError(f"PEFT saved {k} differently ({saved[k].dtype})")
    acfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    assert int(acfg["r"]) == lora["r"] and float(acfg["lora_alpha"]) == lora["alpha"], acfg
    # PEFT writes target_modules from a Python set: order varies with hash randomization.
    # Sort it so the file is byte-for-byte reproducible (content unchanged).
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
        acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    # Keep the adapter dir free of machine-specific noise (README.md written by PEFT is large-ish).
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()
    return pm, sd


# --------------------------------------------------------------------------------------------
# Inputs, loss, generation
# --------------------------------------------------------------------------------------------
def make_train_batch(rng: np.random.Generator, vocab: int):
    B, T = len(TRAIN_LENGTHS), max(TRAIN_LENGTHS)
    ids = rng.integers(1, vocab, size=(B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(TRAIN_LENGTHS):
        mask[b, :n] = 1
    ids[mask == 0] = PAD_ID
    labels = ids.copy()
    labels[mask == 0] = -100
    for b, n in enumerate(TRAIN_LENGTHS):
        pos = rng.choice(np.arange(1, n), size=N_EXTRA_IGNORED, replace=False)
        labels[b, pos] = -100
    return ids, mask, labels


def make_gen_prompts(rng: np.random.Generator, vocab: int):
    B, T = len(GEN_LENGTHS), max(GEN_LENGTHS)
    ids = np.full((B, T), PAD_ID, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(GEN_LENGTHS):
        ids[b, T - n:] = rng.integers(1, vocab, size=n)
        mask[b, T - n:] = 1
    return ids, mask


def causal_lm_loss_f64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted mean cross-entropy over labels != -100, all in float64 (HF's loss_function casts
    the logits to float32 first, which would spoil the float64 reference)."""
    V = logits.shape[-1]
    lg = logits[:, :-1, :].reshape(-1, V)
    tg = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(lg, tg, ignore_index=-100, reduction="mean")


def _gen_config(pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                            eos_token_id=None, bos_token_id=None, pad_token_id=pad_id,
                            return_dict_in_generate=True)


def greedy_generate(model, ids: np.ndarray, mask: np.ndarray):
    """HF greedy generation (use_cache True and False must agree), verified in float64.

    HF's generate() takes the argmax of float32-cast logits; we re-run a float64 forward over the
    whole generated sequence (positions cumsum(mask) - 1, as generate() uses) and check every
    generated token is that argmax. Returns (tokens [B, T + new], smallest top1 - top2 gap of the
    float64 logits over all steps, float64 logits of the whole sequence [B, T + new, V])."""
    seqs = []
    for use_cache in (True, False):
        gc = _gen_config(PAD_ID)
        gc.use_cache = use_cache
        with torch.no_grad():
            g = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               generation_config=gc)
        seq = g.sequences.numpy().astype(np.int64)
        if seq.shape != (ids.shape[0], ids.shape[1] + MAX_NEW_TOKENS):
            raise RuntimeError(f"generation stopped early: shape {seq.shape}")
        if not np.array_equal(seq[:, : ids.shape[1]], ids):
            raise RuntimeError("generate() changed the prompt")
        seqs.append(seq)
    if not np.array_equal(seqs[0], seqs[1]):
        raise RuntimeError("HF greedy generation differs between use_cache=True and False")
    seq = seqs[0]
    T = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((mask.shape[0], MAX_NEW_TOKENS), dtype=mask.dtype)], axis=1)
    with torch.no_grad():
        lg = model(input_ids=torch.from_numpy(seq), attention_mask=torch.from_numpy(full_mask),
                   position_ids=torch.from_numpy(position_ids_from_mask(full_mask)),
                   use_cache=False).logits.to(torch.float64)
    steps = lg[:, T - 1: T - 1 + MAX_NEW_TOKENS, :]                      # predicts seq[:, T:]
    if not torch.equal(steps.argmax(-1), torch.from_numpy(seq[:, T:])):
        raise RuntimeError("HF's greedy tokens are not the argmax of the float64 logits")
    top2 = torch.topk(steps, 2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).min())
    return seq, gap, lg.numpy()


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """HF generate()'s convention: cumsum(mask) - 1, pads at 0."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 0
    return pos.astype(np.int64)


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------
def build_variant(name: str, spec: dict, out: Path, verbose: bool = True) -> dict:
    import falcontune.testing as fttest
    from falcontune.models import parse_config

    vdir = out / name
    model_dir = vdir / "model"
    adapter_dir = vdir / "adapter"
    if vdir.exists():
        shutil.rmtree(vdir)
    model_dir.mkdir(parents=True)

    ck = dict(spec["checkpoint"])
    overrides = dict(spec.get("config_overrides", {}))
    fttest.make_checkpoint(model_dir, **ck, **overrides)
    cfg_json = json.loads((model_dir / "config.json").read_text())
    ft_config = parse_config(cfg_json)

    model, hf_config, info = build_hf_model(model_dir, ck)
    V = hf_config.vocab_size
    lora = spec["lora"]

    pm, lora_sd = add_lora(model, hf_config, ft_config, lora, adapter_dir)
    pm.eval()

    rng = np.random.default_rng(spec["data_seed"])
    ids, mask, labels = make_train_batch(rng, V)

    with reference_numerics() as alibi_mult:
        # ---- forward + loss + backward with the adapter
        pm.zero_grad(set_to_none=True)
        with torch.enable_grad():
            outp = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      labels=torch.from_numpy(labels), use_cache=False)
            logits_t = outp.logits
            assert logits_t.dtype == torch.float64
            loss_t = causal_lm_loss_f64(logits_t, torch.from_numpy(labels))
            loss_t.backward()
        hf_loss = float(outp.loss.detach())  # HF computes it from float32-cast logits
        loss = float(loss_t.detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: loss is not finite")
        if abs(hf_loss - loss) > 1e-5 * max(1.0, abs(loss)):
            raise RuntimeError(f"{name}: HF loss {hf_loss} vs float64 loss {loss}")
        logits = logits_t.detach().numpy().astype(np.float64)

        grads = {}
        for n, p in pm.named_parameters():
            if "lora_" not in n:
                continue
            if p.grad is None:
                raise RuntimeError(f"{name}: no gradient for {n}")
            g = p.grad.detach().numpy().astype(np.float64)
            if not np.any(g):
                raise RuntimeError(f"{name}: zero gradient for {n}")
            grads[_strip_adapter_name(n)] = g
        if set(grads) != set(lora_sd):
            raise RuntimeError(f"{name}: grad keys differ from the adapter keys")
        # no gradient may reach frozen base weights
        for n, p in pm.named_parameters():
            if "lora_" not in n and p.requires_grad:
                raise RuntimeError(f"{name}: base parameter {n} is trainable")

        with torch.no_grad():
            with pm.disable_adapter():
                logits_base = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 use_cache=False).logits.numpy().astype(np.float64)
        diff = np.abs(logits_base - logits)[mask == 1].max()
        if not diff > 0:
            raise RuntimeError(f"{name}: the adapter does not change the logits")

        # independent numpy forward (with and without the adapter) must agree with HF
        scaling = lora["alpha"] / lora["r"]
        m = mask == 1
        np_err = max(rel_err(numpy_forward(pm, hf_config, scaling, ids, mask)[m], logits[m]),
                     rel_err(numpy_forward(pm, hf_config, scaling, ids, mask, use_lora=False)[m], logits_base[m]))
        if not np_err < 1e-10:
            raise RuntimeError(f"{name}: numpy reference forward disagrees with HF (rel {np_err:g})")

        # directional derivative of the float64 loss vs the autograd LoRA gradients
        lora_named = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
        drng = np.random.default_rng(spec["data_seed"] + 7)
        dirs = {n: torch.from_numpy(drng.standard_normal(tuple(p.shape))) for n, p in lora_named}
        analytic = sum(float((grads[_strip_adapter_name(n)] * dirs[n].numpy()).sum()) for n, _ in lora_named)
        h = 1e-5
        fd_losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for n, p in lora_named:
                    p.add_(dirs[n], alpha=sign * h)
                lg = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False).logits
                fd_losses.append(float(causal_lm_loss_f64(lg, torch.from_numpy(labels))))
                for n, p in lora_named:
                    p.sub_(dirs[n], alpha=sign * h)
        numeric = (fd_losses[0] - fd_losses[1]) / (2 * h)
        fd_err = abs(numeric - analytic) / max(abs(analytic), 1e-12)
        if not fd_err < 1e-5:
            raise RuntimeError(f"{name}: finite-difference check of LoRA grads failed ({numeric} vs {analytic})")

        # ---- greedy generation, left padding; re-draw prompts until greedy choices are clear-cut
        # and no generated token is the config's eos/bos (so no stopping policy can matter)
        special = {t for t in (hf_config.eos_token_id, hf_config.bos_token_id, PAD_ID) if isinstance(t, int)}
        for attempt in range(50):
            gids, gmask = make_gen_prompts(rng, V)
            seq_l, gap_l, glog_l = greedy_generate(pm, gids, gmask)
            with pm.disable_adapter():
                seq_b, gap_b, glog_b = greedy_generate(pm, gids, gmask)
            new_tokens = set(seq_l[:, gids.shape[1]:].ravel().tolist()) | set(seq_b[:, gids.shape[1]:].ravel().tolist())
            if min(gap_l, gap_b) >= MIN_GREEDY_MARGIN and not (new_tokens & special):
                break
        else:
            raise RuntimeError(f"{name}: could not find prompts with a clear greedy margin")
        gen_attempts = attempt + 1
        for seq, glog, use_lora in ((seq_l, glog_l, True), (seq_b, glog_b, False)):
            fm = np.concatenate([gmask, np.ones((gmask.shape[0], MAX_NEW_TOKENS), dtype=gmask.dtype)], axis=1)
            ref_np = numpy_forward(pm, hf_config, scaling, seq, fm, use_lora=use_lora)
            e = rel_err(ref_np[fm == 1], glog[fm == 1])
            if not e < 1e-10:
                raise RuntimeError(f"{name}: numpy forward disagrees with HF on the left-padded batch (rel {e:g})")

    meta = dict(
        variant=name,
        checkpoint=ck,
        config_overrides=overrides,
        lora=dict(r=lora["r"], alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                  seed=lora["seed"], scaling=lora["alpha"] / lora["r"]),
        data_seed=spec["data_seed"],
        pad_id=PAD_ID,
        train_lengths=list(TRAIN_LENGTHS),
        gen_lengths=list(GEN_LENGTHS),
        max_new_tokens=MAX_NEW_TOKENS,
        gen_attempts=gen_attempts,
        hf_alibi_multiplicity=alibi_mult if hf_config.alibi else None,
        hf_loss_float32_logits=hf_loss,
        weights=info,
        versions=dict(torch=torch.__version__, transformers=_version("transformers"), peft=_version("peft")),
    )

    arrays = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "logits": logits,
        "logits_base": logits_base,
        "loss": np.asarray(loss, dtype=np.float64),
        "gen_input_ids": gids,
        "gen_attention_mask": gmask,
        "gen_position_ids": position_ids_from_mask(gmask),
        "gen_ids_lora": seq_l,
        "gen_ids_base": seq_b,
        "gen_logits_lora": glog_l,
        "gen_logits_base": glog_b,
        "gen_min_margin_lora": np.asarray(gap_l, dtype=np.float64),
        "gen_min_margin_base": np.asarray(gap_b, dtype=np.float64),
        "meta_json": np.asarray(json.dumps(meta, sort_keys=True)),
    }
    for k, v in sorted(grads.items()):
        arrays["grad/" + k] = v
    for k, v in sorted(lora_sd.items()):
        arrays["lora/" + k] = v
    np.savez_compressed(vdir / "expected.npz", **arrays)

    if verbose:
        print(f"[{name}] V={V} layers={hf_config.num_hidden_layers} hidden={hf_config.hidden_size} "
              f"heads={hf_config.num_attention_heads} kv={_kv_heads(hf_config)} bits={info['bits']} "
              f"g={info['group_size']} desc_act={info['desc_act']} fmt={info['checkpoint_format']} "
              f"act-order linears={info['n_act_order']}/{info['n_quantized']} "
              f"dense={info['dense_dtypes']} lm_head={'stored' if info['has_lm_head'] else 'tied'}")
        print(f"[{name}] loss={loss:.10f} (HF float32-logit loss {hf_loss:.10f}); grads={len(grads)}; "
              f"greedy margins lora={gap_l:.4g} base={gap_b:.4g}; numpy-vs-HF rel {np_err:.2g}; "
              f"finite-difference rel {fd_err:.2g}; "
              f"alibi x{alibi_mult if hf_config.alibi else '-'}")
    return dict(model=pm, ids=ids, mask=mask, logits=logits, gids=gids, gmask=gmask)


def _kv_heads(c) -> int:
    if c.new_decoder_architecture or not c.multi_query:
        return c.num_kv_heads
    return 1


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# Optional: our engine's save_lora loads in PEFT and agrees with HF
# --------------------------------------------------------------------------------------------
def _engine():
    try:
        import falcontune as ft
    except Exception:
        return None
    if not callable(getattr(ft, "load_model", None)):
        return None
    return ft


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def engine_check(name: str, spec: dict, out: Path, tol: float = 1e-4) -> bool:
    """Load our model + adapter, save_lora with ours, load that adapter into HF+PEFT, compare."""
    ft = _engine()
    if ft is None:
        return True
    from peft import PeftModel

    vdir = out / name
    ck = spec["checkpoint"]
    ok = True
    ours = ft.load_model(str(vdir / "model"), device="cpu")
    ours.load_lora(str(vdir / "adapter"))
    ours.eval()
    ref = np.load(vdir / "expected.npz")
    ids, mask = ref["input_ids"], ref["attention_mask"]
    our_logits = np.asarray(ours.forward(ids, mask), dtype=np.float64)
    with tempfile.TemporaryDirectory() as td:
        saved = Path(td) / "adapter_ours"
        ours.save_lora(str(saved))
        base, _, _ = build_hf_model(vdir / "model", ck)
        with reference_numerics():
            pm = PeftModel.from_pretrained(base, str(saved), is_trainable=False)
            pm = pm.to(torch.float64).eval()
            with torch.no_grad():
                hf_logits = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               use_cache=False).logits.numpy()
    m = mask == 1
    e1 = rel_err(our_logits[m], hf_logits[m])
    e2 = rel_err(hf_logits[m], ref["logits"][m])
    status = "OK" if (e1 < tol and e2 < tol) else "MISMATCH"
    print(f"[{name}] engine check: ours vs HF+PEFT(our saved adapter) rel={e1:.3g}; "
          f"HF+PEFT(our adapter) vs golden rel={e2:.3g} -> {status}")
    if status != "OK":
        ok = False
    return ok


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE), help="output directory (default: tests/golden)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--no-engine-check", action="store_true",
                    help="skip the optional check against falcontune's engine")
    args = ap.parse_args(argv)

    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-stable reductions across machines

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")

    for v in names:
        build_variant(v, VARIANTS[v], out)

    total = sum(f.stat().st_size for v in names for f in (out / v).rglob("*") if f.is_file())
    print(f"wrote {len(names)} variants to {out} ({total / 1024:.1f} KiB)")

    if args.no_engine_check:
        return 0
    if _engine() is None:
        print("engine check skipped: falcontune.load_model not available yet")
        return 0
    ok = True
    for v in names:
        try:
            ok = engine_check(v, VARIANTS[v], out) and ok
        except Exception as exc:  # report and fail
            print(f"[{v}] engine check FAILED: {type(exc).__name__}: {exc}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
