"""The peers of the benchmarks: HF transformers FalconForCausalLM, built at the benchmark's shapes
with random weights, either in bf16 or with every decoder linear in bitsandbytes NF4 (QLoRA).

* ``hf_bf16_peft``: all weights bf16 (sdpa attention), PEFT LoRA on query_key_value.
* ``hf_bnb4_qlora``: query_key_value, dense, dense_h_to_4h and dense_4h_to_h of every layer are
  ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization of the scales, bf16 compute, block 64),
  the embedding / lm head and norms bf16 -- what ``from_pretrained(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)``
  builds. PEFT then wraps the NF4 query_key_value with its bitsandbytes LoRA layer. No
  ``prepare_model_for_kbit_training``: it would cast the bf16 weights to fp32 and turn on
  gradient checkpointing, which neither we nor the bf16 peer use.

Both: LoRA r 8, alpha 16, dropout 0.05, fp32 LoRA weights (as ours), bf16 autocast, no
gradient checkpointing. Weights are random: speed and memory do not depend on their values.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

PEERS = ("hf_bf16_peft", "hf_bnb4_qlora")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query_key_value"]}
_LINEARS = {"self_attention": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")}
GiB = float(1 << 30)


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "absent"
    return out


def hf_config(model_config: Mapping[str, Any], layers: int) -> Any:
    from transformers import FalconConfig

    kw = {k: v for k, v in model_config.items() if k not in ("architectures", "model_type")}
    kw["num_hidden_layers"] = layers
    return FalconConfig(**kw)


def _param_counts(cfg: Any) -> tuple[int, int]:
    """(parameters of the decoder linears, all other parameters) of a FalconConfig."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    hd = D // H
    kv = cfg.num_kv_heads if (cfg.new_decoder_architecture or not cfg.multi_query) else 1
    ffn = getattr(cfg, "ffn_hidden_size", None) or 4 * D
    per_layer = D * (H + 2 * kv) * hd + D * D + 2 * D * ffn
    norms = (4 if cfg.new_decoder_architecture else 2) * D
    return cfg.num_hidden_layers * per_layer, cfg.vocab_size * D + cfg.num_hidden_layers * norms + 2 * D


def estimate_bytes(peer: str, cfg: Any, tokens: int) -> tuple[int, int]:
    """(peak while building, peak while training on `tokens` tokens a step), a generous estimate
    used to skip what cannot fit the card; an out-of-memory error is still caught."""
    lin, other = _param_counts(cfg)
    bf16 = 2 * (lin + other)
    weights = bf16 if peer == "hf_bf16_peft" else int(lin * 0.53) + 2 * other  # 4 bits + scales
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    ffn = getattr(cfg, "ffn_hidden_size", None) or 4 * D
    # bf16 activations autograd keeps per token and layer (norm out, qkv, q/k/v, context, mlp in
    # and out, GELU in/out, LoRA input), fp32 logits with their softmax and gradient
    acts = tokens * (L * 2 * (10 * D + 3 * ffn) + 12 * cfg.vocab_size)
    return bf16, weights + acts


def _to_nf4(model: Any, compute_dtype: Any) -> int:
    """Replace every decoder linear by a bitsandbytes NF4 Linear4bit quantized from its weights
    (on the weights' device). Returns the number replaced."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for layer in model.transformer.h:
        for part, names in _LINEARS.items():
            parent = getattr(layer, part)
            for name in names:
                lin = getattr(parent, name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q).to(lin.weight.device)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                n += 1
    return n


def build(peer: str, cfg: Any, device: str = "cuda") -> Any:
    """The peer's FalconForCausalLM with random weights, in eval mode, without LoRA."""
    import torch
    from transformers import FalconForCausalLM

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}: expected one of {PEERS}")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = FalconForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if peer == "hf_bnb4_qlora":
        _to_nf4(model, torch.bfloat16)
        # what from_pretrained(load_in_4bit=True) marks: PEFT picks its bitsandbytes LoRA layer by it
        model.is_loaded_in_4bit = True
        if device != "cpu":
            torch.cuda.empty_cache()
    model.eval()
    return model


def add_lora(model: Any) -> tuple[Any, list[Any], str]:
    """PEFT LoRA as ours (fp32 LoRA weights); returns (model, trainable params, LoRA layer class)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=list(LORA["target_modules"]), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    layer = next(m for n, m in model.named_modules() if n.endswith("query_key_value"))
    return model, params, f"{type(layer).__module__}.{type(layer).__name__}"
