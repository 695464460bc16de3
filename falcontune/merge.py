"""Fold a LoRA adapter into the base weights: ``-c/--checkpoint`` and ``export --format=hf`` write
the result as a float16 Hugging Face checkpoint (config.json + safetensors) that ``transformers``
loads as ``FalconForCausalLM``; export.py writes the same tensors as GGUF.

The base may be GPTQ-packed (dequantized with gptq.py) or float (float16 / bfloat16 / float32
``.weight``, the checkpoints quantized on load: the merge uses the original float weights, not
the engine's quantized copy). Each linear becomes W + scale * B @ A (float64 sum, float32 out).

Tensors are produced one at a time in a fixed plan order, and the HF writer cuts shards of at
most ``max_shard_bytes`` (HF naming and ``model.safetensors.index.json``), so peak memory stays
around one shard plus one dequantized linear. The directory is built under a hidden temporary
name and renamed into place when complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np

from .checkpoint import _hidden_tmp, replace_dir, write_json
from .gptq import gptq_dequantize
from .lora_io import Adapter, lora_scale
from .models import FalconConfig, QuantizeConfig, config_to_hf_dict
from .layout import MODULE_NAMES, MODULES, lora_key
from .weights import WeightStore, save_safetensors, to_float32

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


class MergeError(ValueError):
    """A base checkpoint that cannot be merged (a tensor missing, an unknown layout)."""


@dataclass
class MergeSource:
    """What a merged model is made of: the base checkpoint's tensors and an optional adapter."""

    name: str
    config: FalconConfig
    quantize_config: Optional[QuantizeConfig]  # how GPTQ linears are packed (unused for float ones)
    store: WeightStore
    lora: Mapping[str, np.ndarray]  # PEFT key -> matrix; empty: the base alone
    lora_scale: float
    tokenizer: Any  # falcontune.tokenizer.Tokenizer or None

    @classmethod
    def from_model(cls, model: Any) -> "MergeSource":
        """A loaded FalconModel and its current adapter."""
        cfg = model.lora_config
        scale = lora_scale(cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora"))) if cfg else 0.0
        return cls(model.name, model.config, model.quantize_config, model.store,
                   model.lora_state_dict() if cfg else {}, scale, model.tokenizer)

    @classmethod
    def from_files(cls, ckpt: Any, adapter: Optional[Adapter]) -> "MergeSource":
        """An opened checkpoint (model.open_checkpoint) and an adapter read by lora_io."""
        return cls(ckpt.name, ckpt.config, ckpt.quantize_config, ckpt.store,
                   adapter.tensors if adapter else {}, adapter.scale if adapter else 0.0,
                   ckpt.load_tokenizer())


def _lora_delta(src: MergeSource, layer: int, module: str) -> Optional[np.ndarray]:
    """scale * B @ A ([out, in], float64), or None when the module has no adapter."""
    key_a, key_b = lora_key(layer, module, "A"), lora_key(layer, module, "B")
    if key_a not in src.lora:
        return None
    A, B = src.lora[key_a], src.lora[key_b]
    return src.lora_scale * (B.astype(np.float64) @ A.astype(np.float64))


def _require(store: WeightStore, name: str) -> None:
    if not store.has(name):
        raise MergeError(f"{store.source}: missing tensor {name}")


def _float(store: WeightStore, name: str) -> np.ndarray:
    _require(store, name)
    return to_float32(store.tensor(name), store.dtype(name))


def _base_linear(src: MergeSource, base: str, fin: int) -> np.ndarray:
    """The base weight [out, in] float32 of one linear: dequantized GPTQ, or the float .weight."""
    store = src.store
    if not store.has(f"{base}.qweight"):
        return _float(store, f"{base}.weight")
    q = src.quantize_config
    if q is None:
        raise MergeError(f"{store.source}: {base} is GPTQ-packed but no quantize_config was found")
    for part in ("qzeros", "scales"):
        _require(store, f"{base}.{part}")
    g_name = f"{base}.g_idx"
    if store.has(g_name):
        g_idx = np.asarray(store.tensor(g_name))
    else:  # old GPTQ exports: sequential groups
        gs = fin if q.group_size == -1 else q.group_size
        g_idx = (np.arange(fin) // gs).astype(np.int32)
    scales = to_float32(store.tensor(f"{base}.scales"), store.dtype(f"{base}.scales"))
    w = gptq_dequantize(store.tensor(f"{base}.qweight"), store.tensor(f"{base}.qzeros"), scales,
                        g_idx, q.bits, q.checkpoint_format, dtype=np.float32)
    return w.T  # [out, in] view


def tensor_plan(config: FalconConfig, store: WeightStore) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of the merged model, in the order merged_tensors yields them."""
    h, v = config.hidden_size, config.vocab_size
    plan: list[tuple[str, tuple[int, ...]]] = [("transformer.word_embeddings.weight", (v, h))]
    for layer in range(config.num_hidden_layers):
        pre = f"transformer.h.{layer}"
        plan += [(f"{pre}.{ln}.{p}", (h,)) for ln in config.layer_norm_names for p in ("weight", "bias")]
        for module in MODULES:
            path = module.path
            fin, fout = config.linear_shapes[path]
            plan.append((f"{pre}.{path}.weight", (fout, fin)))
            if store.has(f"{pre}.{path}.bias"):
                plan.append((f"{pre}.{path}.bias", (fout,)))
    plan += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", (v, h)))
    return plan


def merged_tensors(src: MergeSource) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of the merged model, one tensor at a time, in tensor_plan order."""
    cfg = src.config
    for name, shape in tensor_plan(cfg, src.store):
        parts = name.split(".")
        module = parts[-2]
        if name.endswith(".weight") and parts[1] == "h" and module in MODULE_NAMES:
            layer = int(parts[2])
            w = _base_linear(src, name[: -len(".weight")], shape[1])
            delta = _lora_delta(src, layer, module)
            if delta is not None:
                delta += w
                w = delta
            arr = np.ascontiguousarray(w, dtype=np.float32)
        else:
            arr = _float(src.store, name)
        if arr.shape != shape:
            raise MergeError(f"{src.store.file_of(name) if src.store.has(name) else src.store.source}: "
                             f"{name} has shape {list(arr.shape)}, expected {list(shape)} for this config")
        yield name, arr


def _write_tokenizer(src: MergeSource, out: Path) -> None:
    tok = src.tokenizer
    path = Path(tok.source) if tok is not None and tok.source else None
    if path is None or not path.is_file():
        return
    shutil.copyfile(path, out / "tokenizer.json")
    if (path.parent / "tokenizer_config.json").is_file():  # keeps its chat template, special tokens
        shutil.copyfile(path.parent / "tokenizer_config.json", out / "tokenizer_config.json")
        return
    eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else None
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
        "model_max_length": src.config.max_position_embeddings, "clean_up_tokenization_spaces": False})


def write_hf(src: MergeSource, out_dir: PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the merged float16 HF checkpoint of ``src`` into ``out_dir`` (replaced when complete)."""
    final = Path(out_dir)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_tmp(final.parent, final.name, "tmp")
        tmp.mkdir()
    except OSError as e:
        raise OSError(f"cannot write the merged model to {final}: {e.strerror or e}") from None
    try:
        shards: list[list[str]] = []
        shard: dict[str, np.ndarray] = {}
        size = total = 0
        for name, arr32 in merged_tensors(src):
            arr = arr32.astype(np.float16)
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
        config = config_to_hf_dict(src.config)
        config["torch_dtype"] = "float16"
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {
            "bos_token_id": src.config.bos_token_id, "eos_token_id": src.config.eos_token_id})
        _write_tokenizer(src, tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def merge_and_save(model: Any, out_dir: PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the merged float16 HF checkpoint of a loaded ``model`` (base + its LoRA) into ``out_dir``."""
    return write_hf(MergeSource.from_model(model), out_dir, max_shard_bytes)
