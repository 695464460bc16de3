"""Engine-counted op costs (csrc/cost.c): the counting wrapper around the backend op table.

The expected numbers are written here from the op shapes (backend.h) and the conventions of
csrc/cost.h, not read from the C code: a wrong shape, a missed call or a wrong dtype size in
the counter fails these tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing

F32 = 4


def _load(path: Path, monkeypatch: pytest.MonkeyPatch, device: str = "cpu", dtype: str = "auto") -> ft.FalconModel:
    monkeypatch.setenv("FT_COUNT_COSTS", "1")
    return ft.load_model(path, device=device, dtype=dtype)


@pytest.fixture(scope="module", params=["tiny", "tiny-40b", "tiny-rw"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp(f"cost_{request.param}")
    testing.make_checkpoint(d, preset=request.param, bits=4, group_size=32, seed=3)
    return request.param, d


def _shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of the four linears of a layer."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    width = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd
    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    return {"query_key_value": (D, width), "dense": (D, D), "dense_h_to_4h": (D, F), "dense_4h_to_h": (F, D)}


def _packed_bytes(n_in: int, n_out: int, bits: int, group: int) -> int:
    groups = 1 if group == -1 else n_in // group
    return (n_in * bits // 32 * n_out * 4      # qweight int32 [in*bits/32, out]
            + groups * (n_out * bits // 32) * 4  # qzeros int32 [groups, out*bits/32]
            + groups * n_out * 2                # scales f16 [groups, out]
            + n_in * 4)                         # g_idx int32 [in]


def _ln_per_layer(cfg) -> int:
    return 1 if cfg.parallel_attn and cfg.num_ln_in_parallel_attn == 1 else 2


def test_forward_counts_match_the_formulas(ckpt, monkeypatch):
    name, path = ckpt
    model = _load(path, monkeypatch)
    cfg = model.config
    L, D, H, KV = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads
    hd = D // H
    B, T = 2, 9
    N = B * T
    model.op_costs(reset=True)  # drop the load-time calls
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(B, T))
    model.forward(ids)
    got = model.op_costs()

    # quantized linears: y = x W (+ bias); x read, y written (f32 on the CPU), packed W read
    flops = act = packed = 0
    for n_in, n_out in _shapes(cfg).values():
        flops += 2 * N * n_in * n_out + (N * n_out if cfg.bias else 0)
        act += N * (n_in + n_out)
        packed += _packed_bytes(n_in, n_out, 4, 32) + (n_out * F32 if cfg.bias else 0)
    q = got["qlinear_fwd"]
    assert q["calls"] == 4 * L
    assert q["flops"] == L * flops
    assert q["bytes"] == L * (act * F32 + packed)
    assert q["dequant_elems"] == L * sum(i * o for i, o in _shapes(cfg).values())

    # causal attention: query t of T sees t + 1 keys; per pair 4 hd (QK^T, PV) + 5 (softmax)
    pairs = B * H * T * (T + 1) // 2
    a = got["attention_fwd"]
    assert a["calls"] == L
    assert a["flops"] == L * pairs * (4 * hd + 5)
    act = 2 * B * H * T * hd + 2 * B * KV * T * hd          # q, out; k, v
    fixed = B * H * T * F32 + 2 * B * T * 4 + (H * F32 if cfg.alibi else 0)  # lse; kmask, kpos; slopes
    assert a["bytes"] == L * (act * F32 + fixed)

    # layernorm: 8 flops an element; x read, y written, g and b read, mean and rstd written
    n_ln = L * _ln_per_layer(cfg) + 1  # + ln_f
    ln = got["layernorm_fwd"]
    assert ln["calls"] == n_ln
    assert ln["flops"] == n_ln * 8 * N * D
    assert ln["bytes"] == n_ln * (2 * N * D * F32 + 2 * D * F32 + 2 * N * F32)

    # lm head, and the split into dtype classes adds up (CPU: act and weights are f32)
    lm = got["lm_logits"]
    assert lm["flops"] == 2 * N * cfg.vocab_size * D
    for op, c in got.items():
        assert c["bytes"] == (c["act_elems"] + c["weight_elems"]) * F32 + c["fixed_bytes"], op
    assert "qlinear_bwd" not in got and "attention_bwd" not in got  # inference only
    model.close()


def test_training_step_counts(ckpt, monkeypatch):
    """forward_backward + AdamW with LoRA on query_key_value: the backward ops follow the
    model's rules (layer 0 needs no input gradient), LoRA and attention backward their formulas."""
    name, path = ckpt
    model = _load(path, monkeypatch)
    cfg = model.config
    L, D, H, KV = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads
    hd, r = D // H, 4
    model.add_lora(r=r, alpha=8, dropout=0.05, target_modules=["query_key_value"])
    model.train()
    B, T = 1, 12
    N = B * T
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(B, T))
    model.op_costs(reset=True)
    model.forward_backward(ids, ids)
    ft.AdamW(model, lr=1e-3).step()
    got = model.op_costs()
    shapes = _shapes(cfg)
    d_in, width = shapes["query_key_value"]

    # LoRA forward in every layer; backward with an input gradient except in layer 0
    lf = got["lora_fwd"]
    assert lf["calls"] == L
    assert lf["flops"] == L * (2 * N * d_in * r + 2 * N * r * width + 2 * N * width)
    lb = got["lora_bwd"]
    assert lb["calls"] == L
    assert lb["flops"] == L * (4 * N * width * r + 2 * N * r * d_in) + (L - 1) * (2 * N * r * d_in + N * d_in)

    # qlinear backward: all four linears in layers 1.., layer 0 only those whose output
    # gradient feeds a LoRA (dense -> attention -> qkv; the mlp only when it is sequential)
    mm = {m: 2 * N * i * o for m, (i, o) in shapes.items()}
    layer0 = mm["dense"] + mm["dense_4h_to_h"] + (0 if cfg.parallel_attn else mm["dense_h_to_4h"])
    qb = got["qlinear_bwd"]
    # accumulate (+=, one add an element) where the qkv input gradient joins the mlp's in a shared LN
    shared_ln = cfg.parallel_attn and cfg.num_ln_in_parallel_attn == 1
    acc = (L - 1) * N * d_in if shared_ln else 0
    assert qb["flops"] == (L - 1) * sum(mm.values()) + layer0 + acc

    pairs = B * H * T * (T + 1) // 2
    ab = got["attention_bwd"]
    assert ab["calls"] == L
    assert ab["flops"] == L * (pairs * (10 * hd + 5) + 2 * B * H * T * hd)
    assert ab["bytes"] == L * ((4 * B * H * T * hd + 4 * B * KV * T * hd) * F32
                               + B * H * T * F32 + 2 * B * T * 4 + (H * F32 if cfg.alibi else 0))

    n_params = L * r * (d_in + width)
    # p, g, m, v read; p, m, v written: 7 f32 arrays
    assert got["adamw"]["flops"] == 16 * n_params and got["adamw"]["bytes"] == 7 * n_params * F32
    assert got["sumsq"]["calls"] == 1
    ce = got["cross_entropy"]
    assert ce["flops"] == 6 * N * cfg.vocab_size
    model.close()


def test_counts_grow_by_one_layer_per_layer(tmp_path, monkeypatch):
    """What t4_projection.py relies on: per op, costs(L) = costs(1) + (L - 1) * (costs(2) - costs(1))."""
    counts = {}
    ids = np.random.default_rng(4).integers(0, 256, size=(1, 16))
    for L in (1, 2, 3):
        d = tmp_path / f"L{L}"
        testing.make_checkpoint(d, preset="tiny", bits=4, group_size=32, num_hidden_layers=L)
        m = _load(d, monkeypatch)
        m.add_lora(r=4, target_modules=["query_key_value"])
        m.train()
        m.op_costs(reset=True)
        m.forward_backward(ids, ids)
        ft.AdamW(m, lr=1e-3).step()
        counts[L] = m.op_costs()
        m.close()
    keys = ("calls", "flops", "bytes")
    for op in counts[3]:
        for k in keys:
            c1, c2, c3 = (counts[L].get(op, {}).get(k, 0) for L in (1, 2, 3))
            assert c3 - c2 == c2 - c1, (op, k, c1, c2, c3)


def test_reset_and_decode(ckpt, monkeypatch):
    """Each decode step counts one attention over the Tk cached keys (no graph replays)."""
    name, path = ckpt
    model = _load(path, monkeypatch)
    cfg = model.config
    L, H, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, 6))
    model.op_costs(reset=True)
    assert model.op_costs() == {}
    eng = model.engine
    eng.cache_init(1, 16)
    eng.forward_cached(ids, None)
    steps = 3
    for i in range(steps):
        eng.decode_step(np.array([7 + i]), argmax=True)
    eng.cache_free()
    got = model.op_costs(reset=True)
    a = got["attention_fwd"]
    # prefill: 6 queries, causal; then one query per step over 7, 8, 9 keys
    pairs = 6 * 7 // 2 + sum(range(7, 7 + steps))
    assert a["calls"] == L * (1 + steps)
    assert a["flops"] == L * H * pairs * (4 * hd + 5)
    assert got["argmax_rows"]["calls"] == steps
    assert got["qlinear_fwd"]["calls"] == 4 * L * (1 + steps)
    assert model.op_costs() == {}
    model.close()


def test_not_counted_without_the_flag(tmp_path, monkeypatch):
    testing.make_checkpoint(tmp_path, preset="tiny", bits=4, group_size=32)
    monkeypatch.delenv("FT_COUNT_COSTS", raising=False)
    model = ft.load_model(tmp_path, device="cpu")
    with pytest.raises(RuntimeError, match="FT_COUNT_COSTS"):
        model.op_costs()
    model.close()
    monkeypatch.setenv("FT_COUNT_COSTS", "0")
    model = ft.load_model(tmp_path, device="cpu")
    with pytest.raises(RuntimeError, match="FT_COUNT_COSTS"):
        model.op_costs()
    model.close()


def test_counting_changes_no_result(tmp_path, monkeypatch):
    """The wrapper forwards every op: logits and the training loss are bit-identical."""
    testing.make_checkpoint(tmp_path, preset="tiny-40b", bits=4, group_size=32, seed=8)
    ids = np.random.default_rng(6).integers(0, 256, size=(2, 10))
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("FT_COUNT_COSTS", flag)
        m = ft.load_model(tmp_path, device="cpu")
        m.add_lora(r=4, dropout=0.1, target_modules=["query_key_value", "dense"])
        m.train()
        logits = m.forward(ids)
        loss = m.forward_backward(ids, ids)
        grads = m.lora_grad_dict()
        results.append((logits, loss, grads))
        m.close()
    (l0, s0, g0), (l1, s1, g1) = results
    np.testing.assert_array_equal(l0, l1)
    assert s0 == s1
    for k in g0:
        np.testing.assert_array_equal(g0[k], g1[k])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,size", [("bfloat16", 2), ("float16", 2)])
def test_counts_do_not_depend_on_the_backend(ckpt, monkeypatch, dtype, size):
    """The same calls on CPU and CUDA count the same calls, FLOPs and elements; bytes differ
    only through the activation and weight dtypes."""
    name, path = ckpt
    ids = np.random.default_rng(7).integers(0, 256, size=(2, 11))
    counts = []
    for device, dt in (("cpu", "auto"), ("cuda", dtype)):
        m = _load(path, monkeypatch, device=device, dtype=dt)
        m.add_lora(r=4, target_modules=["query_key_value", "dense_4h_to_h"])
        m.train()
        m.op_costs(reset=True)
        m.forward_backward(ids, ids)
        ft.AdamW(m, lr=1e-3).step()
        m.forward(ids)
        m.generate_ids(ids[:1], max_new_tokens=5, eos_token_id=-1)
        counts.append(m.op_costs())
        m.close()
    cpu, gpu = counts
    assert cpu.keys() == gpu.keys()
    # memory ops and gather_rows move raw bytes: a buffer of activations is smaller in bf16/fp16
    raw = {"alloc", "free", "upload", "download", "zero", "sync", "dense_create", "qlinear_create", "gather_rows"}
    for op in cpu:
        fields = ("calls",) if op in raw else ("calls", "flops", "act_elems", "weight_elems", "fixed_bytes",
                                               "dequant_elems")
        for k in fields:
            assert cpu[op][k] == gpu[op][k], (op, k)
        g = gpu[op]
        assert g["bytes"] == (g["act_elems"] + g["weight_elems"]) * size + g["fixed_bytes"], op
