"""``-c/--checkpoint``: fold the LoRA adapter into the dequantized weights and write a
float16 Hugging Face checkpoint (config.json + safetensors) that ``transformers`` loads
as ``FalconForCausalLM``.

Dequantization is done layer by layer with numpy (``testing.gptq_dequantize``), and the
output is written in shards of at most ``max_shard_bytes`` (HF naming and
``model.safetensors.index.json``), so peak memory stays around one shard plus one
dequantized linear, not the whole model. The directory is built under a hidden
temporary name and renamed into place when complete.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from .checkpoint import _hidden_tmp, replace_dir, write_json
from .layout import MODULES, lora_key
from .models import config_to_hf_dict
from .testing import gptq_dequantize
from .weights import save_safetensors, to_float32

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


def _lora_delta(model: Any, lora: dict[str, np.ndarray], layer: int, module: str) -> Optional[np.ndarray]:
    """scaling * B @ A ([out, in], float64), or None when the module has no adapter."""
    cfg = model.lora_config
    if not cfg or module not in cfg["target_modules"]:
        return None
    A, B = lora[lora_key(layer, module, "A")], lora[lora_key(layer, module, "B")]
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return scaling * (B.astype(np.float64) @ A.astype(np.float64))


def _dense(store: Any, name: str) -> np.ndarray:
    return to_float32(store.tensor(name), store.dtype(name)).astype(np.float16)


def _linear_weight(model: Any, store: Any, base: str, fin: int, lora_delta: Optional[np.ndarray]) -> np.ndarray:
    """HF nn.Linear weight [out, in] float16 of a GPTQ linear, LoRA folded in."""
    q = model.quantize_config
    g_name = f"{base}.g_idx"
    if store.has(g_name):
        g_idx = np.asarray(store.tensor(g_name))
    else:  # old GPTQ exports: sequential groups
        gs = fin if q.group_size == -1 else q.group_size
        g_idx = (np.arange(fin) // gs).astype(np.int32)
    scales = to_float32(store.tensor(f"{base}.scales"), store.dtype(f"{base}.scales"))
    w = gptq_dequantize(store.tensor(f"{base}.qweight"), store.tensor(f"{base}.qzeros"), scales,
                        g_idx, q.bits, q.checkpoint_format).T  # [out, in] float64
    if lora_delta is not None:
        w = w + lora_delta
    return np.ascontiguousarray(w.astype(np.float16))


def _tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float16 array) in layer order."""
    cfg = model.config
    store = model._store  # the model's own mmapped weights
    lora = model.lora_state_dict() if model.lora_config else {}
    yield "transformer.word_embeddings.weight", _dense(store, "transformer.word_embeddings.weight")
    for layer in range(cfg.num_hidden_layers):
        pre = f"transformer.h.{layer}"
        for ln in cfg.layer_norm_names:
            for p in ("weight", "bias"):
                yield f"{pre}.{ln}.{p}", _dense(store, f"{pre}.{ln}.{p}")
        for module in MODULES:
            fin, _ = cfg.linear_shapes[module.path]
            base = f"{pre}.{module.path}"
            delta = _lora_delta(model, lora, layer, module.name)
            yield f"{base}.weight", _linear_weight(model, store, base, fin, delta)
            if store.has(f"{base}.bias"):
                yield f"{base}.bias", _dense(store, f"{base}.bias")
    for p in ("weight", "bias"):
        yield f"transformer.ln_f.{p}", _dense(store, f"transformer.ln_f.{p}")
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _dense(store, "lm_head.weight")


def _write_tokenizer(model: Any, out: Path) -> None:
    tok = getattr(model, "tokenizer", None)
    src = getattr(tok, "source", None)
    if tok is None or not src or not Path(src).is_file():
        return
    shutil.copyfile(src, out / "tokenizer.json")
    eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else None
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
        "model_max_length": model.config.max_position_embeddings, "clean_up_tokenization_spaces": False})


def merge_and_save(model: Any, out_dir: PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the merged float16 HF checkpoint of ``model`` (base + LoRA) into ``out_dir``."""
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_tmp(final.parent, final.name, "tmp")
    tmp.mkdir()
    try:
        shards: list[list[str]] = []
        shard: dict[str, np.ndarray] = {}
        size = total = 0
        for name, arr in _tensors(model):
            if shard and size + arr.nbytes > max_shard_bytes:
                save_safetensors(tmp / f"shard-{len(shards)}.tmp", shard, metadata={"format": "pt"})
                shards.append(list(shard))
                shard, size = {}, 0
            shard[name] = arr
            size += arr.nbytes
            total += arr.nbytes
        n = len(shards) + 1
        if n == 1:
            save_safetensors(tmp / "model.safetensors", shard, metadata={"format": "pt"})
        else:
            save_safetensors(tmp / f"shard-{len(shards)}.tmp", shard, metadata={"format": "pt"})
            shards.append(list(shard))
            weight_map: dict[str, str] = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / f"shard-{i}.tmp", tmp / fname)
                weight_map.update({k: fname for k in names})
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        config = config_to_hf_dict(model.config)
        config["torch_dtype"] = "float16"
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {
            "bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id})
        _write_tokenizer(model, tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
