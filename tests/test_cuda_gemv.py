"""Fused dequant-GEMV (csrc/cuda/gemv.cu): qlinear_fwd with N <= 8 rows on CUDA vs the CPU reference.

Forward passes with B*T <= 8 rows run every quantized linear through the GEMV; FT_CUDA_GEMV=0 switches
back to dequantize + cuBLAS. Tolerances as tests/test_cuda.py:
logits relative error (norm) < 2e-2.

The backend reads FT_CUDA_GEMV when it is created (ft.load_model): `gemv_off` loads a second GPU model
with the GEMV disabled, the dequantize + cuBLAS reference. The GEMV has two kernels (choice.cu's
gemv_kernel_choose): the fold kernel (2/4 bits, groups by shift of >= 8 word rows; on where
FT_CUDA_GEMV_FOLD=1, with two register stages where =2) and the pairs kernel; the `gemv_kernel`
fixture runs each test with all three.
"""
from __future__ import annotations

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing

from test_cuda import rel
from test_cuda_qgemm import choices

pytestmark = pytest.mark.cuda

ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def with_lora(models, lora):
    if lora:
        sd = testing.random_lora(models[0].config, 4, ALL, seed=3)
        for m in models:
            m.add_lora(r=4, alpha=8, dropout=0.0, target_modules=ALL)
            m.load_lora_state_dict(sd)
    return models


def load_pair(d, dtype, lora=False):
    return with_lora((ft.load_model(d, device="cpu"), ft.load_model(d, device="cuda", dtype=dtype)), lora)


def gemv_off(d, dtype, monkeypatch, lora=False):
    """The same checkpoint on the GPU with the GEMV disabled (dequantize + cuBLAS)."""
    monkeypatch.setenv("FT_CUDA_GEMV", "0")
    gpu = ft.load_model(d, device="cuda", dtype=dtype)
    monkeypatch.delenv("FT_CUDA_GEMV")
    return with_lora((gpu,), lora)[0]


@pytest.fixture(params=["fold", "fold2", "pairs"])
def gemv_kernel(request, monkeypatch):
    """FT_CUDA_GEMV_FOLD=1 / 2: the fold kernel (one / two register stages) where gv_fold_ok allows;
    0: the pairs kernel everywhere."""
    monkeypatch.setenv("FT_CUDA_GEMV_FOLD", {"fold": "1", "fold2": "2", "pairs": "0"}[request.param])
    return request.param


VARIANTS = [
    # preset, bits, group, desc_act, format
    ("tiny", 4, 32, False, "gptq"),
    ("tiny", 4, 64, False, "gptq"),       # groups of 8 word rows: the fold kernel
    ("tiny", 4, 64, True, "gptq_v2"),
    ("tiny", 2, 32, False, "gptq"),
    ("tiny", 2, -1, True, "gptq"),
    ("tiny", 3, 32, False, "gptq"),       # 3 bits: dequantize + GEMM path
    ("tiny", 8, 32, True, "gptq_v2"),
    ("tiny-40b", 4, -1, False, "gptq"),
    ("tiny-40b", 4, 128, False, "gptq_v2"),
    ("tiny-40b", 2, 128, False, "gptq"),
    ("tiny-40b", 8, 64, False, "gptq"),
    ("tiny-40b", 3, -1, True, "gptq_v2"),
    ("tiny-rw", 4, 32, True, "gptq"),      # biases
    ("tiny-rw", 4, 64, False, "gptq"),
    ("tiny-rw", 2, 64, False, "gptq_v2"),
    ("tiny-rw", 8, -1, False, "gptq"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset,bits,group,desc_act,fmt", VARIANTS)
def test_gemv_rows_match_cpu(tmp_path, monkeypatch, gemv_kernel, preset, bits, group, desc_act, fmt, dtype):
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=bits, group_size=group, desc_act=desc_act,
                                checkpoint_format=fmt, seed=bits)
    cpu, gpu = load_pair(d, dtype, lora=(bits == 4))
    ref_gpu = gemv_off(d, dtype, monkeypatch, lora=(bits == 4))
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, cpu.config.vocab_size, size=(1, 8)).astype(np.int64)
    for n in range(1, 9):  # N = n rows per qlinear_fwd
        ref = cpu.forward(ids[:, :n])
        on = gpu.forward(ids[:, :n])
        off = ref_gpu.forward(ids[:, :n])
        assert np.isfinite(on).all()
        assert rel(on, ref) < 2e-2, (n, rel(on, ref))
        assert rel(on, off) < 2e-2, (n, rel(on, off))
    # B rows of one token each, and B*T = 8 over two rows
    ids2 = rng.integers(0, cpu.config.vocab_size, size=(2, 4)).astype(np.int64)
    assert rel(gpu.forward(ids2), cpu.forward(ids2)) < 2e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset,bits,group,desc_act", [("tiny-40b", 4, 32, False), ("tiny-rw", 4, 64, True),
                                                         ("tiny", 2, 32, False), ("tiny-rw", 8, 32, False),
                                                         ("tiny-40b", 4, 64, False), ("tiny-rw", 2, 128, False)])
def test_gemv_decode_cached_matches_full_forward(tmp_path, monkeypatch, gemv_kernel, preset, bits, group, desc_act,
                                                 dtype):
    monkeypatch.setenv("FT_CUDA_GEMV", "1")
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=bits, group_size=group, desc_act=desc_act)
    cpu, gpu = load_pair(d, dtype)
    V = cpu.config.vocab_size
    rng = np.random.default_rng(7)
    for B in (1, 3, 8):  # decode steps run qlinear_fwd with N = B rows
        ids = rng.integers(0, V, size=(B, 12)).astype(np.int64)
        mask = np.ones((B, 12), np.int64)
        if B >= 2:
            mask[0, :2] = 0
        full = cpu.forward(ids, mask)
        e = gpu.engine
        e.cache_init(B, 16)
        e.forward_cached(ids[:, :9], mask[:, :9])
        for t in range(9, 12):
            last = e.forward_cached(ids[:, t:t + 1], mask[:, :t + 1])
            assert rel(last, full[:, t]) < 2e-2, (B, t, rel(last, full[:, t]))
        e.cache_free()


def _greedy_agrees(cpu, prompt, out_cpu, out_gpu, margin=0.05):
    """Tokens equal, or the first difference sits on a near-tie of the CPU logits."""
    if np.array_equal(out_cpu, out_gpu):
        return True
    for b in range(out_cpu.shape[0]):
        diff = np.nonzero(out_cpu[b] != out_gpu[b])[0]
        if not len(diff):
            continue
        p = int(diff[0])
        assert p >= prompt.shape[1]
        logits = cpu.forward(out_cpu[b:b + 1, :p])[0, -1]
        top = np.sort(logits)[-2:]
        if top[1] - top[0] > margin * max(1.0, float(np.abs(logits).max())):
            return False
    return True


@pytest.mark.parametrize("preset,bits,group,desc_act", [("tiny", 4, 32, False), ("tiny-40b", 4, 64, True),
                                                         ("tiny-rw", 4, 32, False), ("tiny-rw", 2, -1, False),
                                                         ("tiny-40b", 4, 64, False)])
def test_gemv_greedy_generation_matches_cpu(tmp_path, monkeypatch, gemv_kernel, preset, bits, group, desc_act):
    monkeypatch.setenv("FT_CUDA_GEMV", "1")
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=bits, group_size=group, desc_act=desc_act)
    cpu, gpu = load_pair(d, "bfloat16")
    rng = np.random.default_rng(11)
    for B in (1, 4):
        ids = rng.integers(0, cpu.config.vocab_size, size=(B, 5)).astype(np.int64)
        oc = cpu.generate_ids(ids, max_new_tokens=12, eos_token_id=-1)
        og = gpu.generate_ids(ids, max_new_tokens=12, eos_token_id=-1)
        assert og.shape == oc.shape
        assert _greedy_agrees(cpu, ids, oc, og), (oc, og)


@pytest.fixture(scope="module")
def falcon7b_layer(tmp_path_factory):
    """One Falcon-7B-shaped layer (widths 4544 / 4672 / 18176), small vocab."""
    d = tmp_path_factory.mktemp("f7b_gemv")
    return testing.make_checkpoint(d, preset="falcon-7b", bits=4, group_size=64, num_hidden_layers=1,
                                   vocab_size=1024)


def test_gemv_falcon7b_widths(falcon7b_layer, monkeypatch, gemv_kernel):
    cpu, gpu = load_pair(falcon7b_layer, "bfloat16")
    ref_gpu = gemv_off(falcon7b_layer, "bfloat16", monkeypatch)
    c = cpu.config
    # the overrides took effect on top of the 7B preset
    assert (c.num_hidden_layers, c.vocab_size, c.hidden_size) == (1, 1024, 4544)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 1024, size=(1, 8)).astype(np.int64)
    for n in (1, 2, 5, 8):
        ref = cpu.forward(ids[:, :n])
        on = gpu.forward(ids[:, :n])
        off = ref_gpu.forward(ids[:, :n])
        assert rel(on, ref) < 2e-2, (n, rel(on, ref))
        assert rel(on, off) < 2e-2, (n, rel(on, off))
    # decode through the KV cache, batch 2
    monkeypatch.setenv("FT_CUDA_GEMV", "1")
    ids2 = rng.integers(0, 1024, size=(2, 6)).astype(np.int64)
    full = cpu.forward(ids2)
    e = gpu.engine
    e.cache_init(2, 8)
    e.forward_cached(ids2[:, :4], None)
    for t in (4, 5):
        last = e.forward_cached(ids2[:, t:t + 1], None)
        assert rel(last, full[:, t]) < 2e-2, t
    e.cache_free()


@pytest.mark.parametrize("fold", ["1", "2", "0"])
def test_gemv_kernel_choice(tmp_path, monkeypatch, capfd, fold):
    """Which GEMV kernel runs, from the profiler's choice table: groups of 64 at 4 bits go to the fold
    kernel (FT_CUDA_GEMV_FOLD=1, or 2 for two stages), groups of 32 (4 word rows) and
    FT_CUDA_GEMV_FOLD=0 to the pairs kernel; any other value is refused when the model loads."""
    calls = {}
    for group in (64, 32):
        d = testing.make_checkpoint(tmp_path / f"g{group}", preset="tiny", bits=4, group_size=group)
        with monkeypatch.context() as mp:
            mp.setenv("FT_CUDA_GEMV_FOLD", fold)
            mp.setenv("FT_CUDA_PROFILE", "1")
            gpu = ft.load_model(d, device="cuda", dtype="bfloat16")
        gpu.forward(np.array([[1, 2, 3]], np.int64))
        gpu.close()
        calls[group] = choices(capfd.readouterr().err).get("gemv kernel", {})
    fold_name = {"1": "fold", "2": "fold, two stages"}.get(fold)
    if fold_name:
        assert calls[64].get(fold_name, 0) > 0 and set(calls[64]) == {fold_name}, calls
    else:
        assert set(calls[64]) == {"pairs: off (FT_CUDA_GEMV_FOLD=0)"}, calls
    assert set(calls[32]) == {"pairs: groups (act-order, by g_idx, or < 8 word rows)" if fold_name
                              else "pairs: off (FT_CUDA_GEMV_FOLD=0)"}, calls
    monkeypatch.setenv("FT_CUDA_GEMV_FOLD", "3")
    with pytest.raises((ValueError, RuntimeError), match="FT_CUDA_GEMV_FOLD must be 0, 1 or 2"):
        ft.load_model(tmp_path / "g64", device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gemv_epilogue_in_decode_steps(tmp_path, monkeypatch, capfd, dtype):
    """qlinear_fwd_epi (GELU after dense_h_to_4h, the residual add after dense_4h_to_h; this model has
    no LoRA, so the other two linears are plain products): in the GEMV's reduction for decode steps, as separate ops for a prefill of more than
    8 rows and everywhere with FT_CUDA_GEMV_EPILOGUE=0 (the profiler's choice table counts each);
    decode logits both ways within the CUDA contract of the CPU's and close to each other."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=64)
    cpu = ft.load_model(d, device="cpu")
    L = cpu.config.num_hidden_layers
    ids = np.random.default_rng(3).integers(0, cpu.config.vocab_size, size=(2, 7)).astype(np.int64)
    full = cpu.forward(ids)
    logits = {}
    for on in ("1", "0"):
        with monkeypatch.context() as mp:
            mp.setenv("FT_CUDA_GEMV_EPILOGUE", on)
            mp.setenv("FT_CUDA_PROFILE", "1")
            gpu = ft.load_model(d, device="cuda", dtype=dtype)
        e = gpu.engine
        e.cache_init(2, 8)
        e.forward_cached(ids[:, :5], None)  # 10 rows: not the GEMV
        steps = [e.forward_cached(ids[:, t:t + 1], None) for t in (5, 6)]  # 2 rows each: the GEMV
        e.cache_free()
        capfd.readouterr()
        gpu.close()
        table = choices(capfd.readouterr().err).get("qlinear epilogue kernel", {})
        for t, last in zip((5, 6), steps):
            assert rel(last, full[:, t]) < 2e-2, (on, t, rel(last, full[:, t]))
        logits[on] = np.stack(steps)
        if on == "1":  # two fused modules a layer: the prefill once, each decode step once
            assert table == {"gemv reduction": 2 * 2 * L, "separate ops: not the GEMV": 2 * L}, table
        else:
            assert table == {"separate ops: off (FT_CUDA_GEMV_EPILOGUE=0)": 3 * 2 * L}, table
    assert rel(logits["1"], logits["0"]) < 1e-2
