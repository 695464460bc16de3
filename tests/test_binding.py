"""The binding (csrc/pymodule.c and py_*.c) and the one description of the Falcon layer.

* ``_C.MODULES`` / ``falcontune.layout``: the module table of csrc/common.c is what every Python
  user reads (no file restates the module names), and its widths are right for every qkv layout.
* Text signatures: ``inspect.signature`` works on every C function and method.
* The busy guard covers every method, including the cheap readers (cache_len, get_rng, lora_info)
  that race with a decode step running with the GIL released.
* Device strings are parsed strictly.
"""
from __future__ import annotations

import ast
import inspect
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, layout, testing
from falcontune.models import FALCON_7B_CONFIG, FALCON_40B_CONFIG, FALCON_RW_1B_CONFIG, parse_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    testing.make_checkpoint(d, preset="tiny", bits=4, group_size=32, seed=3)
    return d


# ---------------------------------------------------------------------------------------------
# the module table


def test_module_table_is_the_engine_order():
    assert [m.name for m in layout.MODULES] == [e[0] for e in _C.MODULES]
    assert [m.index for m in layout.MODULES] == list(range(len(_C.MODULES)))
    assert len(set(layout.MODULE_NAMES)) == len(layout.MODULES)
    assert {m.parent for m in layout.MODULES} == {"self_attention", "mlp"}
    assert {m.in_width for m in layout.MODULES} | {m.out_width for m in layout.MODULES} == {"hidden", "ffn", "qkv"}
    assert layout.QKV_LAYOUTS == ("multi_query", "grouped", "interleaved")
    qkv = layout.module("query_key_value")
    assert qkv.path == "self_attention.query_key_value" and qkv.out_width == "qkv"
    key = layout.lora_key(3, "dense_4h_to_h", "B")
    assert key == "base_model.model.transformer.h.3.mlp.dense_4h_to_h.lora_B.weight"
    assert layout.target_mask(["dense", "query_key_value"]) == 0b11
    with pytest.raises(ValueError, match="q_proj"):
        layout.module("q_proj")


@pytest.mark.parametrize("cfg, qkv", [(FALCON_7B_CONFIG, 4544 + 2 * 64),          # 71 q heads + 1 k + 1 v
                                      (FALCON_40B_CONFIG, (128 + 2 * 8) * 64),    # 8 groups of 16 q + k + v
                                      (FALCON_RW_1B_CONFIG, 3 * 2048)])           # q, k, v per head
def test_linear_shapes_of_real_configs(cfg, qkv):
    c = parse_config(cfg)
    h, f = c.hidden_size, c.ffn_hidden_size
    assert c.linear_shapes == {"self_attention.query_key_value": (h, qkv), "self_attention.dense": (h, h),
                               "mlp.dense_h_to_4h": (h, f), "mlp.dense_4h_to_h": (f, h)}
    assert c.qkv_out == qkv
    assert layout.widths(c) == {"hidden": h, "ffn": f, "qkv": qkv}


@pytest.mark.parametrize("preset", ["tiny", "tiny-40b", "tiny-rw"])
def test_engine_lora_shapes_follow_the_table(preset, tmp_path):
    testing.make_checkpoint(tmp_path, preset=preset, bits=4, group_size=32, seed=1)
    m = ft.load_model(tmp_path, device="cpu")
    m.add_lora(r=3, target_modules=layout.MODULE_NAMES)
    shapes = m.config.linear_shapes
    for mod in layout.MODULES:
        A, B = m.engine.lora_read(0, 0, mod.index)
        fin, fout = shapes[mod.path]
        assert A.shape == (3, fin) and B.shape == (fout, 3), mod.name
    assert m.engine.lora_info()[1] == (1 << len(layout.MODULES)) - 1


def test_module_shapes_rejects_bad_configs():
    kw = dict(hidden=64, ffn=256, n_head=4, n_kv_head=4, head_dim=16)
    assert _C.module_shapes(**kw, qkv_layout="interleaved")[0] == (64, 192)
    with pytest.raises(ValueError, match="qkv_layout"):
        _C.module_shapes(**kw, qkv_layout="fused")
    with pytest.raises(ValueError, match="query_key_value"):  # 3 * 2^30 does not fit in an int
        _C.module_shapes(**dict(kw, hidden=2 ** 30), qkv_layout="interleaved")
    with pytest.raises(ValueError, match="dense_h_to_4h"):
        _C.module_shapes(**dict(kw, ffn=0), qkv_layout="grouped")
    with pytest.raises(TypeError):  # keywords only: widths are easy to swap
        _C.module_shapes(64, 256, 4, 4, 16, "grouped")


def _string_literals(path: Path) -> str:
    """The string constants of a source file, docstrings and comments left out."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        tree = ast.parse(text)
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        return " ".join(n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs)
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)
    return " ".join(re.findall(r'"(?:[^"\\\n]|\\.)*"', text))


def test_no_other_file_restates_the_module_table():
    """Module names / parents appear as literals only in the table (common.c) and layout.py; the
    default LoRA target ("query_key_value") may be named where a default is set."""
    words = ("dense_h_to_4h", "dense_4h_to_h", "self_attention", "mlp.")
    py = [p for p in (REPO / "falcontune").glob("*.py") if p.name != "layout.py"]
    c = [p for ext in ("*.c", "*.h", "*.cu", "*.cuh") for p in (REPO / "csrc").rglob(ext) if p.name != "common.c"]
    offenders = [f"{p.relative_to(REPO)}: {w}" for p in py + c for w in words
                 if w in _string_literals(p)]
    assert not offenders


# ---------------------------------------------------------------------------------------------
# text signatures


def _c_callables():
    for name in dir(_C):
        obj = getattr(_C, name)
        if callable(obj) and not isinstance(obj, type):
            yield f"_C.{name}", obj
    for cls in (_C.Model, _C.OpRunner):
        yield f"_C.{cls.__name__}", cls
        for name, obj in vars(cls).items():
            if not name.startswith("_") and callable(obj):
                yield f"_C.{cls.__name__}.{name}", obj


def test_every_c_callable_has_a_signature():
    missing = []
    for name, obj in _c_callables():
        try:
            inspect.signature(obj)
        except (ValueError, TypeError):
            missing.append(name)
    assert not missing
    assert str(inspect.signature(_C.Model)) == "(config, weights, device='cpu', act_dtype=-1)"
    assert str(inspect.signature(_C.Model.decode_step)) == "(self, /, ids, mask=None, argmax=False)"
    assert list(inspect.signature(_C.Model.adamw_step).parameters)[1:] == [
        "lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "grad_scale", "step"]


def test_signatures_are_the_parsed_keywords(tiny_dir):
    """Calling every method by the names its signature shows works (the signature is not decoration)."""
    m = ft.load_model(tiny_dir, device="cpu")
    e = m.engine
    e.lora_init(r=2, alpha=4.0, dropout=0.0, target_mask=1)
    A, B = e.lora_read(slot=0, layer=0, module=0)
    e.lora_write(slot=0, layer=0, module=0, A=A, B=B + 0.5)
    e.set_rng(seed=3, counter=4)
    assert e.get_rng() == (3, 4)
    ids = np.arange(6).reshape(1, 6)
    loss, n = e.forward_backward(ids=ids, labels=ids, mask=None, grad_scale=1.0)
    assert n == 5 and np.isfinite(loss)
    assert e.adamw_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                        grad_scale=1.0, step=1) > 0
    e.cache_init(batch=1, capacity=8)
    e.forward_cached(ids=ids[:, :3], mask=None)
    assert e.decode_step(ids=np.array([1]), mask=None, argmax=True).shape == (1,)
    e.cache_reorder(src_rows=np.array([0]))
    assert e.cache_len() == 4
    with pytest.raises(TypeError):
        e.cache_len(1)
    with pytest.raises(TypeError):
        e.set_training(enabled=True)


# ---------------------------------------------------------------------------------------------
# the busy guard


@pytest.mark.parametrize("reader", ["cache_len", "get_rng", "lora_info"])
def test_readers_wait_for_a_running_call(tiny_dir, reader):
    """A reader called while another thread's decode/forward runs without the GIL is refused,
    instead of reading state (the cache length, the RNG counter) that call is writing."""
    m = ft.load_model(tiny_dir, device="cpu")
    e = m.engine
    e.lora_init(2, 4.0, 0.0, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, size=(8, 96))
    stop = threading.Event()
    started = threading.Event()

    def work() -> None:
        started.set()
        while not stop.is_set():
            e.forward(ids)

    t = threading.Thread(target=work)
    t.start()
    refused = None
    try:
        started.wait(10)
        deadline = time.monotonic() + 30
        while refused is None and time.monotonic() < deadline:
            try:
                getattr(e, reader)()
            except RuntimeError as exc:
                refused = str(exc)
    finally:
        stop.set()
        t.join(60)
    assert refused == "model is in use by another thread"
    getattr(e, reader)()  # free again once the other call is done


def test_closed_model_refuses_every_method(tiny_dir):
    m = ft.load_model(tiny_dir, device="cpu")
    e = m.engine
    e.close()
    e.close()  # twice is fine
    for name in [n for n in vars(_C.Model) if not n.startswith("_") and n != "close"]:
        attr = getattr(type(e), name)
        if isinstance(attr, property) or not callable(attr):
            with pytest.raises(RuntimeError, match="closed"):
                getattr(e, name)
            continue
        with pytest.raises(RuntimeError, match="closed"):
            getattr(e, name)()


# ---------------------------------------------------------------------------------------------
# device strings


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "cuda:1x", "cuda:", "cuda: 1", "cuda:+1", "cudax",
                                    "cuda:99999999999", "gpu"])
def test_bad_device_strings_are_rejected(device):
    for make in (lambda: _C.Model({}, {}, device), lambda: _C.OpRunner(device)):
        with pytest.raises(ValueError, match=re.escape(f"'{device}'")):
            make()


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7"])
def test_good_device_strings_pass_the_parser(device):
    with pytest.raises(KeyError, match="config"):  # the device is accepted; the empty config is not
        _C.Model({}, {}, device)
