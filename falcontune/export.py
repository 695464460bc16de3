"""``falcontune export``: the base model with its LoRA folded in, as GGUF (llama.cpp, Ollama) or as
a float16 Hugging Face checkpoint (what ``-c`` writes).

GGUF follows llama.cpp's "falcon" architecture as its converter (convert_hf_to_gguf.py) writes it;
the file is written with the ``gguf`` package that llama.cpp ships:

* tensors: token_embd, blk.N.attn_norm (input_layernorm, or ln_mlp on 40B-style models: llama.cpp
  feeds the MLP from it), blk.N.attn_norm_2 (ln_attn, 40B style: the attention's), blk.N.attn_qkv,
  blk.N.attn_output, blk.N.ffn_up, blk.N.ffn_down, output_norm, output (untied lm_head only).
  Names come from gguf's own table for the architecture.
* the fused qkv rows are reordered from Falcon's [kv groups, heads/kv q + 1 k + 1 v, head_dim]
  to [all q | all k | all v], the "jploski" layout llama.cpp reads (a no-op for 7B-style
  multi-query models, whose one kv group is already in that order).
* keys: falcon.context_length, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.head_count_kv (the effective kv heads: 1 for 7B),
  attention.layer_norm_epsilon, rope.freq_base; tokenizer.ggml.* from tokenizer.json (model
  "gpt2": tokens by id, token types, merges, bos / eos ids, the chat template if
  tokenizer_config.json beside it has one).
* outtype f16: matrices float16, 1-D tensors float32 (as llama.cpp's converter does); q8_0:
  matrices whose rows are a multiple of 32 quantized with gguf's Q8_0 quantizer, others float16.

llama.cpp's Falcon graph has no linear biases, no ALiBi and no sequential attention/MLP, so the
Falcon-RW models can only be exported as HF checkpoints.

Tensors are merged and written one at a time (tensor infos first, then each tensor's data), into a
hidden temporary file renamed over ``out`` when complete.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .merge import MergeSource, merged_tensors, tensor_plan, write_hf
from .models import FalconConfig

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = ("gguf", "hf")
OUTTYPES = ("f16", "q8_0")

#: Falcon's tokenizer.json pre_tokenizer: llama.cpp calls this pre-tokenization "falcon"
FALCON_PRE_TOKENIZER: dict[str, Any] = {"type": "Sequence", "pretokenizers": [
    {"type": "Punctuation", "behavior": "Contiguous"},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    {"type": "Digits", "individual_digits": False},
    {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]}


class ExportError(ValueError):
    """A model, tokenizer or option that cannot be exported as asked."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ExportError("export --format=gguf needs the gguf package (llama.cpp's writer): "
                          "pip install gguf, or pip install 'falcontune[export]'") from None
    return gguf


def _check_gguf_arch(cfg: FalconConfig) -> None:
    why = [w for w, bad in (("linear biases", cfg.bias), ("ALiBi", cfg.alibi),
                            ("sequential attention / MLP", not cfg.parallel_attn)) if bad]
    if why:
        raise ExportError(f"llama.cpp's falcon architecture has no {', '.join(why)} (a Falcon-RW style model): "
                          "export it with --format=hf instead")


def reorder_qkv(w: np.ndarray, cfg: FalconConfig) -> np.ndarray:
    """Fused qkv rows [kv, heads/kv + 2, head_dim] (every Falcon layout reads so) -> [q | k | v]."""
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    g = w.reshape(kv, cfg.num_attention_heads // kv + 2, hd, w.shape[-1])
    return np.concatenate([g[:, :-2].reshape(-1, w.shape[-1]), g[:, -2].reshape(-1, w.shape[-1]),
                           g[:, -1].reshape(-1, w.shape[-1])])


# ---------------------------------------------------------------------------------------------
# tokenizer


def _tokenizer_fields(gguf: Any, tokenizer_file: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges and pre-tokenizer name for the GGUF "gpt2" tokenizer model."""
    try:
        doc = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        model = doc["model"]
        vocab, merges = model["vocab"], model.get("merges") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{tokenizer_file}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise ExportError(f"{tokenizer_file}: GGUF export needs a byte-level BPE tokenizer (Falcon's); "
                          f"this one is {model.get('type')!r}")
    TT = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer leaves unused
    types = [int(TT.UNUSED)] * vocab_size
    entries = [(int(i), str(t), int(TT.NORMAL)) for t, i in vocab.items()]
    entries += [(int(a["id"]), str(a["content"]), int(TT.CONTROL if a.get("special") else TT.USER_DEFINED))
                for a in doc.get("added_tokens") or []]
    for i, text, kind in entries:
        if not 0 <= i < vocab_size:
            raise ExportError(f"{tokenizer_file}: token {text!r} has id {i}, outside the model's "
                              f"vocab_size {vocab_size}")
        tokens[i], types[i] = text, kind
    if merges and not isinstance(merges[0], str):  # newer files: [left, right] pairs; spaces as gguf encodes them
        merges = [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]
    pre = "falcon" if doc.get("pre_tokenizer") == FALCON_PRE_TOKENIZER else "default"
    return {"tokens": tokens, "types": types, "merges": list(merges), "pre": pre}


def _chat_template(tokenizer_file: Path) -> Optional[str]:
    cfg = tokenizer_file.parent / "tokenizer_config.json"
    try:
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) else None


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_name_map(gguf: Any, cfg: FalconConfig) -> Callable[[str], str]:
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.FALCON, cfg.num_hidden_layers)

    def name(hf: str) -> str:
        out = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise ExportError(f"no GGUF name for tensor {hf} in llama.cpp's falcon architecture")
        return out
    return name


def _ggml_type(gguf: Any, shape: tuple[int, ...], outtype: str) -> Any:
    """1-D: F32; matrices: F16, or Q8_0 when asked and the rows split into 32-value blocks."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    return Q.Q8_0 if outtype == "q8_0" and shape[-1] % 32 == 0 else Q.F16


def _encode(gguf: Any, arr: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 tensor -> its bytes as written for ``qtype``."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.Q8_0:
        return gguf.quants.quantize(arr, Q.Q8_0)
    return arr.astype(np.float16 if qtype == Q.F16 else np.float32)


def _encoded_nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _add_metadata(w: Any, gguf: Any, src: MergeSource, outtype: str, tok: dict[str, Any],
                  chat_template: Optional[str]) -> None:
    cfg = src.config
    w.add_name(Path(src.name).name or src.name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tensor_data_layout("jploski")  # qkv as [q | k | v], see reorder_qkv
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        w.add_eos_token_id(cfg.eos_token_id)
    if chat_template:
        w.add_chat_template(chat_template)


def _open_tmp_beside(out: Path) -> Path:
    """Create (so: check that we can write) the hidden temporary file the output is built in."""
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        if out.is_dir():
            raise IsADirectoryError(21, "is a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OSError(f"cannot write --out {out}: {e.strerror or e}") from None
    os.close(fd)
    return tmp


def write_gguf(src: MergeSource, out: PathLike, outtype: str = "f16") -> Path:
    """Write the merged model as one GGUF file (see the module docstring)."""
    gguf = _gguf()
    cfg = src.config
    _check_gguf_arch(cfg)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    tok_file = Path(src.tokenizer.source) if src.tokenizer is not None and src.tokenizer.source else None
    if tok_file is None or not tok_file.is_file():
        raise ExportError("GGUF export includes the tokenizer: put tokenizer.json next to the model or give "
                          "--tokenizer (a tokenizer.json, its directory or a Hub repo id)")
    tok = _tokenizer_fields(gguf, tok_file, cfg.vocab_size)
    gguf_name = _gguf_name_map(gguf, cfg)
    plan = [(hf, gguf_name(hf), shape, _ggml_type(gguf, shape, outtype)) for hf, shape in tensor_plan(cfg, src.store)]
    out = Path(out)
    tmp = _open_tmp_beside(out)
    writer = gguf.GGUFWriter(tmp, "falcon")
    try:
        _add_metadata(writer, gguf, src, outtype, tok, _chat_template(tok_file))
        for _, name, shape, qtype in plan:  # shapes in numpy order; the element dtype is raw_dtype
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _encoded_nbytes(gguf, shape, qtype),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (hf, name, _, qtype), (got, arr) in zip(plan, merged_tensors(src)):
            assert got == hf, (got, hf)
            if name.endswith("attn_qkv.weight"):
                arr = reorder_qkv(arr, cfg)
            writer.write_tensor_data(_encode(gguf, arr, qtype))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------


def export(model: PathLike, out: PathLike, format: str = "gguf", outtype: str = "f16",
           weights: Optional[PathLike] = None, lora_apply_dir: Optional[PathLike] = None,
           tokenizer: Optional[PathLike] = None) -> Path:
    """Merge ``lora_apply_dir`` (optional: the base alone without it) into ``model`` and write it to
    ``out``: a .gguf file (format "gguf") or a directory (format "hf", float16 only). ``model``,
    ``weights`` and ``tokenizer`` are what load_model takes (directories, Hub repo ids, known names);
    no engine is built, so this runs on a machine without the memory to load the model for training."""
    from .lora_io import read_adapter
    from .model import open_checkpoint

    if format not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if format == "hf" and outtype != "f16":
        raise ExportError("--format=hf writes float16 (what -c writes); --outtype=q8_0 is for --format=gguf")
    ckpt = open_checkpoint(model, weights, tokenizer)
    try:
        if format == "gguf":
            _check_gguf_arch(ckpt.config)  # before reading the adapter or any tensor
        adapter = read_adapter(lora_apply_dir, ckpt.config) if lora_apply_dir else None
        src = MergeSource.from_files(ckpt, adapter)
        if format == "hf":
            return write_hf(src, out)
        return write_gguf(src, out, outtype)
    finally:
        ckpt.store.close()
