"""CUDA attention implementations: FT_CUDA_ATTN=mma (tensor-core flash kernels, head dim 64, the
default where they can run; op-level tests in test_ops.py), gemm (cuBLAS tensor cores, the fallback)
and flash (scalar).

The backend reads FT_CUDA_ATTN and FT_CUDA_ATTN_CHUNK_MB when it is created (ft.load_model), so each
model below is loaded with the environment set for it. A tiny FT_CUDA_ATTN_CHUNK_MB forces the gemm
path to cut one (batch row, kv head) into several row chunks (f32 dK/dV accumulation).
"""
from __future__ import annotations

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing

from test_cuda import ALL, batch, check_pair, cosine, make_pair, rel

pytestmark = pytest.mark.cuda

# (mode, FT_CUDA_ATTN_CHUNK_MB or None for the default)
MODES = [("gemm", None), ("gemm", "0.002"), ("flash", None)]


def set_mode(monkeypatch, mode, chunk_mb):
    monkeypatch.setenv("FT_CUDA_ATTN", mode)
    if chunk_mb is None:
        monkeypatch.delenv("FT_CUDA_ATTN_CHUNK_MB", raising=False)
    else:
        monkeypatch.setenv("FT_CUDA_ATTN_CHUNK_MB", chunk_mb)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-40b", "tiny-rw"])
@pytest.mark.parametrize("mode,chunk_mb", MODES)
def test_attention_mode_matches_cpu(tmp_path, monkeypatch, preset, dtype, mode, chunk_mb):
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32)
    set_mode(monkeypatch, mode, chunk_mb)
    cpu, gpu = make_pair(d, dtype, targets=ALL)
    V = cpu.config.vocab_size
    ids, mask, labels = batch(V, 3, 40, seed=11)   # left and right padding
    check_pair(cpu, gpu, ids, mask, labels)
    ids, mask, labels = batch(V, 2, 9, seed=12, pad=False)
    check_pair(cpu, gpu, ids, mask, labels)


@pytest.mark.parametrize("mode,chunk_mb", MODES)
def test_attention_mode_kv_cache(tmp_path, monkeypatch, mode, chunk_mb):
    """Decoding with a cache (Tk > T, keys in a longer buffer) matches the full forward."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    set_mode(monkeypatch, mode, chunk_mb)
    cpu, gpu = make_pair(d, "bfloat16")
    ids, mask, _ = batch(cpu.config.vocab_size, 2, 14, seed=4)
    full = cpu.forward(ids, mask)
    e = gpu.engine
    e.cache_init(2, 20)
    e.forward_cached(ids[:, :10], mask[:, :10])
    for t in range(10, 14):
        last = e.forward_cached(ids[:, t:t + 1], mask[:, :t + 1])
        assert rel(last, full[:, t]) < 2e-2, t
    e.cache_free()


def test_attention_mode_rejects_unknown(tmp_path, monkeypatch):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    monkeypatch.setenv("FT_CUDA_ATTN", "nope")
    with pytest.raises(Exception, match="FT_CUDA_ATTN"):
        ft.load_model(d, device="cuda")
    monkeypatch.setenv("FT_CUDA_ATTN", "gemm")
    monkeypatch.setenv("FT_CUDA_ATTN_CHUNK_MB", "0")
    with pytest.raises(Exception, match="FT_CUDA_ATTN_CHUNK_MB"):
        ft.load_model(d, device="cuda")


def gpu_model(d, monkeypatch, mode, chunk_mb, sd, targets, dtype="bfloat16"):
    set_mode(monkeypatch, mode, chunk_mb)
    m = ft.load_model(d, device="cuda", dtype=dtype)
    m.add_lora(r=4, alpha=8, dropout=0.0, target_modules=targets)
    m.load_lora_state_dict(sd)
    return m


# hidden, heads, kv heads: head_dim 64 and 128, multi-query, grouped and alibi models
LONG = [
    ("tiny", dict(hidden_size=256, num_attention_heads=4, num_kv_heads=4), 2048),    # hd 64, kv 1
    ("tiny", dict(hidden_size=256, num_attention_heads=2, num_kv_heads=2), 1024),    # hd 128, kv 1
    ("tiny-40b", dict(hidden_size=256, num_attention_heads=4, num_kv_heads=2), 1536),  # hd 64, kv 2
    ("tiny-rw", dict(hidden_size=256, num_attention_heads=2, num_kv_heads=2), 1024),   # hd 128, alibi
]


@pytest.mark.parametrize("preset,kw,T", LONG)
def test_attention_gemm_vs_flash_long(tmp_path, monkeypatch, preset, kw, T):
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32, num_hidden_layers=2, **kw)
    targets = ("query_key_value", "dense")
    cfg = ft.load_model(d, device="cpu").config
    sd = testing.random_lora(cfg, 4, targets, seed=3)
    models = {
        "flash": gpu_model(d, monkeypatch, "flash", None, sd, targets),
        "gemm": gpu_model(d, monkeypatch, "gemm", None, sd, targets),
        "gemm-split": gpu_model(d, monkeypatch, "gemm", "1", sd, targets),  # 1 MiB: row chunks of one item
        "mma": gpu_model(d, monkeypatch, "mma", None, sd, targets),  # hd 64: attention_mma.cu; hd 128: gemm
    }
    rng = np.random.default_rng(1)
    B = 2
    ids = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[0, :37] = 0           # left padding
    mask[1, T - 100:] = 0      # right padding
    labels = np.where(mask == 1, ids, -100)
    ref = models["flash"]
    lf = ref.forward(ids, mask)
    ref.zero_grad()
    loss_f = ref.forward_backward(ids, labels, mask)
    gf = ref.lora_grad_dict()
    for name in ("gemm", "gemm-split", "mma"):
        m = models[name]
        lg = m.forward(ids, mask)
        assert np.isfinite(lg).all(), name
        assert rel(lg, lf) < 2e-2, (name, rel(lg, lf))
        m.zero_grad()
        loss_g = m.forward_backward(ids, labels, mask)
        assert abs(loss_g - loss_f) < 1e-2 * max(1.0, abs(loss_f)), (name, loss_g, loss_f)
        gg = m.lora_grad_dict()
        for k in gf:
            assert np.isfinite(gg[k]).all(), (name, k)
            assert cosine(gg[k], gf[k]) > 0.99, (name, k, cosine(gg[k], gf[k]))


def test_attention_gemm_deterministic(tmp_path, monkeypatch):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    set_mode(monkeypatch, "gemm", "0.01")
    _, gpu = make_pair(d, "bfloat16")
    ids, mask, labels = batch(gpu.config.vocab_size, 3, 64, seed=8)
    out = []
    for _ in range(2):
        gpu.zero_grad()
        loss = gpu.forward_backward(ids, labels, mask)
        out.append((loss, gpu.lora_grad_dict()))
    assert out[0][0] == out[1][0]
    for k in out[0][1]:
        np.testing.assert_array_equal(out[0][1][k], out[1][1][k])


# decode attention (csrc/cuda/attention_decode.cu): T == 1 with the cache, one or several key splits
DECODE = [
    ("tiny", {}, "bfloat16"),                                                            # hd 16, kv 1
    ("tiny-40b", {}, "float16"),                                                         # hd 16, kv 2
    ("tiny-rw", dict(hidden_size=256, num_attention_heads=2, num_kv_heads=2), "bfloat16"),  # hd 128, alibi
    ("tiny-40b", dict(hidden_size=512, num_attention_heads=4, num_kv_heads=2), "float16"),  # hd 128, kv 2
    ("tiny", dict(hidden_size=512, num_attention_heads=2, num_kv_heads=2), "float16"),   # hd 256: general path
]


@pytest.mark.parametrize("preset,kw,dtype", DECODE)
def test_decode_attention_matches_general_and_cpu(tmp_path, monkeypatch, preset, kw, dtype):
    """Prompt of 40 tokens, then single-token steps up to 300 keys: one to five key splits of 64;
    left padding on row 0 (masked keys), a padded step on row 2 (its key is masked for later steps). The decode kernel (default) against FT_CUDA_ATTN_DECODE=0 (the general path) and the CPU."""
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32, **kw)
    cpu, gpu = make_pair(d, dtype)
    V = cpu.config.vocab_size
    B, P, T = 3, 40, 300
    rng = np.random.default_rng(21)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[0, :17] = 0
    mask[2, 100] = 0
    checks = (P, 63, 64, 65, 100, 101, 128, 129, 256, 257, T - 1)
    full = cpu.forward(ids, mask)
    monkeypatch.setenv("FT_CUDA_ATTN_DECODE", "0")  # read when the backend is created
    _, general = make_pair(d, dtype)  # the same adapter (seeded)
    monkeypatch.delenv("FT_CUDA_ATTN_DECODE")
    out = {}
    for flag, e in (("1", gpu.engine), ("0", general.engine)):
        e.cache_init(B, T)
        e.forward_cached(ids[:, :P], mask[:, :P])
        got = {}
        for t in range(P, T):
            last = e.forward_cached(ids[:, t:t + 1], mask[:, :t + 1])
            if t in checks:
                got[t] = np.array(last)
        e.cache_free()
        out[flag] = got
    for t in checks:
        if t == P:
            continue
        assert np.isfinite(out["1"][t]).all(), t
        assert rel(out["1"][t], out["0"][t]) < 1e-2, (t, rel(out["1"][t], out["0"][t]))
        assert rel(out["1"][t], full[:, t]) < 2e-2, (t, rel(out["1"][t], full[:, t]))


def test_decode_attention_deterministic(tmp_path):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    gpu = ft.load_model(d, device="cuda")
    ids = np.random.default_rng(2).integers(0, gpu.config.vocab_size, size=(2, 700)).astype(np.int64)
    runs = []
    for _ in range(2):
        e = gpu.engine
        e.cache_init(2, 700)
        e.forward_cached(ids[:, :600], None)
        runs.append([np.array(e.forward_cached(ids[:, t:t + 1], None)) for t in range(600, 700, 7)])
        e.cache_free()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
