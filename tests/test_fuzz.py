"""Bounded fuzzing (hypothesis) of everything that reads user input: only documented exception
types may come out, never a crash (a crash kills pytest; tools/sanitize.sh runs these under
ASan + UBSan as well).

Budget: the whole file stays well under 60 s on 2 CI cores. FT_FUZZ_SCALE=10 multiplies every
example count, FT_FUZZ_RANDOM=1 draws new inputs each run (the default is derandomized, so CI
sees the same inputs every time). Iteration counts go to tools/reliability_report.py through
FT_RELIABILITY_STATS.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import falcontune as ft  # noqa: E402
from falcontune import data, lora_io, testing  # noqa: E402
from falcontune.models import (config_to_hf_dict, parse_config, parse_quantize_config,  # noqa: E402
                               quantize_config_to_dict)
from falcontune.tokenizer import train_demo_tokenizer  # noqa: E402
from falcontune.weights import ST_DTYPES, SafetensorsFile, WeightStore, save_safetensors, to_float32  # noqa: E402

from test_robustness import read_tensors, record_stat, torch_bin, weights_file  # noqa: E402

#: what user input may raise; anything else (or a crash) is a bug
DOCUMENTED = (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)

SCALE = float(os.environ.get("FT_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("FT_FUZZ_RANDOM", "") not in ("", "0")
COUNTS: Counter = Counter()
OUTCOMES: Counter = Counter()


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=not RANDOM,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def run(target: str, fn, *args: Any, names: Any = (), allowed: tuple = DOCUMENTED, **kw: Any) -> Any:
    """Call fn; count the outcome; re-raise anything undocumented. An error's message must hold
    one of ``names`` (the file, tensor or flag at fault) when given."""
    COUNTS[target] += 1
    try:
        out = fn(*args, **kw)
    except allowed as e:
        OUTCOMES[(target, type(e).__name__)] += 1
        msg = str(e)
        assert msg, f"{type(e).__name__} without a message"
        alternatives = (names,) if isinstance(names, (str, os.PathLike)) else tuple(names)
        assert not alternatives or any(str(n) in msg for n in alternatives), \
            f"{type(e).__name__}: {msg!r} names none of {alternatives}"
        return e
    OUTCOMES[(target, "ok")] += 1
    return out


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    for target, n in sorted(COUNTS.items()):
        outcomes = {k[1]: v for k, v in OUTCOMES.items() if k[0] == target}
        record_stat("fuzz", target=target, iterations=n, outcomes=outcomes)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return testing.make_checkpoint(work / "ckpt", preset="tiny", bits=4, group_size=32, seed=4)


@pytest.fixture(scope="module")
def model(ckpt):
    m = ft.load_model(ckpt, device="cpu")
    m.add_lora(r=2, target_modules=["query_key_value", "dense_4h_to_h"])
    return m


@pytest.fixture(scope="module")
def adapter(work, model) -> Path:
    model.load_lora_state_dict(testing.random_lora(model.config, 2, ["query_key_value", "dense_4h_to_h"], seed=1))
    return model.save_lora(work / "adapter")


def fresh(work: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=name, dir=work))


# ---------------------------------------------------------------------------------------------
# JSON values

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@st.composite
def edited_dict(draw, base: dict, keys: list[str]) -> dict:
    """base with a few keys replaced by random JSON, deleted, or random keys added."""
    d = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "nudge"]))
        key = draw(st.sampled_from(keys))
        if op == "replace":
            d[key] = draw(json_values)
        elif op == "delete":
            d.pop(key, None)
        elif op == "add":
            d[draw(st.text(max_size=10))] = draw(json_values)
        elif isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            d[key] = d[key] + draw(st.integers(-70, 70))
    return d


# ---------------------------------------------------------------------------------------------
# safetensors


def _read_everything(path: Path) -> None:
    with SafetensorsFile(path) as f:
        for name in f.names():
            a = f.tensor(name)
            if f.dtype(name) in ("F16", "BF16", "F32", "F64"):
                to_float32(a, f.dtype(name))
            else:
                a.sum()


@given(blob=st.binary(max_size=300))
@fuzz_settings(300)
def test_fuzz_random_bytes(work, blob):
    p = work / "random.safetensors"
    p.write_bytes(blob)
    run("SafetensorsFile(random bytes)", _read_everything, p, names=p)


_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(sorted(ST_DTYPES) + ["Q4", "", "f32"]) | json_scalars,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | json_values,
})


@given(header=st.dictionaries(st.text(max_size=6), _entry | json_values, max_size=4), pad=st.integers(0, 96),
       lie=st.sampled_from([0, 0, 0, 1, -1, 7, 2**63]))
@fuzz_settings(300)
def test_fuzz_safetensors_headers(work, header, pad, lie):
    h = json.dumps(header).encode()
    p = work / "header.safetensors"
    p.write_bytes(struct.pack("<Q", (len(h) + lie) % 2**64) + h + bytes(range(pad)))
    run("SafetensorsFile(random header)", _read_everything, p, names=p)


@st.composite
def byte_edits(draw, size: int, header_end: int):
    """One region per example: the length prefix, the JSON header, or the tensor data (where
    the file still parses and the values reach the engine's checks)."""
    edits = []
    where = draw(st.sampled_from(["header", "data", "data", "length", "truncate"]))
    lo, hi = {"length": (0, 7), "header": (8, header_end - 1), "data": (header_end, size - 1)}.get(where, (0, size - 1))
    for _ in range(draw(st.integers(0 if where == "truncate" else 1, 6))):
        pos = draw(st.integers(lo, hi))
        edits.append((pos, draw(st.sampled_from([b'"', b"[", b"]", b"{", b"}", b",", b"0", b"9", b"-", b" ", b"\xff",
                                                  b"\x00", b"e", b"F", b"I"]) | st.binary(min_size=1, max_size=1))))
    cut = draw(st.integers(0, size)) if where == "truncate" else None
    return edits, cut


@pytest.fixture(scope="module")
def ckpt_bytes(ckpt):
    raw = weights_file(ckpt).read_bytes()
    return raw, 8 + struct.unpack("<Q", raw[:8])[0]


@given(data_=st.data())
@fuzz_settings(250)
def test_fuzz_mutated_checkpoint(work, ckpt, ckpt_bytes, data_):
    raw, header_end = ckpt_bytes
    edits, cut = data_.draw(byte_edits(len(raw), header_end))
    blob = bytearray(raw)
    for pos, b in edits:
        blob[pos:pos + 1] = b
    if cut is not None:
        blob = blob[:cut]
    d = fresh(work, "mut")
    for name in ("config.json", "quantize_config.json"):
        shutil.copy(ckpt / name, d / name)
    (d / weights_file(ckpt).name).write_bytes(bytes(blob))
    run("WeightStore.open(mutated checkpoint)", lambda: WeightStore.open(d).close(), names=d)
    m = run("load_model(mutated checkpoint)", ft.load_model, d, device="cpu", names=d)
    if isinstance(m, ft.FalconModel):
        # whatever loaded must compute (NaN weights are rejected at load)
        logits = m.forward([[1, 2, 3]])
        assert logits.shape == (1, 3, 256)
    shutil.rmtree(d)


@given(tensors=st.data())
@fuzz_settings(120)
def test_fuzz_checkpoint_tensors(work, ckpt, tensors):
    """Structured mutations: a tensor gets another dtype / shape / values, goes missing, or appears."""
    base = read_tensors(weights_file(ckpt))
    names = sorted(base)
    t = dict(base)
    for _ in range(tensors.draw(st.integers(1, 3))):
        name = tensors.draw(st.sampled_from(names))
        op = tensors.draw(st.sampled_from(["dtype", "shape", "values", "drop", "rename", "transpose"]))
        a = t.get(name, base[name])
        if op == "dtype":
            dt = tensors.draw(st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.int64, np.int8,
                                               np.uint8, np.uint16, np.bool_]))
            with np.errstate(invalid="ignore", over="ignore"):
                t[name] = a.astype(dt) if a.dtype != np.int32 or dt != np.float16 else (a & 0xFF).astype(dt)
        elif op == "shape":
            flat = a.reshape(-1)
            n = tensors.draw(st.integers(0, flat.size + 4))
            t[name] = np.resize(flat, n).reshape(tensors.draw(st.sampled_from([(n,), (1, n), (n, 1)])))
        elif op == "values":
            b = a.copy()
            flat = b.reshape(-1)
            i = tensors.draw(st.integers(0, max(0, flat.size - 1)))
            if flat.size:
                if b.dtype.kind == "f":
                    flat[i] = tensors.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 6e4, -1e-30]))
                else:
                    flat[i] = tensors.draw(st.integers(np.iinfo(b.dtype).min, np.iinfo(b.dtype).max))
            t[name] = b
        elif op == "drop":
            t.pop(name, None)
        elif op == "rename":
            t[tensors.draw(st.sampled_from([name.replace("h.0", "h.9"), name + "x", "model." + name,
                                            name.replace("query_key_value", "dense")]))] = t.pop(name, a)
        else:
            t[name] = np.ascontiguousarray(a.T)
    d = fresh(work, "tens")
    for n_ in ("config.json", "quantize_config.json"):
        shutil.copy(ckpt / n_, d / n_)
    try:
        save_safetensors(d / "model.safetensors", t)
    except ValueError:
        return  # e.g. a name clash made by "rename"
    m = run("load_model(tensor mutations)", ft.load_model, d, device="cpu", names=d)
    if isinstance(m, ft.FalconModel):
        assert np.isfinite(m.forward([[5, 6, 7, 8]])).all()
    shutil.rmtree(d)


# ---------------------------------------------------------------------------------------------
# configs


BASE_CONFIG = config_to_hf_dict(testing.preset_config("tiny"))
BASE_QCONFIG = quantize_config_to_dict(parse_quantize_config({"bits": 4, "group_size": 32}))


def _config_round_trip(d: Any) -> None:
    cfg = parse_config(d, source="fuzz")
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    assert all(fin > 0 and fout > 0 for fin, fout in cfg.linear_shapes.values())
    assert parse_config(config_to_hf_dict(cfg)) == cfg


@given(d=json_values)
@fuzz_settings(300)
def test_fuzz_parse_config_random(d):
    run("parse_config(random JSON)", _config_round_trip, d, names="fuzz")


@given(d=edited_dict(BASE_CONFIG, sorted(BASE_CONFIG) + ["n_head", "n_layer", "n_head_kv", "rope_parameters"]))
@fuzz_settings(400)
def test_fuzz_parse_config_edited(d):
    run("parse_config(edited config)", _config_round_trip, d, names="fuzz")


def _qconfig_round_trip(d: Any) -> None:
    q = parse_quantize_config(d, source="fuzz")
    assert q.bits in (2, 3, 4, 8)
    assert parse_quantize_config(quantize_config_to_dict(q)) == q


@given(d=json_values | edited_dict(BASE_QCONFIG, sorted(BASE_QCONFIG) + ["format", "quantization_config", "is_marlin_format"]))
@fuzz_settings(400)
def test_fuzz_parse_quantize_config(d):
    run("parse_quantize_config(random/edited JSON)", _qconfig_round_trip, d, names="fuzz")


@given(cfg=st.just(BASE_CONFIG) | edited_dict(BASE_CONFIG, sorted(BASE_CONFIG)),
       q=st.just(BASE_QCONFIG) | edited_dict(BASE_QCONFIG, ["bits", "group_size", "checkpoint_format", "desc_act"]))
@fuzz_settings(120)
def test_fuzz_load_with_edited_configs(work, ckpt, cfg, q):
    d = fresh(work, "cfg")
    shutil.copy(weights_file(ckpt), d / weights_file(ckpt).name)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "quantize_config.json").write_text(json.dumps(q))
    m = run("load_model(edited config.json / quantize_config.json)", ft.load_model, d, device="cpu", names=d)
    if isinstance(m, ft.FalconModel):
        assert np.isfinite(m.forward([[1, 2]])).all()
    shutil.rmtree(d)


# ---------------------------------------------------------------------------------------------
# adapters


ADAPTER_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "bias", "use_rslora",
                "fan_in_fan_out", "use_dora", "layers_to_transform", "base_model_name_or_path"]
TARGET_CHOICES = st.lists(st.sampled_from(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "q_proj"]),
                          max_size=4)


@pytest.fixture(scope="module")
def plain_model(ckpt):
    return ft.load_model(ckpt, device="cpu")


@given(data_=st.data())
@fuzz_settings(200)
def test_fuzz_adapter_dirs(work, plain_model, adapter, data_):
    d = fresh(work, "ad")
    shutil.copytree(adapter, d, dirs_exist_ok=True)
    base_cfg = json.loads((adapter / "adapter_config.json").read_text())
    kind = data_.draw(st.sampled_from(["config", "config", "tensors", "tensors", "bytes", "bin", "both"]))
    if kind in ("config", "both"):
        cfg = data_.draw(edited_dict(base_cfg, ADAPTER_KEYS) | st.builds(lambda t: {**base_cfg, "target_modules": t},
                                                                        TARGET_CHOICES))
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if kind in ("tensors", "both", "bin"):
        t = read_tensors(adapter / "adapter_model.safetensors")
        names = sorted(t)
        for _ in range(data_.draw(st.integers(0 if kind == "bin" else 1, 3))):
            name = data_.draw(st.sampled_from(names))
            if name not in t:
                continue
            op = data_.draw(st.sampled_from(["drop", "shape", "dtype", "nan", "rename", "big"]))
            if op == "drop":
                t.pop(name)
            elif op == "shape":
                a = t[name]
                t[name] = a[: data_.draw(st.integers(0, a.shape[0]))] if data_.draw(st.booleans()) else a.T.copy()
            elif op == "dtype" and kind != "bin":
                with np.errstate(invalid="ignore", over="ignore"):
                    t[name] = t[name].astype(data_.draw(st.sampled_from([np.float16, np.float64, np.int32, np.uint8,
                                                                         np.bool_])))
            elif op == "nan" and t[name].size:
                t[name] = t[name].astype(np.float32 if t[name].dtype.kind != "f" else t[name].dtype)
                t[name].reshape(-1)[0] = np.nan
            elif op == "rename":
                t[data_.draw(st.sampled_from([name.replace("h.0.", "h.5."), name.replace("lora_A", "lora_C"),
                                              name.replace("base_model.model.", ""), name.replace(".weight", ".default.weight"),
                                              "transformer.h.x.mlp.dense.lora_A.weight"]))] = t.pop(name)
            else:
                t[name] = t[name] * np.float32(1e3)
        if kind == "bin":
            (d / "adapter_model.safetensors").unlink()
            torch_bin(d / "adapter_model.bin", {k: np.asarray(v, np.float32) for k, v in t.items()})
        else:
            save_safetensors(d / "adapter_model.safetensors", t)
    if kind == "bytes":
        target = d / "adapter_model.safetensors"
        blob = bytearray(target.read_bytes())
        for _ in range(data_.draw(st.integers(1, 5))):
            pos = data_.draw(st.integers(0, len(blob) - 1))
            blob[pos] = data_.draw(st.integers(0, 255))
        target.write_bytes(bytes(blob[: data_.draw(st.integers(0, len(blob)))]))
    m = plain_model
    run("read_adapter(mutated adapter dir)", lora_io.read_adapter, d, m.config, names=d)
    out = run("FalconModel.load_lora(mutated adapter dir)", m.load_lora, d, names=d)
    if not isinstance(out, BaseException):
        assert np.isfinite(m.forward([[9, 8, 7]])).all()
    else:
        assert np.isfinite(m.forward([[9, 8, 7]])).all()  # still usable
    shutil.rmtree(d)


# ---------------------------------------------------------------------------------------------
# datasets


FIELDS = ["instruction", "input", "output", "prompt", "response"]
record_values = st.one_of(st.text(max_size=30), json_values)
records = st.lists(st.one_of(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), record_values, max_size=5),
                             st.fixed_dictionaries({"instruction": st.text(max_size=30), "output": st.text(max_size=30)},
                                                   optional={"input": st.text(max_size=30)}),
                             json_values), max_size=6)


@st.composite
def dataset_text(draw) -> bytes:
    kind = draw(st.sampled_from(["array", "jsonl", "array_corrupt", "jsonl_corrupt", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    recs = draw(records)
    if kind.startswith("array"):
        text = json.dumps(recs, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in recs)
    if kind.endswith("corrupt") and text:
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(text)))
            text = text[:pos] + draw(st.sampled_from(['"', ",", "]", "[", "{", "}", "\n", "", "\\", "\x00"])) + text[pos + 1:]
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def tokenizer(work):
    return train_demo_tokenizer(["Bonjour le monde, voici un petit texte.", "Réponse: oui"] * 3,
                                            vocab_size=300)


@given(blob=dataset_text(), data_type=st.sampled_from(["alpaca", "gpt4all"]), use_tok=st.booleans())
@fuzz_settings(400)
def test_fuzz_datasets(work, tokenizer, blob, data_type, use_tok):
    p = work / "data.json"
    p.write_bytes(blob)
    loaded = run("load_records(random dataset)", data.load_records, p, data_type=data_type, names=p)
    report = run("check_dataset(random dataset)", ft.check_dataset, p, data_type=data_type,
                 tokenizer=tokenizer if use_tok else None, cutoff_len=16)
    assert not isinstance(report, BaseException), report  # check_dataset reports, it does not raise
    assert report.ok == (not isinstance(loaded, BaseException)), (report, loaded)
    if report.ok:
        assert report.n_valid == len(loaded)
        toks = run("tokenize_records(valid random dataset)", data.tokenize_records, loaded, tokenizer,
                   data_type=data_type, cutoff_len=16)
        assert not isinstance(toks, BaseException), toks


# ---------------------------------------------------------------------------------------------
# engine inputs: ids, masks, labels


#: an engine-input error names the argument at fault (numpy's own conversion errors say "array")
FLAGS = ("input_ids", "attention_mask", "labels", "array", "cast", "int32")
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
OTHER_DTYPES = [np.float32, np.float64, np.bool_, np.float16, np.complex64, object]


@st.composite
def int_arrays(draw, vocab: int):
    ndim = draw(st.sampled_from([2, 2, 2, 1, 0, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dt = draw(st.sampled_from(INT_DTYPES * 3 + OTHER_DTYPES))
    n = int(np.prod(shape)) if shape else 1
    lo, hi = draw(st.sampled_from([(0, vocab - 1), (0, vocab - 1), (-3, vocab + 3), (-2**40, 2**40)]))
    vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    a = np.array(vals, dtype=object).reshape(shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(dt) if dt is not object else a
    except (OverflowError, ValueError, TypeError):
        return a


@st.composite
def masks(draw, like: Any):
    kind = draw(st.sampled_from(["none", "ones", "binary", "binary", "random", "shape"]))
    shape = getattr(like, "shape", ())
    if kind == "none":
        return None
    if kind == "shape":
        return np.ones(tuple(draw(st.lists(st.integers(0, 5), min_size=2, max_size=2))), np.int64)
    if kind == "ones":
        return np.ones(shape, draw(st.sampled_from([np.int64, np.bool_, np.int8])))
    n = int(np.prod(shape)) if shape else 1
    values = [0, 1] if kind == "binary" else [-1, 0, 1, 2, 255]
    m = np.array(draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)), dtype=np.int64).reshape(shape)
    return m.astype(draw(st.sampled_from([np.int64, np.int32, np.uint8, np.float32])))


@given(data_=st.data())
@fuzz_settings(400)
def test_fuzz_forward(model, data_):
    V = model.config.vocab_size
    ids = data_.draw(int_arrays(V))
    mask = data_.draw(masks(ids))
    out = run("FalconModel.forward(random ids, mask)", model.forward, ids, mask, names=FLAGS)
    if isinstance(out, np.ndarray):
        a = np.asarray(ids)
        assert out.shape[-1] == V and np.isfinite(out).all()
        assert out.shape[:2] == (a.reshape(1, -1) if a.ndim == 1 else a).shape
    labels = data_.draw(st.one_of(st.just(ids), int_arrays(V)))
    run("FalconModel.forward_backward(random ids, labels, mask)", model.forward_backward, ids, labels, mask,
        names=FLAGS)
    if data_.draw(st.integers(0, 3)) == 0:
        run("FalconModel.generate_ids(random ids, mask)", model.generate_ids, ids, attention_mask=mask,
            max_new_tokens=data_.draw(st.integers(-1, 3)), num_beams=data_.draw(st.integers(0, 2)),
            do_sample=data_.draw(st.booleans()), names=FLAGS + ("max_new_tokens", "num_beams"))
    # the model is intact afterwards
    if COUNTS["FalconModel.forward(random ids, mask)"] % 10 == 0:
        assert np.isfinite(model.forward([[1, 2, 3]])).all()
