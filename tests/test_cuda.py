"""CUDA backend vs the CPU reference, through the public API (DESIGN.md numerics contract).

Every test is marked ``cuda``: tests/conftest.py skips them when falcontune.cuda_available()
is False. Tolerances: logits relative error (norm) < 2e-2, loss within 1e-2, LoRA gradient
cosine > 0.99 per tensor.
"""
from __future__ import annotations

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing

pytestmark = pytest.mark.cuda

ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cosine(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def make_pair(d, dtype, r=4, targets=ALL, dropout=0.0, seed=1):
    cpu = ft.load_model(d, device="cpu")
    gpu = ft.load_model(d, device="cuda", dtype=dtype)
    sd = testing.random_lora(cpu.config, r, targets, seed=seed)
    for m in (cpu, gpu):
        m.add_lora(r=r, alpha=2 * r, dropout=dropout, target_modules=targets)
        m.load_lora_state_dict(sd)
    return cpu, gpu


def batch(V, B, T, seed=0, pad=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    if pad and B >= 2:
        mask[0, :3] = 0          # left padding
        mask[1, T - 2:] = 0      # right padding
    labels = np.where(mask == 1, ids, -100)
    return ids, mask, labels


def check_pair(cpu, gpu, ids, mask, labels, grad_tol=0.99, logit_tol=2e-2):
    lc = cpu.forward(ids, mask)
    lg = gpu.forward(ids, mask)
    assert np.isfinite(lg).all()
    assert rel(lg, lc) < logit_tol, rel(lg, lc)
    for m in (cpu, gpu):
        m.zero_grad()
    loss_c = cpu.forward_backward(ids, labels, mask)
    loss_g = gpu.forward_backward(ids, labels, mask)
    # within 1e-2, relative to the loss once it exceeds 1 (random tiny models have losses of 10-20)
    assert abs(loss_c - loss_g) < 1e-2 * max(1.0, abs(loss_c)), (loss_c, loss_g)
    gc, gg = cpu.lora_grad_dict(), gpu.lora_grad_dict()
    assert gc.keys() == gg.keys()
    for k in gc:
        assert cosine(gg[k], gc[k]) > grad_tol, (k, cosine(gg[k], gc[k]))
    return loss_c, loss_g


VARIANTS = [
    ("tiny", 4, 32, False, "gptq"),
    ("tiny", 2, 32, True, "gptq"),
    ("tiny", 3, -1, False, "gptq_v2"),
    ("tiny-40b", 8, 32, True, "gptq"),
    ("tiny-40b", 4, 64, False, "gptq_v2"),
    ("tiny-40b", 3, 32, True, "gptq"),
    ("tiny-rw", 4, 32, True, "gptq"),
    ("tiny-rw", 8, -1, False, "gptq_v2"),
    ("tiny-rw", 2, 64, False, "gptq"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset,bits,group,desc_act,fmt", VARIANTS)
def test_cuda_matches_cpu(tmp_path, preset, bits, group, desc_act, fmt, dtype):
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=bits, group_size=group, desc_act=desc_act,
                                checkpoint_format=fmt)
    cpu, gpu = make_pair(d, dtype)
    assert gpu.dtype == dtype
    V = cpu.config.vocab_size
    ids, mask, labels = batch(V, 3, 24, seed=bits)
    check_pair(cpu, gpu, ids, mask, labels)
    # one AdamW step on both: parameters stay close
    oc = ft.AdamW(cpu, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    og = ft.AdamW(gpu, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    nc, ng = oc.step(), og.step()
    assert abs(nc - ng) / nc < 2e-2
    pc, pg = cpu.lora_state_dict(), gpu.lora_state_dict()
    for k in pc:
        assert rel(pg[k], pc[k]) < 1e-2, k
    # no padding, a single row
    ids, mask, labels = batch(V, 1, 17, seed=5, pad=False)
    check_pair(cpu, gpu, ids, None, labels)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dropout_masks_match_cpu(tmp_path, dtype):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    cpu, gpu = make_pair(d, dtype, dropout=0.3)
    for m in (cpu, gpu):
        m.train()
        m.engine.set_rng(1234, 7)
    ids, mask, labels = batch(cpu.config.vocab_size, 2, 20, seed=3)
    # a different mask would move the loss and turn the gradients (cosine well below 0.99)
    check_pair(cpu, gpu, ids, mask, labels, logit_tol=2e-2)
    assert cpu.engine.get_rng() == gpu.engine.get_rng()
    # dropout really is on: eval mode gives another loss
    for m in (cpu, gpu):
        m.eval()
    l_eval = gpu.forward_backward(ids, labels, mask)
    gpu.train()
    gpu.engine.set_rng(1234, 7)
    l_train = gpu.forward_backward(ids, labels, mask)
    assert abs(l_eval - l_train) > 1e-4


def test_fp16_loss_scaling(tmp_path):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    cpu, gpu = make_pair(d, "float16")
    ids, mask, labels = batch(cpu.config.vocab_size, 2, 16, seed=9)
    S = 1024.0
    lc = cpu.forward_backward(ids, labels, mask)
    lg = gpu.forward_backward(ids, labels, mask, grad_scale=S)
    assert abs(lc - lg) < 1e-2
    gc, gg = cpu.lora_grad_dict(), gpu.lora_grad_dict()
    for k in gc:
        assert cosine(gg[k] / S, gc[k]) > 0.99
        assert rel(gg[k] / S, gc[k]) < 5e-2
    oc, og = ft.AdamW(cpu, lr=1e-3), ft.AdamW(gpu, lr=1e-3)
    nc, ng = oc.step(), og.step(grad_scale=S)
    assert abs(nc - ng) / nc < 2e-2
    pc, pg = cpu.lora_state_dict(), gpu.lora_state_dict()
    for k in pc:
        assert rel(pg[k], pc[k]) < 1e-2
    # an overflowing scale gives a non-finite norm and skips the step
    before = gpu.lora_state_dict()
    gpu.zero_grad()
    gpu.forward_backward(ids, labels, mask, grad_scale=1e30)
    n = og.step(grad_scale=1e30)
    after = gpu.lora_state_dict()
    if not np.isfinite(n):
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kv_cache_matches_full_forward(tmp_path, dtype):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    cpu, gpu = make_pair(d, dtype)
    V = cpu.config.vocab_size
    ids, mask, _ = batch(V, 2, 12, seed=4)
    full = cpu.forward(ids, mask)
    e = gpu.engine
    e.cache_init(2, 16)
    e.forward_cached(ids[:, :9], mask[:, :9])
    for t in range(9, 12):
        last = e.forward_cached(ids[:, t:t + 1], mask[:, :t + 1])
        assert rel(last, full[:, t]) < 2e-2, t
    e.cache_reorder(np.array([1, 0], np.int32))
    e.cache_free()


@pytest.mark.parametrize("hidden,heads", [(256, 4), (256, 2)])  # head_dim 64 and 128
def test_attention_long_sequence(tmp_path, hidden, heads):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32, hidden_size=hidden,
                                num_attention_heads=heads, num_kv_heads=heads, num_hidden_layers=1)
    cpu, gpu = make_pair(d, "bfloat16", targets=("query_key_value",))
    T = 2048
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cpu.config.vocab_size, size=(1, T)).astype(np.int64)
    mask = np.ones((1, T), np.int64)
    mask[0, :5] = 0
    labels = np.where(mask == 1, ids, -100)
    check_pair(cpu, gpu, ids, mask, labels)


@pytest.fixture(scope="module")
def falcon7b_layer(tmp_path_factory):
    """One Falcon-7B-shaped layer (widths 4544 / 4672 / 18176, 71 heads, 1 kv head), small vocab."""
    d = tmp_path_factory.mktemp("f7b")
    return testing.make_checkpoint(d, preset="falcon-7b", bits=4, group_size=64, num_hidden_layers=1,
                                   vocab_size=1024)


def test_falcon7b_widths(falcon7b_layer):
    cpu, gpu = make_pair(falcon7b_layer, "bfloat16", r=8)
    ids, mask, labels = batch(1024, 2, 16, seed=2)
    check_pair(cpu, gpu, ids, mask, labels)


def test_out_of_memory_is_recoverable(falcon7b_layer, monkeypatch):
    # The engine refuses a step whose tensors exceed 2^31 elements before allocating, so one
    # Falcon-7B layer cannot fill a 141 GB card: FT_CUDA_MEM_LIMIT_MB caps the backend's bytes and
    # makes the allocation past the cap fail exactly as a full card's cudaMalloc does.
    monkeypatch.setenv("FT_CUDA_MEM_LIMIT_MB", "1024")
    gpu = ft.load_model(falcon7b_layer, device="cuda", dtype="bfloat16")
    gpu.add_lora(r=8, alpha=16, dropout=0.05)
    ids, mask, labels = batch(1024, 2, 16, seed=2)
    before = gpu.forward(ids, mask)
    big = np.random.default_rng(5).integers(0, 1024, size=(16, 512))  # ~ 5 GB of activations
    with pytest.raises(ft._C.OutOfMemoryError) as ei:
        gpu.forward_backward(big, big)
    assert isinstance(ei.value, MemoryError)
    assert "out of memory" in str(ei.value) and "MiB" in str(ei.value)  # facts; cli.py adds the advice
    assert "--" not in str(ei.value) and "lower" not in str(ei.value)
    after = gpu.forward(ids, mask)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    loss = gpu.forward_backward(ids, labels, mask)
    assert np.isfinite(loss)


def test_forced_dtypes_and_errors(tmp_path):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    assert ft.load_model(d, device="cuda", dtype="float16").dtype == "float16"
    assert ft.load_model(d, device="cuda", dtype="bfloat16").dtype == "bfloat16"
    assert ft.load_model(d, device="cuda").dtype in ("bfloat16", "float16")
    with pytest.raises(Exception):
        ft.load_model(d, device="cuda", dtype="float32")
    with pytest.raises(Exception):
        ft.load_model(d, device="cuda:99")


def test_memory_stats_count_the_backend(falcon7b_layer):
    m = ft.load_model(falcon7b_layer, device="cuda")
    cur, peak = m.engine.memory_stats()
    assert 0 < cur <= peak
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, size=(2, 64))
    m.forward(ids)
    cur2, peak2 = m.engine.memory_stats()
    assert peak2 >= cur2 >= cur  # the workspace stays allocated
    assert m.engine.memory_stats(reset=True)[1] == cur2
    used, total = ft._C.cuda_device_memory()
    assert 0 < used <= total


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_forward_loss_matches_cpu(tmp_path, dtype):
    d = testing.make_checkpoint(tmp_path, preset="tiny-40b", bits=4, group_size=32, seed=5)
    cpu, gpu = make_pair(d, dtype)
    ids, mask, labels = batch(cpu.config.vocab_size, 3, 40)
    (lc, nc), (lg, ng) = cpu.loss(ids, labels, mask), gpu.loss(ids, labels, mask)
    assert nc == ng and abs(lg - lc) <= 1e-2 * max(1.0, abs(lc))
    assert all(not v.any() for v in gpu.lora_grad_dict().values())  # no gradient was taken


@pytest.mark.parametrize("preset,dtype", [("tiny", "bfloat16"), ("tiny-rw", "float16")])
def test_decode_greedy_matches_greedy_steps_on_gpu(tmp_path, preset, dtype):
    """decode_greedy (argmax fed back on the device, the recorded step replayed, one download at
    the end) gives bitwise the ids of decode_step(argmax=True) fed one by one on the same GPU
    model, across several calls (the key columns of each chunk uploaded up front), and the logits
    of a decode_step after it match the CPU's full forward; generate_ids takes this path."""
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32)
    cpu, gpu = make_pair(d, dtype)
    V = cpu.config.vocab_size
    B, P, cap = 2, 9, 60
    rng = np.random.default_rng(8)
    ids = rng.integers(0, V, size=(B, P)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    e = gpu.engine
    outs = []
    for chained in (False, True):
        e.cache_init(B, cap)
        cur = e.forward_cached(ids, mask).argmax(-1)
        got = [cur[None]]
        for n in (5, 1, 17, 8):
            if chained:
                got.append(e.decode_greedy(cur, n))
            else:
                got.append(np.stack([cur := e.decode_step(cur, argmax=True) for _ in range(n)]))
            cur = got[-1][-1]
        seq = np.concatenate(got).T  # [B, 1 + 31]
        last = e.decode_step(cur)
        assert e.cache_len() == P + 32
        e.cache_free()
        outs.append(seq)
    np.testing.assert_array_equal(outs[0], outs[1])
    full = cpu.forward(np.concatenate([ids, outs[1]], 1), np.concatenate([mask, np.ones_like(outs[1])], 1))
    assert rel(last, full[:, -1]) < 2e-2
    gen = gpu.generate_ids(ids, max_new_tokens=20, attention_mask=mask, eos_token_id=-1)
    np.testing.assert_array_equal(gen[:, P:], outs[1][:, :20])


@pytest.mark.parametrize("preset,dtype", [("tiny", "bfloat16"), ("tiny-40b", "float16"), ("tiny-rw", "bfloat16")])
def test_decode_step_graphs_match_cpu(tmp_path, monkeypatch, preset, dtype):
    """decode_step replays a captured CUDA graph from its third step on (past and Tk read on the
    device; three key splits of 64 by the end): logits against the CPU full forward, greedy ids
    identical to a model with FT_CUDA_GRAPHS=0; padding, a padded step and a mid-way reorder."""
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32)
    cpu, gpu = make_pair(d, dtype)
    monkeypatch.setenv("FT_CUDA_GRAPHS", "0")  # read when the backend is created
    _, direct = make_pair(d, dtype)
    monkeypatch.delenv("FT_CUDA_GRAPHS")
    V = cpu.config.vocab_size
    B, P, T, cap = 3, 20, 150, 160
    rng = np.random.default_rng(31)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[0, :5] = 0
    mask[1, 60] = 0
    perm = np.array([2, 0, 1])
    full = cpu.forward(ids, mask)
    out = {}
    for name, m in (("graph", gpu), ("direct", direct)):
        e = m.engine
        e.cache_init(B, cap)
        e.forward_cached(ids[:, :P], mask[:, :P])
        rows = np.arange(B)
        got = []
        for t in range(P, T):
            if t == 90:  # beam-style reorder: rows move with their keys, masks and positions
                e.cache_reorder(perm.astype(np.int32))
                rows = rows[perm]
            if t % 3 == 0:
                got.append(e.decode_step(ids[rows, t], mask[rows, t], argmax=True))
                continue
            lg = e.decode_step(ids[rows, t], mask[rows, t])
            real = mask[rows, t] == 1
            assert np.isfinite(lg).all(), (name, t)
            assert rel(lg[real], full[rows, t][real]) < 2e-2, (name, t, rel(lg[real], full[rows, t][real]))
            got.append(lg)
        assert e.cache_len() == T
        e.cache_free()
        out[name] = got
    for a, b in zip(out["graph"], out["direct"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("preset,dtype,ckpt", [("tiny", "bfloat16", 0.0), ("tiny-40b", "float16", 0.5),
                                               ("tiny-rw", "bfloat16", 1.0)])
def test_training_step_graphs_match_direct_and_cpu(tmp_path, monkeypatch, preset, dtype, ckpt):
    """forward_backward records its forward and backward halves from the second step of a shape on
    and replays them from the third: losses and LoRA gradients identical to a model with
    FT_CUDA_GRAPHS=0 and within the contract of the CPU's, with dropout (each step's masks from
    the dropout base: replayed steps draw new ones), gradient checkpointing, evaluation losses and
    another shape in between."""
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=4, group_size=32)
    cpu, gpu = make_pair(d, dtype, dropout=0.2)
    monkeypatch.setenv("FT_CUDA_GRAPHS", "0")  # read when the backend is created
    _, direct = make_pair(d, dtype, dropout=0.2)
    monkeypatch.delenv("FT_CUDA_GRAPHS")
    models = {"cpu": cpu, "graph": gpu, "direct": direct}
    for m in models.values():
        m.train()
        m.set_gradient_checkpointing(ckpt)
    V = cpu.config.vocab_size
    ids, mask, labels = batch(V, 3, 24, seed=5)
    o_ids, o_mask, o_labels = batch(V, 2, 17, seed=6)
    grads = []
    for step in range(6):
        out = {}
        for name, m in models.items():
            m.engine.set_rng(1234, step)
            m.zero_grad()
            loss = m.forward_backward(ids, labels, mask)
            if step == 3:  # an evaluation loss and a step of another shape between replays
                m.loss(ids, labels, mask)
                m.engine.set_rng(99, 0)
                m.forward_backward(o_ids, o_labels, o_mask)
                m.engine.set_rng(1234, step)
                m.zero_grad()
                loss = m.forward_backward(ids, labels, mask)
            out[name] = (loss, m.lora_grad_dict())
        (lg, gg), (ld, gd), (lc, gc) = out["graph"], out["direct"], out["cpu"]
        assert lg == ld, (step, lg, ld)
        for k in gg:
            np.testing.assert_array_equal(gg[k], gd[k], err_msg=f"step {step} {k}")
            assert cosine(gg[k], gc[k]) > 0.99, (step, k, cosine(gg[k], gc[k]))
        assert abs(lg - lc) < 1e-2 * max(1.0, abs(lc)), (step, lg, lc)
        grads.append(gg)
    # replayed steps 4 and 5 drew different dropout masks (their losses are on the same batch)
    assert any(not np.array_equal(grads[4][k], grads[5][k]) for k in grads[4])


def test_decode_step_graph_dropped_when_adapter_changes(tmp_path):
    """A new adapter (new buffers, another scale) between decode steps: the captured graph is
    dropped and later steps use the new adapter, as the CPU does."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    cpu, gpu = make_pair(d, "bfloat16")
    rng = np.random.default_rng(41)
    ids = rng.integers(0, cpu.config.vocab_size, size=(2, 30)).astype(np.int64)
    for m in (cpu, gpu):
        m.engine.cache_init(2, 32)
        m.engine.forward_cached(ids[:, :10], None)
    for t in range(10, 16):  # run, capture, replay
        gpu.engine.decode_step(ids[:, t])
        cpu.engine.decode_step(ids[:, t])
    sd = testing.random_lora(cpu.config, 8, ("query_key_value", "dense"), seed=9)
    for m in (cpu, gpu):
        m.add_lora(r=8, alpha=32, dropout=0.0, target_modules=("query_key_value", "dense"))
        m.load_lora_state_dict(sd)
    for t in range(16, 22):
        a = gpu.engine.decode_step(ids[:, t])
        b = cpu.engine.decode_step(ids[:, t])
        assert rel(a, b) < 2e-2, (t, rel(a, b))
    for m in (cpu, gpu):
        m.engine.cache_free()
