"""The engine's guards against silent corruption (issue 14, item 9), one test per guard.

CPU tests run everywhere; the ``cuda``-marked ones need a GPU (two for the multi-device test).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, testing

ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def with_lora(m, seed: int = 1, r: int = 4):
    m.add_lora(r=r, alpha=2 * r, dropout=0.0, target_modules=ALL)
    m.load_lora_state_dict(testing.random_lora(m.config, r, ALL, seed=seed))
    return m


# ---------------------------------------------------------------------------------------------
# recorded decode steps are keyed by a generation counter, not by the workspace's address


@pytest.mark.cuda
def test_recorded_decode_steps_dropped_when_the_workspace_is_recarved(tmp_path, monkeypatch):
    """Decode steps replay a CUDA graph; between them the workspace is freed and carved again with
    another layout (training layout -> inference layout, often at the same device address). The
    steps after it must not replay the old graph: greedy ids equal those of a model that never
    records graphs, and logits stay close to the CPU's."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    cpu = with_lora(ft.load_model(d, device="cpu"))
    gpu = with_lora(ft.load_model(d, device="cuda"))
    monkeypatch.setenv("FT_CUDA_GRAPHS", "0")  # read when the backend is created
    direct = with_lora(ft.load_model(d, device="cuda"))
    monkeypatch.delenv("FT_CUDA_GRAPHS")
    V = cpu.config.vocab_size
    rng = np.random.default_rng(7)
    B, P, T = 2, 8, 40
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    full = cpu.forward(ids)
    out = {}
    for name, m in (("graph", gpu), ("direct", direct)):
        m.forward_backward(ids[:, :12], ids[:, :12])  # a training workspace first
        e = m.engine
        e.cache_init(B, T)
        e.forward_cached(ids[:, :P])
        got = []
        for t in range(P, T):
            if t == 16:  # the workspace is freed; the next step carves an inference one
                m.set_gradient_checkpointing(1.0)
            if t == 24:  # and grows it: a forward of more rows than it holds
                m.forward(ids[:, :20])
            if t % 2:
                got.append(e.decode_step(ids[:, t], argmax=True))
            else:
                lg = e.decode_step(ids[:, t])
                assert rel(lg, full[:, t]) < 2e-2, (name, t, rel(lg, full[:, t]))
                got.append(lg)
        out[name] = got
        e.cache_free()
    for t, (a, b) in enumerate(zip(out["graph"], out["direct"])):
        np.testing.assert_array_equal(a, b, err_msg=f"step {P + t}")


# ---------------------------------------------------------------------------------------------
# every CUDA entry makes the model's own GPU current


@pytest.mark.cuda
def test_models_on_two_gpus_used_from_any_thread(tmp_path):
    """Creating a model makes its GPU current on the creating thread, and a new thread starts on
    GPU 0. A model on cuda:1 driven from a thread whose current GPU is 0 (the main thread after a
    cuda:0 model was made, and a fresh thread) must still allocate and launch on cuda:1: its
    logits, loss, gradients and greedy tokens match the CPU's and are the same from every thread."""
    if _C.cuda_device_count() < 2:
        pytest.skip("needs two CUDA devices")
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    cpu = with_lora(ft.load_model(d, device="cpu"))
    g1 = with_lora(ft.load_model(d, device="cuda:1"))
    g0 = with_lora(ft.load_model(d, device="cuda:0"))  # cuda:0 is now current on this thread
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cpu.config.vocab_size, size=(2, 24)).astype(np.int64)

    def run(m):
        m.zero_grad()
        loss = m.forward_backward(ids, ids)
        return m.forward(ids), loss, m.lora_grad_dict(), m.generate_ids(ids[:, :8], max_new_tokens=12)

    ref = run(cpu)
    results = {"g1 main": run(g1), "g0 main": run(g0)}
    errors = []

    def in_thread(name, m):
        try:
            results[name] = run(m)
        except Exception as exc:  # noqa: BLE001 - reported below with the thread's name
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=in_thread, args=("g1 thread", g1)),
               threading.Thread(target=in_thread, args=("g0 thread", g0))]
    for t in threads:
        t.start()
        t.join()
    assert not errors, errors
    for name, (logits, loss, grads, gen) in results.items():
        assert rel(logits, ref[0]) < 2e-2, (name, rel(logits, ref[0]))
        assert abs(loss - ref[1]) < 1e-2 * max(1.0, abs(ref[1])), (name, loss, ref[1])
        for k, g in grads.items():
            c = float(np.dot(g.ravel(), ref[2][k].ravel()) / (np.linalg.norm(g) * np.linalg.norm(ref[2][k])))
            assert c > 0.99, (name, k, c)
        assert gen.shape == ref[3].shape
    for a, b in (("g1 main", "g1 thread"), ("g0 main", "g0 thread")):  # deterministic kernels
        np.testing.assert_array_equal(results[a][3], results[b][3], err_msg=f"{a} vs {b}")
        np.testing.assert_array_equal(results[a][0], results[b][0], err_msg=f"{a} vs {b}")


# ---------------------------------------------------------------------------------------------
# forward_cached commits its per-row token counts only when the step went through

# A malloc shim for LD_PRELOAD: fail_next_malloc(n) makes the next malloc of exactly n bytes return NULL.
_MALLOC_SHIM = r"""
#include <stddef.h>
extern void *__libc_malloc(size_t n);
static volatile size_t fail_size;
void fail_next_malloc(size_t n) { fail_size = n; }
void *malloc(size_t n)
{
    if (n && n == fail_size) {
        fail_size = 0;
        return NULL;
    }
    return __libc_malloc(n);
}
"""

_FAILING_PREFILL = r"""
import ctypes, sys
import numpy as np
import falcontune as ft

d, shim = sys.argv[1], ctypes.CDLL(sys.argv[2])
V, B, T1, T2 = 256, 2, 20, 17
ids = np.random.default_rng(5).integers(0, V, size=(B, T1 + T2 + 6)).astype(np.int64)
mask = np.ones_like(ids)
mask[0, :3] = 0  # left padding: row 0's positions lag row 1's by three
ref = ft.load_model(d, device="cpu").forward(ids, mask)
e = ft.load_model(d, device="cpu").engine
e.cache_init(B, 64)
e.forward_cached(ids[:, :T1], mask[:, :T1])
# the second prompt chunk fails inside the attention of its first layer: the CPU attention takes
# one malloc of Tk floats per (row, head), Tk = T1 + T2 keys
shim.fail_next_malloc(ctypes.c_size_t(4 * (T1 + T2)))
try:
    e.forward_cached(ids[:, T1:T1 + T2], mask[:, :T1 + T2])
    sys.exit("the second prefill did not fail")
except MemoryError:
    pass
assert e.cache_len() == T1, e.cache_len()
# nothing of the failed chunk is left: decoding it token by token gives the full forward's logits
worst = 0.0
for t in range(T1, T1 + T2 + 6):
    lg = e.decode_step(ids[:, t], mask[:, t])
    worst = max(worst, float(np.abs(lg - ref[:, t]).max()))
assert worst < 1e-3, f"decode after a failed prefill is off by {worst}"
print("ok")
"""


def test_failed_prefill_leaves_the_cache_positions_alone(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and glibc (a malloc shim injects the failure)")
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("the malloc shim does not mix with AddressSanitizer's allocator")
    (tmp_path / "shim.c").write_text(_MALLOC_SHIM)
    shim = tmp_path / "libfailmalloc.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp_path / "shim.c")], check=True)
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    env = dict(os.environ, LD_PRELOAD=str(shim), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FAILING_PREFILL, str(d), str(shim)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# sizes: products that would overflow an int are refused with a message, not wrapped


@pytest.fixture(scope="module")
def tiny_engine_args(tmp_path_factory):
    """(engine config dict, weights dict) of a tiny checkpoint, as load_model hands them to _C.Model."""
    import json

    from falcontune.model import _bind_weights, _engine_config
    from falcontune.models import QuantizeConfig, parse_config
    from falcontune.weights import WeightStore

    d = testing.make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", bits=4, group_size=32)
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    q = QuantizeConfig(bits=4, group_size=32)
    with WeightStore.open(next(d.glob("*.safetensors"))) as st:
        w = {k: (np.array(v[0]), v[1]) if isinstance(v, tuple) else np.array(v)
             for k, v in _bind_weights(st, cfg, q, False).items()}
    return _engine_config(cfg, q), w


def test_config_products_do_not_wrap(tiny_engine_args):
    ec, w = tiny_engine_args
    # 4 * (2^30 + 1) wraps to 4 in 32-bit arithmetic: it must not pass for hidden_size 4
    with pytest.raises(ValueError, match=r"head_dim 4 \* heads 1073741825 != hidden_size 4"):
        _C.Model({**ec, "hidden": 4, "head_dim": 4, "n_head": 1073741825, "n_kv_head": 1}, w, "cpu")
    for key in ("hidden", "ffn", "vocab_size"):
        with pytest.raises(NotImplementedError, match="must each be at most 16777216"):
            _C.Model({**ec, key: (1 << 24) + 2}, w, "cpu")


def test_activation_and_cache_sizes_are_bounded(tiny_engine_args):
    ec, w = tiny_engine_args
    m = _C.Model(ec, w, "cpu")
    m.lora_init(4096, 8.0, 0.0, 1)  # on query_key_value; the LoRA rank is the widest activation row
    rng = np.random.default_rng(11)
    ids = rng.integers(0, ec["vocab_size"], size=(1, (1 << 19) + 1))  # 2^19 rows x 4096 > 2^31 - 1
    with pytest.raises(ValueError, match=r"limit of 2\^31 - 1"):
        m.forward(ids)
    # one key buffer of 1024 rows x 2^17 tokens x 1 kv head x 16 dims is 2^31 elements
    with pytest.raises(ValueError, match=r"cache: 1024 rows x 131073 tokens .* limit of 2\^31 - 1"):
        m.cache_init(1024, (1 << 17) + 1)
    # just inside both limits, the same model still computes
    small = rng.integers(0, ec["vocab_size"], size=(2, 9))
    assert np.isfinite(m.forward(small)).all()
    m.close()


# ---------------------------------------------------------------------------------------------
# the flash attention kernels' grid holds any B*H (a y dimension of B*H stopped at 65535)


@pytest.mark.cuda
def test_flash_attention_with_more_than_65535_row_heads(tmp_path, monkeypatch):
    """FT_CUDA_ATTN=flash, 1100 rows x 64 heads = 70400 (row, head) pairs: forward, loss and LoRA
    gradients match the CPU (before, the launch failed with an invalid grid)."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32, hidden_size=256,
                                num_attention_heads=64, num_kv_heads=32, num_hidden_layers=1)
    cpu = with_lora(ft.load_model(d, device="cpu"))
    monkeypatch.setenv("FT_CUDA_ATTN", "flash")  # read when the backend is created
    gpu = with_lora(ft.load_model(d, device="cuda"))
    rng = np.random.default_rng(17)
    ids = rng.integers(0, cpu.config.vocab_size, size=(1100, 4)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::7, 0] = 0
    labels = np.where(mask == 1, ids, -100)
    assert rel(gpu.forward(ids, mask), cpu.forward(ids, mask)) < 2e-2
    lc, lg = cpu.forward_backward(ids, labels, mask), gpu.forward_backward(ids, labels, mask)
    assert abs(lc - lg) < 1e-2 * max(1.0, abs(lc)), (lc, lg)
    gc, gg = cpu.lora_grad_dict(), gpu.lora_grad_dict()
    for k in gc:
        c = float(np.dot(gg[k].ravel(), gc[k].ravel()) / (np.linalg.norm(gg[k]) * np.linalg.norm(gc[k])))
        assert c > 0.99, (k, c)


# ---------------------------------------------------------------------------------------------
# a weights file that shrinks after it was mapped: an error, never SIGBUS


def test_tensor_view_of_a_truncated_file_raises(tmp_path):
    from falcontune.weights import SafetensorsError, SafetensorsFile

    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    path = next(d.glob("*.safetensors"))
    with SafetensorsFile(path) as f:
        spans = sorted((f._entry(n).start, f._entry(n).start + f._entry(n).nbytes, n) for n in f.names())
        first, last = spans[0], spans[-1]
        keep = f.tensor(first[2]).copy()
        os.truncate(path, first[1])  # only the first tensor's bytes are left
        np.testing.assert_array_equal(f.tensor(first[2]), keep)
        with pytest.raises(SafetensorsError, match=rf"'{last[2]}' ends at byte {last[1]} but the file is now "
                                                   rf"{first[1]} bytes long: it was truncated after it was opened"):
            f.tensor(last[2])


_TRUNCATE_AFTER_LOAD = r"""
import os, sys
import numpy as np
import falcontune as ft

d = sys.argv[1]
path = next(p for p in os.listdir(d) if p.endswith(".safetensors"))
m = ft.load_model(d, device="cpu")
ids = np.random.default_rng(2).integers(0, m.config.vocab_size, size=(2, 10))
before = m.forward(ids)
gen = m.generate_ids(ids, max_new_tokens=4)
os.truncate(os.path.join(d, path), 16)  # the checkpoint is rewritten in place under the loaded model
np.testing.assert_array_equal(m.forward(ids), before)
np.testing.assert_array_equal(m.generate_ids(ids, max_new_tokens=4), gen)
print("ok")
"""


def test_cpu_model_survives_its_weights_file_being_truncated(tmp_path):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_AFTER_LOAD, str(d)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout + r.stderr)
