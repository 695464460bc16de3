"""Bad inputs end in a Python exception that names the file / tensor / record / flag and says
what was expected: never a crash, a hang or silent acceptance (docs/RELIABILITY.md).

Every case builds a tiny checkpoint (falcontune.testing.make_checkpoint), breaks one thing and
checks the exception type and that the message names the culprit. tools/reliability_report.py
counts these cases by their test-name prefix (test_file_*, test_tensor_*, ...).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pytest

import falcontune as ft
from falcontune import data, lora_io, testing
from falcontune.models import ConfigError, parse_config, parse_quantize_config
from falcontune.tokenizer import train_demo_tokenizer
from falcontune.weights import SafetensorsError, SafetensorsFile, WeightStore, save_safetensors

#: what a bad input may raise (FileNotFoundError, IsADirectoryError, ... are OSError; our own
#: errors are ValueError subclasses; wrong Python types are TypeError)
ALLOWED = (ValueError, TypeError, KeyError, OSError, NotImplementedError, RuntimeError)

L0 = "transformer.h.0.self_attention.query_key_value"
L1D = "transformer.h.1.mlp.dense_4h_to_h"
EMB = "transformer.word_embeddings.weight"
LNF_W, LNF_B = "transformer.ln_f.weight", "transformer.ln_f.bias"
LN0 = "transformer.h.0.input_layernorm.weight"
QKV_A = f"base_model.model.{L0}.lora_A.weight"


def raises(fn: Callable[[], Any], types: Any, *needles: str) -> BaseException:
    """fn() must raise one of ``types`` (all of them documented kinds) whose message holds every
    needle."""
    with pytest.raises(types) as ei:
        fn()
    assert isinstance(ei.value, ALLOWED), type(ei.value)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message {msg!r}"
    return ei.value


def record_stat(name: str, **values: Any) -> None:
    """Counts for tools/reliability_report.py (only when it asks: FT_RELIABILITY_STATS=dir)."""
    out = os.environ.get("FT_RELIABILITY_STATS")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "stats.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"name": name, **values}) + "\n")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return testing.make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", bits=4, group_size=32, seed=1)


@pytest.fixture(scope="module")
def rw_dir(tmp_path_factory) -> Path:
    """alibi, biases, two layer norms, interleaved qkv."""
    return testing.make_checkpoint(tmp_path_factory.mktemp("rw"), preset="tiny-rw", bits=4, group_size=32, seed=2)


@pytest.fixture(scope="module")
def model(base_dir):
    return ft.load_model(base_dir, device="cpu")


def weights_file(d: Path) -> Path:
    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    with WeightStore.open(path) as st:
        return {k: np.array(st.tensor(k)) for k in st.names()}


def mutated(src: Path, dst: Path, tensors: Optional[Callable[[dict], None]] = None,
            config: Optional[Callable[[dict], None]] = None,
            qconfig: Optional[Callable[[dict], None]] = None) -> Path:
    """A copy of checkpoint ``src`` with its tensors / config.json / quantize_config.json edited."""
    shutil.copytree(src, dst)
    if tensors is not None:
        wf = weights_file(dst)
        t = read_tensors(wf)
        tensors(t)
        save_safetensors(wf, t)
    for name, fn in (("config.json", config), ("quantize_config.json", qconfig)):
        if fn is not None:
            doc = json.loads((dst / name).read_text())
            fn(doc)
            (dst / name).write_text(json.dumps(doc))
    return dst


def load(d: Path):
    return ft.load_model(d, device="cpu")


def raw_safetensors(path: Path, header: Any, data: bytes = b"", n: Optional[int] = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


# ---------------------------------------------------------------------------------------------
# files: empty, truncated, not safetensors, absurd headers


def test_file_empty_and_tiny(tmp_path):
    for size in (0, 1, 7):
        p = tmp_path / f"s{size}.safetensors"
        p.write_bytes(b"\x01" * size)
        raises(lambda: SafetensorsFile(p), SafetensorsError, str(p), f"{size} bytes")


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 2**40, 100 * 1024 * 1024 + 1, 4096])
def test_file_absurd_header_length(tmp_path, n):
    p = raw_safetensors(tmp_path / "h.safetensors", b"{}", n=n)
    raises(lambda: SafetensorsFile(p), SafetensorsError, str(p), "header length")


NOT_SAFETENSORS = {
    "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "json": b'{"weight_map": {}}' * 10,
    "text": "ceci n'est pas un fichier safetensors\n".encode() * 20,
    "zip": b"PK\x03\x04" + b"\x00" * 200,
    "zeros": b"\x00" * 4096,
    "gguf": b"GGUF\x03\x00\x00\x00" + b"\x00" * 100,
    "pickle": b"\x80\x02}q\x00." + b"\x00" * 50,
    "header_zero": struct.pack("<Q", 0) + b"rest",
    "header_not_utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    "header_deep": struct.pack("<Q", 200_000) + b"[" * 200_000,
    "header_list": struct.pack("<Q", 2) + b"[]",
    "header_nul": struct.pack("<Q", 8) + b"{\x00\x00\x00\x00\x00\x00}",
}


@pytest.mark.parametrize("kind", sorted(NOT_SAFETENSORS))
def test_file_not_safetensors(tmp_path, kind):
    p = tmp_path / "model.safetensors"
    p.write_bytes(NOT_SAFETENSORS[kind])
    raises(lambda: SafetensorsFile(p), SafetensorsError, str(p))
    # and through load_model, with a valid config next to it
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "falcon", "vocab_size": 256, "hidden_size": 64,
                                               "num_attention_heads": 4, "num_hidden_layers": 1}))
    (d / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    shutil.copy(p, d / "model.safetensors")
    raises(lambda: load(d), SafetensorsError, str(d / "model.safetensors"))


def test_file_truncated_everywhere(tmp_path, base_dir):
    raw = weights_file(base_dir).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cuts = sorted({0, 3, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(raw)) // 2, len(raw) - 1})
    p = tmp_path / "t.safetensors"
    for cut in cuts:
        p.write_bytes(raw[:cut])
        raises(lambda: SafetensorsFile(p), SafetensorsError, str(p))
        d = tmp_path / f"cut{cut}"
        shutil.copytree(base_dir, d)
        weights_file(d).write_bytes(raw[:cut])
        raises(lambda: load(d), SafetensorsError, str(weights_file(d)))
    record_stat("truncation_points", count=len(cuts))


BAD_HEADERS = {
    "entry_not_object": ({"a": [1, 2]}, "entry must be an object"),
    "unknown_dtype": ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, "unknown dtype"),
    "negative_shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
    "float_shape": ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, "shape"),
    "bool_shape": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "shape"),
    "shape_not_list": ({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, "shape"),
    "offsets_three": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "data_offsets"),
    "offsets_reversed": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
    "offsets_negative": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "data_offsets"),
    "offsets_past_end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "past the end"),
    "offsets_huge": ({"a": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 2**64]}}, "past the end"),
    "span_mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8"),
    "shape_overflow": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, "needs"),
    "overlap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, "overlap"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}}, "__metadata__"),
    "metadata_list": ({"__metadata__": ["x"]}, "__metadata__"),
}


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_file_bad_header(tmp_path, kind):
    header, words = BAD_HEADERS[kind]
    p = raw_safetensors(tmp_path / "x.safetensors", header, b"\x00" * 8)
    raises(lambda: SafetensorsFile(p), SafetensorsError, str(p), words)


def test_file_paths(tmp_path, base_dir):
    raises(lambda: SafetensorsFile(tmp_path / "absent.safetensors"), FileNotFoundError, "absent.safetensors")
    raises(lambda: SafetensorsFile(tmp_path), SafetensorsError, "is a directory")
    raises(lambda: WeightStore.open(tmp_path / "absent"), FileNotFoundError, "absent")
    raises(lambda: WeightStore.open(tmp_path), FileNotFoundError, "no *.safetensors")
    raises(lambda: ft.load_model(tmp_path / "absent", device="cpu"), ValueError, "absent")
    raises(lambda: ft.load_model(tmp_path, device="cpu"), ValueError, "no config.json")
    raises(lambda: ft.load_model(base_dir, weights=tmp_path / "nope.safetensors", device="cpu"),
           FileNotFoundError, "nope.safetensors")
    raises(lambda: ft.load_model("falcon-7b-instruct-4bit", device="cpu"), ValueError, "--weights")
    raises(lambda: ft.load_model("no-such-model", weights=tmp_path, device="cpu"), ValueError, "no-such-model")
    if hasattr(os, "mkfifo"):  # a FIFO must not block the loader
        fifo = tmp_path / "fifo.safetensors"
        os.mkfifo(fifo)
        raises(lambda: SafetensorsFile(fifo), SafetensorsError, str(fifo))


def test_file_sharded_index(tmp_path, base_dir):
    d = tmp_path / "sharded"
    shutil.copytree(base_dir, d)
    wf = weights_file(d)
    names = SafetensorsFile(wf).names()
    index = d / "model.safetensors.index.json"
    index.write_text("{not json")
    raises(lambda: WeightStore.open(d), SafetensorsError, str(index), "JSON")
    index.write_text("[" * 100_000)
    raises(lambda: WeightStore.open(d), SafetensorsError, str(index))
    index.write_text(json.dumps({"weight_map": []}))
    raises(lambda: WeightStore.open(d), SafetensorsError, "weight_map")
    index.write_text(json.dumps({"weight_map": {n: "shard-2.safetensors" for n in names}}))
    raises(lambda: WeightStore.open(d), FileNotFoundError, "shard-2.safetensors")
    index.write_text(json.dumps({"weight_map": {"ghost.weight": wf.name}}))
    raises(lambda: WeightStore.open(d), SafetensorsError, "ghost.weight")
    # the same tensor in two files
    shutil.copy(wf, d / "copy.safetensors")
    index.unlink()
    raises(lambda: WeightStore.open(d), SafetensorsError, "stored twice")


# ---------------------------------------------------------------------------------------------
# tensors: wrong dtype / shape / values of each kind


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[name] = fn(t[name])
    return edit


def _drop(name: str) -> Callable[[dict], None]:
    return lambda t: t.pop(name)


def _poke(name: str, index: Any, value: Any) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        a = t[name].copy()
        a[index] = value
        t[name] = a
    return edit


TENSOR_CASES: dict[str, tuple[Callable[[dict], None], tuple, tuple[str, ...]]] = {
    # qweight int32 [in*bits/32, out]
    "qweight_f32": (_set(f"{L0}.qweight", lambda a: a.astype(np.float32)), (ValueError,), (f"{L0}.qweight", "int32")),
    "qweight_u32": (_set(f"{L0}.qweight", lambda a: a.view(np.uint32)), (ValueError,), (f"{L0}.qweight", "U32")),
    "qweight_i64": (_set(f"{L0}.qweight", lambda a: a.astype(np.int64)), (ValueError,), (f"{L0}.qweight", "I64")),
    "qweight_rows": (_set(f"{L0}.qweight", lambda a: a[:-1]), (ValueError,), (f"{L0}.qweight", "shape")),
    "qweight_cols": (_set(f"{L0}.qweight", lambda a: a[:, :-32]), (ValueError,), (f"{L0}.qweight", "shape")),
    "qweight_1d": (_set(f"{L0}.qweight", lambda a: a.reshape(-1)), (ValueError,), (f"{L0}.qweight", "shape")),
    "qweight_3d": (_set(f"{L0}.qweight", lambda a: a[None]), (ValueError,), (f"{L0}.qweight",)),
    "qweight_missing": (_drop(f"{L1D}.qweight"), (ValueError, KeyError), (f"{L1D}.qweight",)),
    # qzeros int32 [groups, out*bits/32]
    "qzeros_f16": (_set(f"{L0}.qzeros", lambda a: (a & 0x7FF).astype(np.float16)), (ValueError,), (f"{L0}.qzeros", "int32")),
    "qzeros_i64": (_set(f"{L0}.qzeros", lambda a: a.astype(np.int64)), (ValueError,), (f"{L0}.qzeros", "I64")),
    "qzeros_cols": (_set(f"{L0}.qzeros", lambda a: a[:, :-1]), (ValueError,), (f"{L0}.qzeros", "shape")),
    "qzeros_groups": (_set(f"{L0}.qzeros", lambda a: a[:1]), (ValueError,), (f"{L0}.qzeros", "shape")),
    "qzeros_1d": (_set(f"{L0}.qzeros", lambda a: a.reshape(-1)), (ValueError,), (f"{L0}.qzeros",)),
    "qzeros_missing": (_drop(f"{L1D}.qzeros"), (KeyError,), (f"{L1D}.qzeros",)),
    # scales f16 [groups, out]
    "scales_f32": (_set(f"{L0}.scales", lambda a: a.astype(np.float32)), (ValueError,), (f"{L0}.scales", "float16")),
    "scales_i32": (_set(f"{L0}.scales", lambda a: a.astype(np.int32)), (ValueError,), (f"{L0}.scales",)),
    "scales_cols": (_set(f"{L0}.scales", lambda a: a[:, :-1]), (ValueError,), (f"{L0}.scales",)),
    "scales_groups": (_set(f"{L0}.scales", lambda a: np.concatenate([a, a])), (ValueError,), (f"{L0}.scales", "groups")),
    "scales_1d": (_set(f"{L0}.scales", lambda a: a[0]), (ValueError,), (f"{L0}.scales",)),
    "scales_nan": (_poke(f"{L0}.scales", (0, 3), np.nan), (ValueError,), (f"{L0}.scales", "NaN")),
    "scales_inf": (_poke(f"{L1D}.scales", (1, 0), np.inf), (ValueError,), (f"{L1D}.scales", "infinite")),
    "scales_missing": (_drop(f"{L0}.scales"), (KeyError,), (f"{L0}.scales",)),
    # g_idx int32 [in], values in [0, groups)
    "g_idx_f32": (_set(f"{L0}.g_idx", lambda a: a.astype(np.float32)), (ValueError,), (f"{L0}.g_idx", "int32")),
    "g_idx_2d": (_set(f"{L0}.g_idx", lambda a: a[None]), (ValueError,), (f"{L0}.g_idx",)),
    "g_idx_short": (_set(f"{L0}.g_idx", lambda a: a[:-1]), (ValueError,), (f"{L0}.g_idx", "shape")),
    "g_idx_too_big": (_poke(f"{L0}.g_idx", 5, 2), (ValueError,), (f"{L0}.g_idx", "g_idx[5] = 2", "[0, 2)")),
    "g_idx_negative": (_poke(f"{L0}.g_idx", 0, -1), (ValueError,), (f"{L0}.g_idx", "-1")),
    "g_idx_i64_negative": (_set(f"{L0}.g_idx", lambda a: a.astype(np.int64) - 1), (ValueError,), (f"{L0}.g_idx", "range")),
    "g_idx_i64_huge": (_set(f"{L0}.g_idx", lambda a: a.astype(np.int64) + 2**40), (ValueError,), (f"{L0}.g_idx",)),
    "g_idx_u8_too_big": (_set(f"{L0}.g_idx", lambda a: (a + 7).astype(np.uint8)), (ValueError,), (f"{L0}.g_idx",)),
    # embeddings [vocab, hidden]
    "embed_rows": (_set(EMB, lambda a: a[:-1]), (ValueError,), (EMB, "[256, 64]")),
    "embed_cols": (_set(EMB, lambda a: a[:, :32]), (ValueError,), (EMB, "[256, 64]")),
    "embed_i32": (_set(EMB, lambda a: a.astype(np.int32)), (ValueError,), (EMB, "int32")),
    "embed_i8": (_set(EMB, lambda a: a.astype(np.int8)), (ValueError,), (EMB, "I8")),
    "embed_bool": (_set(EMB, lambda a: a > 0), (ValueError,), (EMB, "BOOL")),
    "embed_1d": (_set(EMB, lambda a: a.reshape(-1)), (ValueError,), (EMB,)),
    "embed_empty": (_set(EMB, lambda a: a[:0]), (ValueError,), (EMB,)),
    "embed_nan": (_poke(EMB, (7, 3), np.nan), (ValueError,), (EMB, "NaN", "[7, 3]")),
    "embed_missing": (_drop(EMB), (KeyError,), (EMB,)),
    # layer norms [hidden]
    "ln_f_short": (_set(LNF_W, lambda a: a[:-1]), (ValueError,), (LNF_W, "[64]")),
    "ln_f_2d": (_set(LNF_B, lambda a: a[None]), (ValueError,), (LNF_B,)),
    "ln_f_scalar": (_set(LNF_B, lambda a: a[0]), (ValueError,), (LNF_B,)),
    "ln_f_i32": (_set(LNF_W, lambda a: a.astype(np.int32)), (ValueError,), (LNF_W,)),
    "ln_f_inf": (_poke(LNF_W, 0, np.inf), (ValueError,), (LNF_W, "infinite")),
    "ln_layer_nan": (_poke(LN0, 10, np.nan), (ValueError,), (LN0, "NaN")),
    "ln_layer_long": (_set(LN0, lambda a: np.concatenate([a, a])), (ValueError,), (LN0,)),
    "ln_layer_missing": (_drop(LN0), (KeyError,), (LN0,)),
    "ln_second_unexpected": (lambda t: t.__setitem__("transformer.h.0.post_attention_layernorm.weight", t[LN0]),
                             (ValueError,), ("post_attention_layernorm",)),
    "ln_f_missing": (_drop(LNF_B), (KeyError,), (LNF_B,)),
    # lm_head [vocab, hidden] (untied when present)
    "lm_head_shape": (lambda t: t.__setitem__("lm_head.weight", t[EMB][:, :32].copy()), (ValueError,), ("lm_head.weight",)),
    "lm_head_i32": (lambda t: t.__setitem__("lm_head.weight", t[EMB].astype(np.int32)), (ValueError,), ("lm_head.weight",)),
    "lm_head_nan": (lambda t: t.__setitem__("lm_head.weight", np.full_like(t[EMB], np.nan)), (ValueError,), ("lm_head.weight",)),
    "lm_head_3d": (lambda t: t.__setitem__("lm_head.weight", t[EMB][None]), (ValueError,), ("lm_head.weight",)),
    # bias on a bias-free model: zeros are dropped (old exporters), anything else is a mismatch
    "bias_nonzero_but_config_false": (lambda t: t.__setitem__(f"{L0}.bias", np.ones(96, np.float16)),
                                      (ValueError,), (f"{L0}.bias", "bias=false")),
    # layers the config does not have
    "extra_layer": (lambda t: t.update({k.replace("h.1.", "h.2."): v for k, v in list(t.items()) if ".h.1." in k}),
                    (ValueError,), ("transformer.h.2.", "num_hidden_layers=2")),
    # a dense (unquantized) linear mixed into a GPTQ file
    "dense_instead_of_qweight": (lambda t: [t.pop(f"{L1D}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")]
                                 and t.__setitem__(f"{L1D}.weight", np.zeros((64, 256), np.float16)),
                                 (ValueError,), (L1D, "not GPTQ-quantized")),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor(tmp_path, base_dir, case):
    edit, types, needles = TENSOR_CASES[case]
    d = mutated(base_dir, tmp_path / "m", tensors=edit)
    raises(lambda: load(d), types, *needles)


def test_tensor_zero_bias_is_ignored_and_missing_g_idx_is_sequential(tmp_path, base_dir, model):
    def edit(t):
        t[f"{L0}.bias"] = np.zeros(96, np.float16)
    d = mutated(base_dir, tmp_path / "m", tensors=edit)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(load(d).forward(ids), model.forward(ids))
    d2 = mutated(base_dir, tmp_path / "m2", tensors=_drop(f"{L0}.g_idx"))
    np.testing.assert_array_equal(load(d2).forward(ids), model.forward(ids))  # sequential groups anyway


RW_QKV = "transformer.h.0.self_attention.query_key_value"
RW_CASES = {
    "bias_short": (_set(f"{RW_QKV}.bias", lambda a: a[:-1]), (ValueError,), (f"{RW_QKV}.bias",)),
    "bias_i32": (_set(f"{RW_QKV}.bias", lambda a: a.astype(np.int32)), (ValueError,), (f"{RW_QKV}.bias",)),
    "bias_2d": (_set(f"{RW_QKV}.bias", lambda a: a[None]), (ValueError,), (f"{RW_QKV}.bias",)),
    "bias_nan": (_poke(f"{RW_QKV}.bias", 1, np.nan), (ValueError,), (f"{RW_QKV}.bias", "NaN")),
    "bias_missing": (_drop(f"{RW_QKV}.bias"), (KeyError,), (f"{RW_QKV}.bias", "bias=true")),
    "post_ln_missing": (_drop("transformer.h.1.post_attention_layernorm.bias"), (KeyError,),
                        ("transformer.h.1.post_attention_layernorm.bias",)),
    "post_ln_bf16_wrong": (lambda t: t.__setitem__("transformer.h.1.post_attention_layernorm.weight",
                                                   np.zeros(64, np.uint8)), (ValueError,), ("post_attention_layernorm",)),
}


@pytest.mark.parametrize("case", sorted(RW_CASES))
def test_tensor_rw(tmp_path, rw_dir, case):
    edit, types, needles = RW_CASES[case]
    d = mutated(rw_dir, tmp_path / "m", tensors=edit)
    raises(lambda: load(d), types, *needles)


def test_tensor_error_names_the_file(tmp_path, base_dir):
    d = mutated(base_dir, tmp_path / "m", tensors=_poke(f"{L0}.g_idx", 0, 9))
    raises(lambda: load(d), ValueError, str(weights_file(d)), f"{L0}.g_idx")


# ---------------------------------------------------------------------------------------------
# config / weights / quantize_config mismatches


MISMATCH_CASES: dict[str, tuple[dict, tuple, tuple[str, ...]]] = {
    "bits_8_for_4bit_file": ({"qconfig": lambda q: q.update(bits=8)}, (ValueError,), ("qweight", "bits=8")),
    "bits_2_for_4bit_file": ({"qconfig": lambda q: q.update(bits=2)}, (ValueError,), ("qweight", "bits=2")),
    "bits_3_for_4bit_file": ({"qconfig": lambda q: q.update(bits=3)}, (ValueError,), ("qweight", "bits=3")),
    "group_size_64_for_32": ({"qconfig": lambda q: q.update(group_size=64)}, (ValueError,), ("scales", "group_size=64")),
    "group_size_all_for_32": ({"qconfig": lambda q: q.update(group_size=-1)}, (ValueError,), ("scales", "group_size=-1")),
    "hidden_128_for_64": ({"config": lambda c: c.update(hidden_size=128)}, (ValueError,), ("qweight",)),
    "vocab_512_for_256": ({"config": lambda c: c.update(vocab_size=512)}, (ValueError,), (EMB, "[512, 64]")),
    "layers_3_for_2": ({"config": lambda c: c.update(num_hidden_layers=3)}, (ValueError, KeyError), ("transformer.h.2.",)),
    "layers_1_for_2": ({"config": lambda c: c.update(num_hidden_layers=1)}, (ValueError,), ("transformer.h.1.", "num_hidden_layers=1")),
    "ffn_128_for_256": ({"config": lambda c: c.update(ffn_hidden_size=128)}, (ValueError,), ("dense_h_to_4h",)),
    "heads_2_for_4": ({"config": lambda c: c.update(num_attention_heads=2, num_kv_heads=2)}, (ValueError,), ("query_key_value",)),
    "new_decoder_for_7b_style": ({"config": lambda c: c.update(new_decoder_architecture=True, num_kv_heads=2)},
                                 (ValueError, KeyError), ("query_key_value",)),
    "untied_without_lm_head": ({"config": lambda c: c.update(tie_word_embeddings=False)}, (ValueError,), ("lm_head.weight",)),
    "unsupported_bits_5": ({"qconfig": lambda q: q.update(bits=5)}, (ConfigError,), ("quantize_config.json", "'bits' = 5")),
    "unsupported_bits_16": ({"qconfig": lambda q: q.update(bits=16)}, (ConfigError,), ("'bits' = 16",)),
    "bits_as_string": ({"qconfig": lambda q: q.update(bits="4")}, (ConfigError,), ("'bits'",)),
    "group_size_zero": ({"qconfig": lambda q: q.update(group_size=0)}, (ConfigError,), ("group_size",)),
    "format_marlin": ({"qconfig": lambda q: q.update(checkpoint_format="marlin")}, (ConfigError,), ("checkpoint_format",)),
    "quant_method_awq": ({"qconfig": lambda q: q.update(quant_method="awq")}, (ConfigError,), ("quant_method",)),
    "qconfig_missing_bits": ({"qconfig": lambda q: q.pop("bits")}, (ConfigError,), ("'bits'",)),
    "config_missing_vocab": ({"config": lambda c: c.pop("vocab_size")}, (ConfigError,), ("config.json", "vocab_size")),
    "config_llama": ({"config": lambda c: c.update(model_type="llama")}, (ConfigError,), ("model_type",)),
    "config_hidden_string": ({"config": lambda c: c.update(hidden_size="64")}, (ConfigError,), ("hidden_size",)),
    "config_heads_not_divisor": ({"config": lambda c: c.update(num_attention_heads=3)}, (ConfigError,), ("divisible",)),
    "config_eps_negative": ({"config": lambda c: c.update(layer_norm_epsilon=-1)}, (ConfigError,), ("layer_norm_epsilon",)),
    "config_eos_out_of_vocab": ({"config": lambda c: c.update(eos_token_id=1000)}, (ConfigError,), ("eos_token_id",)),
    "config_activation": ({"config": lambda c: c.update(activation="relu")}, (ConfigError,), ("activation",)),
    "config_rope_scaling": ({"config": lambda c: c.update(rope_scaling={"type": "linear", "factor": 2})}, (ConfigError,), ("rope_scaling",)),
}


@pytest.mark.parametrize("case", sorted(MISMATCH_CASES))
def test_mismatch(tmp_path, base_dir, case):
    kw, types, needles = MISMATCH_CASES[case]
    d = mutated(base_dir, tmp_path / "m", **kw)
    raises(lambda: load(d), types, *needles)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\"x\"", "[" * 100_000, "{\"bits\": NaN}"])
@pytest.mark.parametrize("which", ["config.json", "quantize_config.json"])
def test_mismatch_config_files_not_json(tmp_path, base_dir, which, text):
    d = tmp_path / "m"
    shutil.copytree(base_dir, d)
    (d / which).write_text(text)
    raises(lambda: load(d), ValueError, which)


def test_mismatch_config_not_utf8_and_missing_qconfig(tmp_path, base_dir):
    d = tmp_path / "m"
    shutil.copytree(base_dir, d)
    (d / "config.json").write_bytes(b'{"vocab_size": "\xff\xfe"}')
    raises(lambda: load(d), ValueError, "config.json")
    d2 = tmp_path / "m2"
    shutil.copytree(base_dir, d2)
    (d2 / "quantize_config.json").unlink()
    raises(lambda: load(d2), ValueError, "quantize_config.json")


def test_mismatch_tokenizer_vocab(tmp_path, base_dir):
    tok = train_demo_tokenizer(["un petit texte pour le tokenizer"] * 4, vocab_size=300,
                                            out_path=tmp_path / "tokenizer.json")
    assert tok.vocab_size > 256
    d = tmp_path / "m"
    shutil.copytree(base_dir, d)
    shutil.copy(tmp_path / "tokenizer.json", d / "tokenizer.json")
    raises(lambda: load(d), ValueError, "vocab_size is 256")
    (d / "tokenizer.json").write_text("{\"not\": \"a tokenizer\"}")
    raises(lambda: load(d), ValueError, "tokenizer.json")


def test_mismatch_device_and_dtype(base_dir):
    raises(lambda: ft.load_model(base_dir, device="tpu"), ValueError, "tpu")
    raises(lambda: ft.load_model(base_dir, device="cpu", dtype="int4"), ValueError, "int4")
    raises(lambda: ft.load_model(base_dir, device="cpu", dtype="float16"), (ValueError, NotImplementedError), "float32")


def test_mismatch_engine_checks_its_own_inputs(base_dir):
    """The C engine never trusts Python: a broken config or weights dict straight to _C.Model."""
    from falcontune import _C
    from falcontune.model import _bind_weights, _engine_config
    from falcontune.models import QuantizeConfig
    cfg = parse_config(json.loads((base_dir / "config.json").read_text()))
    q = QuantizeConfig(bits=4, group_size=32)
    with WeightStore.open(weights_file(base_dir)) as st:
        w = {k: (np.array(v[0]), v[1]) if isinstance(v, tuple) else np.array(v)
             for k, v in _bind_weights(st, cfg, q, False).items()}
    good = _engine_config(cfg, q)
    _C.Model(good, w, "cpu").close()
    for key, val, words in [("n_layer", 0, "n_layer"), ("n_layer", 2**40, ""), ("n_layer", 3, "transformer.h.2"),
                            ("head_dim", 15, "head_dim"), ("head_dim", 8, "head_dim"), ("qkv_layout", 7, ""),
                            ("n_kv_head", 3, ""), ("n_kv_head", 0, ""), ("ln_eps", float("nan"), "layer_norm_epsilon"),
                            ("rope_theta", -1.0, "rope_theta"), ("hidden", -64, ""), ("vocab_size", "x", ""),
                            ("vocab_size", 255, "word_embeddings"), ("zero_offset", 5, "zero_offset"), ("bits", 5, "bits"),
                            ("bits", 8, "qweight"), ("n_ln", 3, "n_ln"), ("ffn", 128, "")]:
        bad = dict(good, **{key: val})
        raises(lambda: _C.Model(bad, w, "cpu"), (ValueError, TypeError, KeyError, OverflowError, NotImplementedError), words)
    for key in ("vocab_size", "bits", "ln_eps"):
        bad = dict(good)
        bad.pop(key)
        raises(lambda: _C.Model(bad, w, "cpu"), KeyError, key)
    raises(lambda: _C.Model([1], w, "cpu"), TypeError, "config")
    emb = "transformer.word_embeddings.weight"
    for val, types, words in [(w[emb][:, ::2], ValueError, "C-contiguous"), (("x", "bfloat16"), TypeError, emb),
                              ((np.zeros((256, 64), np.float32), "bfloat16"), TypeError, "uint16"),
                              ((np.zeros((256, 64), np.uint16), "float8"), TypeError, emb),
                              (np.zeros((256, 64), np.float64), TypeError, emb), ([[1.0]], TypeError, emb),
                              (np.zeros((256, 64), ">f4"), ValueError, "native-endian")]:
        raises(lambda: _C.Model(good, {**w, emb: val}, "cpu"), types, words)
    raises(lambda: _C.Model(good, w, "quantum"), ValueError, "quantum")
    raises(lambda: _C.quantize_rtn(np.zeros((64, 64), np.float32), 5, 32), ValueError, "bits")
    raises(lambda: _C.quantize_rtn(np.zeros((64, 64), np.int32), 4, 32), ValueError, "float")
    raises(lambda: _C.quantize_rtn(np.zeros((64, 48), np.float32), 3, 32), ValueError, "32-bit words")


# ---------------------------------------------------------------------------------------------
# adapters (falcontune/lora_io.py)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir) -> Path:
    m = ft.load_model(base_dir, device="cpu")
    m.add_lora(r=4, alpha=8, target_modules=["query_key_value", "dense"])
    m.load_lora_state_dict(testing.random_lora(m.config, 4, ["query_key_value", "dense"], seed=3))
    return m.save_lora(tmp_path_factory.mktemp("adapter") / "a")


def mutated_adapter(src: Path, dst: Path, config: Optional[Callable[[dict], None]] = None,
                    tensors: Optional[Callable[[dict], None]] = None, config_text: Optional[str] = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        doc = json.loads((dst / "adapter_config.json").read_text())
        config(doc)
        (dst / "adapter_config.json").write_text(json.dumps(doc))
    if config_text is not None:
        (dst / "adapter_config.json").write_text(config_text)
    if tensors is not None:
        t = read_tensors(dst / "adapter_model.safetensors")
        tensors(t)
        save_safetensors(dst / "adapter_model.safetensors", t)
    return dst


ADAPTER_CASES: dict[str, tuple[dict, tuple, tuple[str, ...]]] = {
    "r_larger": ({"config": lambda c: c.update(r=8)}, (ValueError,), ("lora_A.weight", "[8, 64]")),
    "r_smaller": ({"config": lambda c: c.update(r=2)}, (ValueError,), ("expected [2, 64]",)),
    "r_zero": ({"config": lambda c: c.update(r=0)}, (ValueError,), ("adapter_config.json", "'r'")),
    "r_bool": ({"config": lambda c: c.update(r=True)}, (ValueError,), ("'r'",)),
    "r_string": ({"config": lambda c: c.update(r="4")}, (ValueError,), ("'r'",)),
    "r_float": ({"config": lambda c: c.update(r=4.0)}, (ValueError,), ("'r'",)),
    "r_huge": ({"config": lambda c: c.update(r=10**12)}, (ValueError,), ("'r'",)),
    "r_missing": ({"config": lambda c: c.pop("r")}, (ValueError,), ("missing 'r'",)),
    "alpha_string": ({"config": lambda c: c.update(lora_alpha="x")}, (ValueError,), ("lora_alpha",)),
    "alpha_null": ({"config": lambda c: c.update(lora_alpha=None)}, (ValueError,), ("lora_alpha",)),
    "alpha_nan": ({"config_text": '{"r": 4, "lora_alpha": NaN, "target_modules": ["query_key_value", "dense"]}'},
                  (ValueError,), ("lora_alpha",)),
    "alpha_inf": ({"config_text": '{"r": 4, "lora_alpha": Infinity, "target_modules": ["dense"]}'},
                  (ValueError,), ("lora_alpha",)),
    "dropout_one": ({"config": lambda c: c.update(lora_dropout=1.0)}, (ValueError,), ("lora_dropout",)),
    "dropout_string": ({"config": lambda c: c.update(lora_dropout="0.1")}, (ValueError,), ("lora_dropout",)),
    "targets_fewer_than_tensors": ({"config": lambda c: c.update(target_modules=["query_key_value"])}, (ValueError,),
                                   ("dense.lora_A.weight", "target_modules")),
    "targets_more_than_tensors": ({"config": lambda c: c.update(target_modules=["query_key_value", "dense", "dense_4h_to_h"])},
                                  (ValueError,), ("missing", "dense_4h_to_h", "adapter_model.safetensors")),
    "targets_llama_names": ({"config": lambda c: c.update(target_modules=["q_proj", "v_proj"])}, (ValueError,), ("q_proj",)),
    "targets_int": ({"config": lambda c: c.update(target_modules=5)}, (ValueError,), ("target_modules",)),
    "targets_nested": ({"config": lambda c: c.update(target_modules=[["dense"]])}, (ValueError,), ("target_modules",)),
    "targets_empty": ({"config": lambda c: c.update(target_modules=[])}, (ValueError,), ("target_modules",)),
    "peft_type_prefix": ({"config": lambda c: c.update(peft_type="PREFIX_TUNING")}, (ValueError,), ("PREFIX_TUNING",)),
    "bias_all": ({"config": lambda c: c.update(bias="all")}, (ValueError,), ("bias",)),
    "dora": ({"config": lambda c: c.update(use_dora=True)}, (ValueError,), ("DoRA",)),
    "layers_to_transform": ({"config": lambda c: c.update(layers_to_transform=[0])}, (ValueError,), ("layers_to_transform",)),
    "config_list": ({"config_text": "[1, 2, 3]"}, (ValueError,), ("adapter_config.json", "JSON object")),
    "config_empty": ({"config_text": ""}, (ValueError,), ("adapter_config.json",)),
    "config_deep": ({"config_text": "[" * 100_000}, (ValueError,), ("adapter_config.json",)),
    "tensor_shape_A": ({"tensors": _set(QKV_A, lambda a: a[:, :32])}, (ValueError,), (QKV_A, "[4, 64]")),
    "tensor_shape_B": ({"tensors": _set(QKV_A.replace("lora_A", "lora_B"), lambda a: a[:-1])}, (ValueError,), ("lora_B",)),
    "tensor_3d": ({"tensors": _set(QKV_A, lambda a: a[None])}, (ValueError,), (QKV_A,)),
    "tensor_i32": ({"tensors": _set(QKV_A, lambda a: a.astype(np.int32))}, (ValueError,), (QKV_A, "I32")),
    "tensor_bool": ({"tensors": _set(QKV_A, lambda a: a > 0)}, (ValueError,), (QKV_A, "BOOL")),
    "tensor_nan": ({"tensors": _poke(QKV_A, (0, 0), np.nan)}, (ValueError,), (QKV_A, "NaN")),
    "tensor_missing": ({"tensors": _drop(QKV_A)}, (ValueError,), ("missing 1 LoRA tensors", QKV_A)),
    "tensor_unknown_name": ({"tensors": lambda t: t.__setitem__("lm_head.weight", np.zeros(2, np.float32))},
                            (ValueError,), ("lm_head.weight",)),
    "tensor_layer_out_of_range": ({"tensors": lambda t: t.__setitem__(QKV_A.replace("h.0.", "h.7."), t[QKV_A])},
                                  (ValueError,), ("layer 7",)),
    "tensor_duplicate_names": ({"tensors": lambda t: t.__setitem__(QKV_A.replace("lora_A.", "lora_A.default."), t[QKV_A])},
                               (ValueError,), ("same matrix",)),
    "tensor_module_not_targeted": ({"tensors": lambda t: t.__setitem__(QKV_A.replace("self_attention.query_key_value", "mlp.dense_h_to_4h"),
                                                                       np.zeros((4, 64), np.float32))},
                                   (ValueError,), ("dense_h_to_4h", "target_modules")),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter(tmp_path, base_dir, adapter_dir, case):
    kw, types, needles = ADAPTER_CASES[case]
    d = mutated_adapter(adapter_dir, tmp_path / "a", **kw)
    m = ft.load_model(base_dir, device="cpu")
    raises(lambda: m.load_lora(d), types, *needles)
    raises(lambda: lora_io.read_adapter(d, m.config), types)
    # the model stays usable after the failed load
    assert np.isfinite(m.forward([[1, 2, 3]])).all()


def test_adapter_other_model(tmp_path, adapter_dir):
    """An adapter trained on another architecture (hidden 128) does not fit."""
    other = testing.make_checkpoint(tmp_path / "big", preset="tiny-40b", bits=4, group_size=32)
    m = ft.load_model(other, device="cpu")
    raises(lambda: m.load_lora(adapter_dir), ValueError, "adapter_model.safetensors", "expected")


def test_adapter_files(tmp_path, base_dir, adapter_dir, model):
    raises(lambda: model.load_lora(tmp_path / "absent"), FileNotFoundError, "adapter_config.json")
    raises(lambda: model.load_lora(adapter_dir / "adapter_config.json"), FileNotFoundError, "adapter_config.json")
    d = mutated_adapter(adapter_dir, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    raises(lambda: model.load_lora(d), FileNotFoundError, "adapter_model.safetensors")
    for name, blob in (("truncated", (adapter_dir / "adapter_model.safetensors").read_bytes()[:100]),
                       ("garbage", b"\x00\x01" * 64), ("empty", b"")):
        d = mutated_adapter(adapter_dir, tmp_path / name)
        (d / "adapter_model.safetensors").write_bytes(blob)
        raises(lambda: model.load_lora(d), ValueError, "adapter_model.safetensors")
    d = mutated_adapter(adapter_dir, tmp_path / "cfgbin")
    (d / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    raises(lambda: model.load_lora(d), ValueError, "adapter_config.json")


# -- torch .bin adapters, written without torch (the zip + pickle layout torch.save uses) ------


def _bu(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def torch_bin(path: Path, state: dict[str, np.ndarray], pickle_bytes: Optional[bytes] = None) -> Path:
    """Write float32 tensors as a torch.save zip archive (protocol 2 pickle, persistent storages)."""
    p = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    blobs = {}
    for i, (name, a) in enumerate(state.items()):
        a = np.ascontiguousarray(a, dtype="<f4")
        key = str(i)
        blobs[key] = a.tobytes()
        p += _bu(name)
        p += b"ctorch._utils\n_rebuild_tensor_v2\n("
        p += b"(" + _bu("storage") + b"ctorch\nFloatStorage\n" + _bu(key) + _bu("cpu") + _int(a.size) + b"tQ"
        p += _int(0)
        p += b"(" + b"".join(_int(s) for s in a.shape) + b"t"
        strides = [int(s // 4) for s in a.strides] if a.ndim else []
        p += b"(" + b"".join(_int(s) for s in strides) + b"t"
        p += b"\x89"  # requires_grad False
        p += b"ccollections\nOrderedDict\n)R"  # backward hooks
        p += b"tR"
    p += b"u."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", bytes(p) if pickle_bytes is None else pickle_bytes)
        zf.writestr("archive/version", b"3\n")
        for key, blob in blobs.items():
            zf.writestr(f"archive/data/{key}", blob)
    return path


def test_adapter_torch_bin(tmp_path, base_dir, adapter_dir):
    m = ft.load_model(base_dir, device="cpu")
    state = read_tensors(adapter_dir / "adapter_model.safetensors")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", d)
    torch_bin(d / "adapter_model.bin", state)
    m.load_lora(d)  # the well-formed archive loads
    got = m.lora_state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)
    cases = {
        "not_zip": lambda p: p.write_bytes(b"\x80\x02}q\x00."),
        "no_pickle": lambda p: zipfile.ZipFile(p, "w").writestr("archive/other", b"x"),
        "pickle_garbage": lambda p: torch_bin(p, state, pickle_bytes=b"\x80\x02garbage"),
        "pickle_truncated": lambda p: torch_bin(p, state, pickle_bytes=b"\x80\x02}("),
        "pickle_os_system": lambda p: torch_bin(p, state, pickle_bytes=b"\x80\x02cos\nsystem\n" + _bu("true") + b"\x85R."),
        "pickle_list": lambda p: torch_bin(p, state, pickle_bytes=b"\x80\x02]."),
        "storage_missing": lambda p: _drop_member(torch_bin(p, state), "archive/data/0"),
        "zip_truncated": lambda p: p.write_bytes(torch_bin(p, state).read_bytes()[:-30]),
    }
    for name, make in cases.items():
        p = d / "adapter_model.bin"
        p.unlink()
        make(p)
        raises(lambda: m.load_lora(d), ValueError, "adapter_model.bin")
    record_stat("adapter_bin_cases", count=len(cases))


def _drop_member(path: Path, member: str) -> None:
    with zipfile.ZipFile(path) as zf:
        items = [(i, zf.read(i)) for i in zf.namelist() if i != member]
    with zipfile.ZipFile(path, "w") as zf:
        for i, b in items:
            zf.writestr(i, b)


def test_adapter_state_dict_api(model):
    m = model
    m.add_lora(r=2, target_modules=["dense"])
    sd = m.lora_state_dict()
    key = next(iter(sd))
    raises(lambda: m.load_lora_state_dict({}), ValueError, "missing")
    raises(lambda: m.load_lora_state_dict({**sd, "extra": sd[key]}), ValueError, "unexpected")
    raises(lambda: m.load_lora_state_dict({**sd, key: sd[key][:1]}), ValueError, "expected shape")
    raises(lambda: m.load_lora_state_dict({**sd, key: sd[key].astype(np.int32)}), TypeError, "float")
    raises(lambda: m.load_lora_state_dict({**sd, key: np.full_like(sd[key], np.inf)}), ValueError, "non-finite")
    raises(lambda: m.load_lora_state_dict({**sd, key: "abc"}), TypeError, "")
    raises(lambda: m.load_optimizer_state({"exp_avg": sd}), KeyError, "exp_avg_sq")
    m.remove_lora()


# ---------------------------------------------------------------------------------------------
# flags: add_lora, AdamW, generation, checkpointing


FLAG_CASES: dict[str, tuple[Callable[[Any], Any], tuple, tuple[str, ...]]] = {
    "lora_r_zero": (lambda m: m.add_lora(r=0), (ValueError,), ("lora r",)),
    "lora_r_negative": (lambda m: m.add_lora(r=-3), (ValueError,), ("lora r",)),
    "lora_r_bool": (lambda m: m.add_lora(r=True), (ValueError,), ("lora r",)),
    "lora_r_float": (lambda m: m.add_lora(r=2.5), (ValueError,), ("lora r",)),
    "lora_r_huge": (lambda m: m.add_lora(r=10**12), (ValueError,), ("lora r",)),
    "lora_alpha_nan": (lambda m: m.add_lora(r=2, alpha=float("nan")), (ValueError,), ("alpha",)),
    "lora_dropout_one": (lambda m: m.add_lora(r=2, dropout=1.0), (ValueError,), ("dropout",)),
    "lora_dropout_negative": (lambda m: m.add_lora(r=2, dropout=-0.1), (ValueError,), ("dropout",)),
    "lora_targets_unknown": (lambda m: m.add_lora(r=2, target_modules=["q_proj"]), (ValueError,), ("q_proj",)),
    "lora_targets_empty": (lambda m: m.add_lora(r=2, target_modules=[]), (ValueError,), ("target_modules",)),
    "lora_targets_bad_json": (lambda m: m.add_lora(r=2, target_modules="[query_key_value"), (ValueError,), ("target_modules",)),
    "lora_targets_int": (lambda m: m.add_lora(r=2, target_modules=3), (TypeError,), ("target_modules",)),
    "checkpointing_nan": (lambda m: m.set_gradient_checkpointing(float("nan")), (ValueError,), ("checkpointing",)),
    "checkpointing_two": (lambda m: m.set_gradient_checkpointing(2.0), (ValueError,), ("checkpointing",)),
    "adamw_lr_negative": (lambda m: ft.AdamW(m, lr=-1), (ValueError,), ("lr",)),
    "adamw_lr_nan": (lambda m: ft.AdamW(m, lr=float("nan")), (ValueError,), ("lr",)),
    "adamw_beta": (lambda m: ft.AdamW(m, betas=(1.0, 0.9)), (ValueError,), ("betas",)),
    "adamw_eps": (lambda m: ft.AdamW(m, eps=0), (ValueError,), ("eps",)),
    "adamw_without_lora": (lambda m: ft.AdamW(m).step(), (RuntimeError,), ("LoRA",)),
    "backward_without_lora": (lambda m: m.forward_backward([[1, 2]], [[1, 2]]), (RuntimeError,), ("LoRA",)),
    "save_without_lora": (lambda m: m.save_lora("/nonexistent/never"), (RuntimeError,), ("LoRA",)),
    "gen_max_new_negative": (lambda m: m.generate_ids([[1, 2]], max_new_tokens=-1), (ValueError,), ("max_new_tokens",)),
    "gen_beams_zero": (lambda m: m.generate_ids([[1, 2]], max_new_tokens=2, num_beams=0), (ValueError,), ("num_beams",)),
    "gen_temperature": (lambda m: m.generate_ids([[1, 2]], max_new_tokens=2, do_sample=True, temperature=-1.0),
                        (ValueError,), ("temperature",)),
    "gen_top_p": (lambda m: m.generate_ids([[1, 2]], max_new_tokens=2, do_sample=True, top_p=1.5), (ValueError,), ("top_p",)),
    "gen_ids_out_of_range": (lambda m: m.generate_ids([[1, 256]], max_new_tokens=2), (ValueError,), ("input_ids",)),
    "gen_no_tokenizer": (lambda m: m.generate("Bonjour", max_new_tokens=2), (ValueError, RuntimeError), ("tokenizer",)),
    "device_cuda_99": (lambda m: ft.load_model(m.name, device="cuda:99"), (ValueError, RuntimeError), ()),
    "device_unknown": (lambda m: ft.load_model(m.name, device="gpu"), (ValueError,), ("gpu",)),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flag(base_dir, case):
    fn, types, needles = FLAG_CASES[case]
    m = ft.load_model(base_dir, device="cpu")
    raises(lambda: fn(m), types, *needles)
    assert np.isfinite(m.forward([[3, 4]])).all()


# ---------------------------------------------------------------------------------------------
# token ids, masks, labels


IDS_CASES: dict[str, tuple[Any, Any, tuple, tuple[str, ...]]] = {
    # (input_ids, attention_mask, exception types, needles)
    "negative": ([[1, -1]], None, (ValueError,), ("input_ids[0, 1] = -1",)),
    "vocab": ([[1, 256]], None, (ValueError,), ("input_ids[0, 1] = 256", "[0, 256)")),
    "int64_huge": (np.array([[2**40]]), None, (ValueError,), ("input_ids", "int32")),
    "uint64_huge": (np.array([[2**63]], dtype=np.uint64), None, (TypeError, ValueError), ()),
    "float": (np.ones((1, 3)), None, (TypeError,), ("input_ids", "integer")),
    "float16": (np.ones((1, 3), np.float16), None, (TypeError,), ("input_ids",)),
    "bool": (np.ones((1, 3), bool), None, (TypeError,), ("input_ids",)),
    "string": ([["a", "b"]], None, (TypeError,), ("input_ids",)),
    "object": (np.array([[1, None]], dtype=object), None, (TypeError,), ("input_ids",)),
    "complex": (np.ones((1, 2), complex), None, (TypeError,), ("input_ids",)),
    "ragged": ([[1, 2], [3]], None, (ValueError,), ()),
    "scalar": (5, None, (ValueError,), ("input_ids",)),
    "3d": (np.zeros((1, 2, 3), int), None, (ValueError,), ("input_ids",)),
    "empty_tokens": (np.zeros((1, 0), int), None, (ValueError,), ("input_ids",)),
    "empty_batch": (np.zeros((0, 4), int), None, (ValueError,), ("input_ids",)),
    "none": (None, None, (TypeError, ValueError), ()),
    # mask values > 1 are segment ids of packed rows (test_packing.py); they may not decrease
    "mask_segment_decreasing": ([[1, 2]], [[2, 1]], (ValueError,), ("attention_mask", "must not decrease")),
    "mask_negative": ([[1, 2]], [[1, -1]], (ValueError,), ("attention_mask",)),
    "mask_shape": ([[1, 2]], [[1, 1, 1]], (ValueError,), ("attention_mask", "shape")),
    "mask_batch": ([[1, 2]], [[1, 1], [1, 1]], (ValueError,), ("attention_mask",)),
    "mask_float": ([[1, 2]], [[1.0, 1.0]], (TypeError,), ("attention_mask",)),
    "mask_3d": ([[1, 2]], np.ones((1, 1, 2), int), (ValueError,), ("attention_mask",)),
}


@pytest.mark.parametrize("case", sorted(IDS_CASES))
def test_ids(model, case):
    ids, mask, types, needles = IDS_CASES[case]
    raises(lambda: model.forward(ids, mask), types, *needles)
    raises(lambda: model.generate_ids(ids, attention_mask=mask, max_new_tokens=1), types + (ValueError,))


def test_ids_strided_and_masked_rows_are_fine(model):
    ids = np.arange(40).reshape(4, 10)[:, ::2]  # not contiguous: copied, not rejected
    assert model.forward(ids).shape == (4, 5, 256)
    out = model.forward([[1, 2, 3], [4, 5, 6]], np.array([[1, 1, 1], [0, 0, 0]], dtype=bool))
    assert np.isfinite(out).all()  # a fully masked row gives finite logits, not NaN


LABEL_CASES: dict[str, tuple[Any, tuple, tuple[str, ...]]] = {
    "out_of_vocab": ([[1, 256, 3]], (ValueError,), ("labels[0, 1] = 256",)),
    "negative_not_ignore": ([[1, -5, 3]], (ValueError,), ("labels[0, 1] = -5", "-100")),
    "shape": ([[1, 2]], (ValueError,), ("labels", "shape")),
    "float": (np.ones((1, 3)), (TypeError,), ("labels",)),
    "bool": (np.ones((1, 3), bool), (TypeError,), ("labels",)),
    "3d": (np.ones((1, 1, 3), int), (ValueError,), ("labels",)),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_ids_labels(base_dir, case):
    labels, types, needles = LABEL_CASES[case]
    m = ft.load_model(base_dir, device="cpu")
    m.add_lora(r=2)
    raises(lambda: m.forward_backward([[1, 2, 3]], labels), types, *needles)
    raises(lambda: m.forward_backward([[1, 2, 3]], [[1, 2, 3]], grad_scale=float("nan")), ValueError, "grad_scale")
    # all labels ignored: a defined loss, no NaN, no gradient
    loss = m.forward_backward([[1, 2, 3]], [[-100, -100, -100]])
    assert np.isfinite(loss)


def test_ids_closed_model(base_dir):
    m = ft.load_model(base_dir, device="cpu")
    m.close()
    raises(lambda: m.forward([[1, 2]]), RuntimeError, "closed")
    m.close()  # twice is fine


# ---------------------------------------------------------------------------------------------
# datasets (falcontune/data.py)


DATASET_CASES: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    # name: (file content (str or bytes), data_type, needles)
    "empty_file": ("", "alpaca", ("empty",)),
    "whitespace": (" \n\t\n", "alpaca", ("empty",)),
    "empty_array": ("[]", "alpaca", ("empty dataset",)),
    "not_json": ("instruction: bonjour\noutput: salut\n", "alpaca", ("expected a JSON array",)),
    "csv": ("instruction,output\nbonjour,salut\n", "alpaca", ("expected a JSON array",)),
    "number": ("42", "alpaca", ("expected a JSON array",)),
    "null": ("null", "alpaca", ("expected a JSON array",)),
    "single_object": ('{"instruction": "a",\n "output": "b"}', "alpaca", ("single JSON object",)),
    "unterminated": ('[{"instruction": "a", "output": "b"}', "alpaca", ("record 1",)),
    "truncated_string": ('[{"instruction": "a", "output": "b', "alpaca", ("record 1", "not valid JSON")),
    "trailing_comma": ('[{"instruction": "a", "output": "b"},]', "alpaca", ("trailing comma",)),
    "record_string": ('["bonjour"]', "alpaca", ("record 1", "expected a JSON object")),
    "record_list": ('[[1, 2]]', "alpaca", ("record 1", "an array")),
    "record_null": ('[null]', "alpaca", ("record 1",)),
    "missing_output": ('[{"instruction": "a"}]', "alpaca", ("record 1", "'output'", "missing")),
    "missing_instruction": ('[{"output": "a"}]', "alpaca", ("'instruction'",)),
    "null_output": ('[{"instruction": "a", "output": null}]', "alpaca", ("'output'", "null")),
    "number_output": ('[{"instruction": "a", "output": 3}]', "alpaca", ("'output'", "a number")),
    "bool_input": ('[{"instruction": "a", "input": true, "output": "b"}]', "alpaca", ("'input'", "boolean")),
    "object_instruction": ('[{"instruction": {"x": 1}, "output": "b"}]', "alpaca", ("'instruction'", "object")),
    "empty_instruction": ('[{"instruction": "", "output": "b"}]', "alpaca", ("'instruction'", "empty")),
    "gpt4all_given_alpaca": ('[{"prompt": "a", "response": "b"}]', "alpaca", ("gpt4all",)),
    "alpaca_given_gpt4all": ('[{"instruction": "a", "output": "b"}]', "gpt4all", ("alpaca",)),
    "second_record_bad": ('[{"instruction": "a", "output": "b"}, {"instruction": 1, "output": "b"}]', "alpaca",
                          ("record 2",)),
    "jsonl_bad_line": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp\n', "alpaca", ("record 2", "line 2")),
    "jsonl_array_line": ('{"instruction": "a", "output": "b"}\n[1]\n', "alpaca", ("record 2",)),
    "deep_array": ("[" * 100_000, "alpaca", ("nested too deeply",)),
    "deep_jsonl": ('{"a": ' + "[" * 100_000 + "\n", "alpaca", ("nested too deeply",)),
    "latin1": ('[{"instruction": "été", "output": "b"}]'.encode("latin-1"), "alpaca", ("UTF-8",)),
    "utf16": ('[{"instruction": "a", "output": "b"}]'.encode("utf-16"), "alpaca", ("UTF-8",)),
    "nul_bytes": (b"\x00" * 64, "alpaca", ("expected a JSON array",)),
    "binary": (bytes(range(256)), "alpaca", ()),
    "after_array": ('[{"instruction": "a", "output": "b"}] [1]', "alpaca", ("after the closing",)),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_dataset(tmp_path, case):
    content, data_type, needles = DATASET_CASES[case]
    p = tmp_path / ("data.jsonl" if "jsonl" in case else "data.json")
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    raises(lambda: data.load_records(p, data_type=data_type), data.DatasetError, str(p), *needles)
    report = ft.check_dataset(p, data_type=data_type)
    assert not report.ok and report.errors


def test_dataset_paths_and_flags(tmp_path):
    raises(lambda: data.load_records(tmp_path / "absent.json"), data.DatasetError, "absent.json", "not found")
    raises(lambda: data.load_records(tmp_path), data.DatasetError, "directory")
    p = tmp_path / "ok.json"
    p.write_text('[{"instruction": "a", "output": "b"}]')
    raises(lambda: data.load_records(p, data_type="sharegpt"), ValueError, "sharegpt")
    raises(lambda: ft.check_dataset(p, data_type="sharegpt"), ValueError, "sharegpt")
    raises(lambda: data.train_val_split(10, val_set_size=-0.5), ValueError, "val_set_size")
    raises(lambda: data.train_val_split(3, val_set_size=3), ValueError, "val_set_size")
    raises(lambda: data.length_grouped_batches([3, 4], 0), ValueError, "mbatch_size")
    raises(lambda: data.get_template("mistral"), ValueError, "mistral")


# ---------------------------------------------------------------------------------------------
# output directories: nothing half-written


def test_output_unwritable(tmp_path, base_dir):
    m = ft.load_model(base_dir, device="cpu")
    m.add_lora(r=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    raises(lambda: m.save_lora(blocker / "adapter"), OSError, str(blocker / "adapter"))
    raises(lambda: m.save_lora(blocker), OSError, str(blocker))
    raises(lambda: save_safetensors(blocker / "x.safetensors", {"a": np.zeros(2)}), OSError)
    # the target file name is taken by a directory: the rename fails, no temp file is left
    out = tmp_path / "out"
    (out / "adapter_model.safetensors").mkdir(parents=True)
    raises(lambda: m.save_lora(out), OSError)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            raises(lambda: m.save_lora(ro), OSError)
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o700)


def test_output_failed_write_keeps_old_file(tmp_path):
    p = save_safetensors(tmp_path / "w.safetensors", {"a": np.arange(4, dtype=np.float32)})
    before = p.read_bytes()
    raises(lambda: save_safetensors(p, {"a": np.zeros(2, dtype=np.complex64)}), ValueError, "'a'")
    raises(lambda: save_safetensors(p, {"a": np.zeros(2)}, metadata={"k": 1}), ValueError, "metadata")
    raises(lambda: save_safetensors(p, {"": np.zeros(2)}), ValueError, "name")
    raises(lambda: save_safetensors(p, {"a": np.zeros(2, np.float32)}, dtypes={"a": "BF16"}), ValueError, "BF16")
    assert p.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["w.safetensors"]


def test_output_adapter_round_trip_after_errors(tmp_path, base_dir):
    """After all these failures a normal save / load still gives the same adapter."""
    m = ft.load_model(base_dir, device="cpu")
    m.add_lora(r=3, target_modules=["dense_h_to_4h"], seed=5)
    sd = m.lora_state_dict()
    out = m.save_lora(tmp_path / "ok")
    m2 = ft.load_model(base_dir, device="cpu")
    m2.load_lora(out)
    for k, v in m2.lora_state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


# ---------------------------------------------------------------------------------------------
# interrupted training: kill -9 at random moments, Ctrl-C, then --resume_checkpoint


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "passive")  # a loaded CI box: no spinning OpenMP barriers
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ft.__file__).resolve().parent.parent)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory) -> dict[str, Any]:
    from falcontune.data import make_prompt
    root = tmp_path_factory.mktemp("kill")
    sample = Path(__file__).resolve().parent.parent / "datasets" / "fr_instructions.json"
    records = json.loads(sample.read_text(encoding="utf-8"))[:12]
    texts = [make_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records]
    tok = train_demo_tokenizer(texts, vocab_size=400, out_path=root / "tokenizer.json")
    model = testing.make_checkpoint(root / "model", preset="tiny", vocab_size=tok.vocab_size,
                                    tokenizer=root / "tokenizer.json")
    (root / "data.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {"root": root, "model": model, "data": root / "data.json"}


def _finetune_cmd(setup: dict[str, Any], out: Path, resume: bool) -> list[str]:
    import sys
    cmd = [sys.executable, "-m", "falcontune.cli", "finetune", f"--model={setup['model']}",
           f"--dataset={setup['data']}", f"--lora_out_dir={out}", "--mbatch_size=1", "--batch_size=2", "--epochs=2",
           "--lr=5e-3", "--cutoff_len=96", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.1", "--warmup_steps=2",
           "--save_steps=1", "--save_total_limit=2", "--logging_steps=1", "--backend=cpu"]
    return cmd + (["--resume_checkpoint=true"] if resume else [])


def _has_checkpoint(out: Path) -> bool:
    return any((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*"))


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                  if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file())


def test_kill_and_resume_gives_the_same_adapter(kill_setup, tmp_path):
    """The CLI killed with SIGKILL at random moments (and once with Ctrl-C), then resumed with
    --resume_checkpoint=true until it finishes: the final adapter equals an uninterrupted run's
    bit for bit. FT_KILL_POINTS sets how many interruptions (default 3), FT_KILL_SEED the draw.

    Interruption 1 comes at a random time during start-up / the first steps, interruption 2 is a
    Ctrl-C as soon as the run has written a new checkpoint, the others a SIGKILL at a random time
    within the step after a randomly chosen checkpoint (so some land while a checkpoint is being
    written or rotated)."""
    import random
    import signal
    import subprocess
    import time

    env = _cli_env()
    base_out = tmp_path / "uninterrupted"
    t0 = time.monotonic()
    proc = subprocess.Popen(_finetune_cmd(kill_setup, base_out, False), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t_first = None
    while proc.poll() is None:
        if t_first is None and _steps(base_out):
            t_first = time.monotonic() - t0
        time.sleep(0.005)
    t_base = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    total = _steps(base_out)[-1]
    t_first = t_first or t_base
    step_time = max(t_base - t_first, 0.05) / max(total - 1, 1)
    expected = read_tensors(base_out / "adapter_model.safetensors")

    rng = random.Random(int(os.environ.get("FT_KILL_SEED", "7")))
    n_points = int(os.environ.get("FT_KILL_POINTS", "3"))
    out = tmp_path / "interrupted"
    kills = []
    for i in range(n_points):
        done = _steps(out)
        if done and done[-1] >= total - 1:
            break  # nothing left to interrupt
        resume = bool(done)
        log = open(tmp_path / f"run{i}.log", "w")
        t0 = time.monotonic()
        seen = set(done)
        proc = subprocess.Popen(_finetune_cmd(kill_setup, out, resume), env=env, stdout=log, stderr=subprocess.STDOUT)
        if i == 1:
            sig, where = signal.SIGINT, "after the next checkpoint"
            while proc.poll() is None and not set(_steps(out)) - seen:
                time.sleep(0.002)
        elif i == 0:
            sig, delay = signal.SIGKILL, rng.uniform(0.0, t_first + step_time)
            where = f"{delay:.2f} s after start"
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        else:
            sig = signal.SIGKILL
            target = rng.randint((done[-1] if done else 0) + 1, total - 1)
            frac = rng.uniform(0.0, 1.0)
            where = f"{frac:.2f} of a step after checkpoint-{target}"
            while proc.poll() is None and target not in _steps(out):
                time.sleep(0.002)
            try:
                proc.wait(timeout=frac * step_time)
            except subprocess.TimeoutExpired:
                pass
        landed = "mid-run" if proc.poll() is None else "after exit"
        if landed == "mid-run":
            proc.send_signal(sig)
        proc.wait(timeout=120)
        log.close()
        kills.append({"signal": sig.name, "at_s": round(time.monotonic() - t0, 2), "where": where, "landed": landed,
                      "returncode": proc.returncode, "resumed": resume, "checkpoints_after": _steps(out)})
        if sig == signal.SIGINT and landed == "mid-run":
            text = (tmp_path / f"run{i}.log").read_text()
            assert proc.returncode in (130, 0), text[-2000:]  # 0: the signal came during the final save
            assert _steps(out) and (out / "adapter_model.safetensors").is_file(), text[-2000:]
    # finish the run
    r = subprocess.run(_finetune_cmd(kill_setup, out, bool(_steps(out))), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = read_tensors(out / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((base_out / "adapter_config.json").read_text())
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    record_stat("kill_points", baseline_s=round(t_base, 2), total_steps=total, interruptions=kills,
                temp_leftovers=leftovers, identical=True)
    assert sum(k["landed"] == "mid-run" for k in kills) >= min(n_points, 2), kills
