"""CUDA attention implementations: FT_CUDA_ATTN=gemm (cuBLAS tensor cores, default) and flash.

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
    for name in ("gemm", "gemm-split"):
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
